"""Tiny, deterministic model folders of the architectures ms-swift adapters target.

Tests and the demo need real LMDeploy models (its own classes, loaders and LoRA slots) without a GPU
or a hub download, so this module writes complete local checkpoints that LMDeploy's PyTorch engine
builds on CPU exactly as it would build the full-size models:

* ``qwen2`` / ``llama``: transformers-native ``Qwen2ForCausalLM`` / ``LlamaForCausalLM``.
* ``internlm2``: InternLM2 remote-code layout (``wqkv`` in the interleaved GQA layout, ``wo``,
  ``w1/w2/w3``, ``output``), with a minimal ``configuration_internlm2.py`` named in ``auto_map``.
* ``internvl2_internlm2``: InternVL2-8B's ``InternVLChatModel`` layout (InternViT + ``mlp1`` +
  InternLM2), with the ``configuration_*.py`` files LMDeploy reads through ``trust_remote_code``.
* ``internvl_qwen2``: the same wrapper around a Qwen2 LLM (InternVL2.5-1B style).
* ``internvl_hf``: transformers' own ``InternVLForConditionalGeneration`` (InternVL3-hf style).
* ``qwen2_vl`` / ``qwen2_5_vl``: ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``
  (Qwen2 LLM under ``model.*`` + ``lm_head``, vision tower under ``visual.*`` with a fused ``attn.qkv``).
* ``llava``: ``LlavaForConditionalGeneration`` in the llava-hf layout (llava-1.5 style: CLIP vision tower
  ``vision_tower.vision_model.*``, ``multi_modal_projector.linear_1/linear_2``, Llama LLM under
  ``language_model.*``).

Checkpoint keys are written by hand, in the names the real checkpoints use (for ``internvl_hf``
that is what transformers 5 ``save_pretrained`` writes: ``language_model.model.*``,
``language_model.lm_head``, ``vision_tower.*``, ``multi_modal_projector.*``; for ``llava`` it is the
llava-hf Hub layout, ``vision_tower.vision_model.*``, which LMDeploy requires and transformers 5 no
longer writes). Config files follow the Hub's (Qwen2-VL's flat LLM fields, LLaVA's nested
``text_config``, which must name its ``architectures`` for LMDeploy). No modeling code is
written: LMDeploy only reads the config and the class *name*. No tokenizer is written either;
LMDeploy's model build does not need one.

This module must not import peft (it ships with the package); torch and LMDeploy are imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "ARCHS",
    "detect_arch",
    "make_tiny_model",
    "checkpoint_shapes",
    "checkpoint_linear_names",
    "build_lmdeploy_model",
    "release_inference_tensors",
    "deinterleave_internlm2_wqkv",
]

ARCHS: tuple[str, ...] = ("qwen2", "llama", "internlm2", "internvl2_internlm2", "internvl_qwen2", "internvl_hf",
                          "qwen2_vl", "qwen2_5_vl", "llava")

# LLM sizes: GQA (4 query heads share 2 kv heads), head_dim 16.
VOCAB = 128
HIDDEN = 64
INTERMEDIATE = 128
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
# Vision sizes: a 28x28 image is 2x2 patches of 14; pixel shuffle (0.5) makes that one LLM token.
VIT_HIDDEN = 32
VIT_HEADS = 2
VIT_INTERMEDIATE = 64
IMAGE_SIZE = 28
PATCH_SIZE = 14
NUM_POSITIONS = (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1
DOWNSAMPLE = 0.5
PROJ_IN = VIT_HIDDEN * int(1 / DOWNSAMPLE) ** 2
# Qwen2-VL / Qwen2.5-VL: patches are (3 channels, 2 frames, 14, 14); the merger joins 2x2 patches.
TEMPORAL_PATCH = 2
SPATIAL_MERGE = 2
MERGER_IN = VIT_HIDDEN * SPATIAL_MERGE**2
# Qwen2-VL's multimodal RoPE splits the LLM's head_dim / 2 rotary frequencies over (t, h, w).
MROPE_SECTION = [2, 3, 3]
BOS, EOS, PAD = 1, 2, 0

# Module leaf names that hold 2-D weights but are embeddings, not Linear layers.
EMBEDDING_LEAVES = frozenset({"embed_tokens", "tok_embeddings", "wte", "word_embeddings", "position_embedding"})
# Of those, the token embeddings: LMDeploy builds them with ``padding_idx`` (CLIP's position table has none).
TOKEN_EMBEDDING_LEAVES = frozenset({"embed_tokens", "tok_embeddings", "wte", "word_embeddings"})

Spec = dict[str, tuple[int, ...]]

# ---------------------------------------------------------------------------------------------
# remote-code configuration files (our own minimal versions; field names follow the originals)
# ---------------------------------------------------------------------------------------------

_INTERNLM2_CONFIG_PY = '''\
"""Minimal InternLM2 config for tiny test checkpoints (written by lmdeploy_regex_lora.tiny_models)."""
from transformers.configuration_utils import PretrainedConfig


class InternLM2Config(PretrainedConfig):
    """Only the fields LMDeploy reads; token ids are set here because transformers 5 no longer does."""

    model_type = "internlm2"

    def __init__(self, vocab_size=103168, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
                 max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, bias=True,
                 rope_theta=10000, rope_scaling=None, attn_implementation="eager", **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.bias = bias
        self.rope_theta = rope_theta
        if rope_scaling is not None:  # transformers 5 warns on every assignment, even of None
            self.rope_scaling = rope_scaling
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(attn_implementation=attn_implementation, **kwargs)
'''

_INTERN_VIT_CONFIG_PY = '''\
"""Minimal InternViT config for tiny test checkpoints (written by lmdeploy_regex_lora.tiny_models)."""
from transformers.configuration_utils import PretrainedConfig


class InternVisionConfig(PretrainedConfig):
    """Only the fields LMDeploy's InternVisionModel reads."""

    model_type = "intern_vit_6b"

    def __init__(self, num_channels=3, patch_size=14, image_size=224, qkv_bias=False, hidden_size=3200,
                 num_attention_heads=25, intermediate_size=12800, qk_normalization=True,
                 num_hidden_layers=48, use_flash_attn=True, hidden_act="gelu", norm_type="rms_norm",
                 layer_norm_eps=1e-6, dropout=0.0, drop_path_rate=0.0, attention_dropout=0.0,
                 initializer_range=0.02, initializer_factor=0.1, **kwargs):
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.qkv_bias = qkv_bias
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.qk_normalization = qk_normalization
        self.num_hidden_layers = num_hidden_layers
        self.use_flash_attn = use_flash_attn
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.dropout = dropout
        self.drop_path_rate = drop_path_rate
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor
        super().__init__(**kwargs)
'''

_INTERNVL_CHAT_CONFIG_PY = '''\
"""Minimal InternVLChatModel config for tiny test checkpoints (written by lmdeploy_regex_lora.tiny_models).

LMDeploy needs ``llm_config`` / ``vision_config`` as config objects (a plain PretrainedConfig would leave
them as dicts), so they are built here from the dicts in config.json.
"""
from transformers import LlamaConfig, Qwen2Config
from transformers.configuration_utils import PretrainedConfig

from .configuration_intern_vit import InternVisionConfig
from .configuration_internlm2 import InternLM2Config

_LLM_CONFIGS = {
    "InternLM2ForCausalLM": InternLM2Config,
    "LlamaForCausalLM": LlamaConfig,
    "Qwen2ForCausalLM": Qwen2Config,
}


def _as_config(value, default_cls):
    if isinstance(value, PretrainedConfig):
        return value
    value = dict(value or {})
    arch = (value.get("architectures") or [None])[0]
    return _LLM_CONFIGS.get(arch, default_cls)(**value)


class InternVLChatConfig(PretrainedConfig):
    """Composite config: InternViT + projector + LLM."""

    model_type = "internvl_chat"
    is_composition = True

    def __init__(self, vision_config=None, llm_config=None, use_backbone_lora=0, use_llm_lora=0,
                 select_layer=-1, force_image_size=None, downsample_ratio=0.5, template=None,
                 dynamic_image_size=False, use_thumbnail=False, ps_version="v1", min_dynamic_patch=1,
                 max_dynamic_patch=6, **kwargs):
        super().__init__(**kwargs)
        if isinstance(vision_config, PretrainedConfig):
            self.vision_config = vision_config
        else:
            self.vision_config = InternVisionConfig(**(vision_config or {}))
        self.llm_config = _as_config(llm_config or {"architectures": ["InternLM2ForCausalLM"]}, InternLM2Config)
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
'''

_INTERNLM2_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}
_INTERNVL_AUTO_MAP = {
    "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
    "AutoModel": "modeling_internvl_chat.InternVLChatModel",
    "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
}

# ---------------------------------------------------------------------------------------------
# configs and checkpoint key specs
# ---------------------------------------------------------------------------------------------


def _llama_like_config(model_type: str, arch: str, num_layers: int, bias: bool) -> dict[str, Any]:
    """config.json body of a tiny transformers-native Qwen2 / Llama LLM."""
    cfg: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": num_layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "torch_dtype": "float32",
    }
    if model_type == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    else:
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=num_layers)
    assert bias == (model_type == "qwen2")
    return cfg


def _internlm2_config(num_layers: int) -> dict[str, Any]:
    """config.json body of a tiny InternLM2 (remote code)."""
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        "auto_map": dict(_INTERNLM2_AUTO_MAP),
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": num_layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000,
        "rope_scaling": None,
        "bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "attn_implementation": "eager",
        "torch_dtype": "float32",
    }


def _llama_like_spec(prefix: str, num_layers: int, bias: bool) -> Spec:
    """Checkpoint keys of a Qwen2 / Llama causal LM under ``prefix``."""
    spec: Spec = {f"{prefix}model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(num_layers):
        p = f"{prefix}model.layers.{i}."
        q_out, kv_out = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
        for name, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            spec[f"{p}self_attn.{name}.weight"] = (out, HIDDEN)
            if bias:
                spec[f"{p}self_attn.{name}.bias"] = (out,)
        spec[f"{p}self_attn.o_proj.weight"] = (HIDDEN, HEADS * HEAD_DIM)
        spec[f"{p}mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
        spec[f"{p}mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
        spec[f"{p}mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
        spec[f"{p}input_layernorm.weight"] = (HIDDEN,)
        spec[f"{p}post_attention_layernorm.weight"] = (HIDDEN,)
    spec[f"{prefix}model.norm.weight"] = (HIDDEN,)
    spec[f"{prefix}lm_head.weight"] = (VOCAB, HIDDEN)
    return spec


def _internlm2_spec(prefix: str, num_layers: int) -> Spec:
    """Checkpoint keys of InternLM2ForCausalLM (``wqkv`` rows: interleaved per kv head)."""
    spec: Spec = {f"{prefix}model.tok_embeddings.weight": (VOCAB, HIDDEN)}
    for i in range(num_layers):
        p = f"{prefix}model.layers.{i}."
        spec[f"{p}attention.wqkv.weight"] = ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN)
        spec[f"{p}attention.wo.weight"] = (HIDDEN, HEADS * HEAD_DIM)
        spec[f"{p}feed_forward.w1.weight"] = (INTERMEDIATE, HIDDEN)
        spec[f"{p}feed_forward.w3.weight"] = (INTERMEDIATE, HIDDEN)
        spec[f"{p}feed_forward.w2.weight"] = (HIDDEN, INTERMEDIATE)
        spec[f"{p}attention_norm.weight"] = (HIDDEN,)
        spec[f"{p}ffn_norm.weight"] = (HIDDEN,)
    spec[f"{prefix}model.norm.weight"] = (HIDDEN,)
    spec[f"{prefix}output.weight"] = (VOCAB, HIDDEN)
    return spec


def _intern_vit_spec(num_layers: int) -> Spec:
    """Checkpoint keys of InternViT (``vision_model.*``) plus the ``mlp1`` projector."""
    c = VIT_HIDDEN
    spec: Spec = {
        "vision_model.embeddings.class_embedding": (1, 1, c),
        "vision_model.embeddings.patch_embedding.weight": (c, 3, PATCH_SIZE, PATCH_SIZE),
        "vision_model.embeddings.patch_embedding.bias": (c,),
        "vision_model.embeddings.position_embedding": (1, NUM_POSITIONS, c),
    }
    for i in range(num_layers):
        p = f"vision_model.encoder.layers.{i}."
        for name, shape in (("attn.qkv", (3 * c, c)), ("attn.proj", (c, c)),
                            ("mlp.fc1", (VIT_INTERMEDIATE, c)), ("mlp.fc2", (c, VIT_INTERMEDIATE))):
            spec[f"{p}{name}.weight"] = shape
            spec[f"{p}{name}.bias"] = (shape[0],)
        for name in ("norm1", "norm2"):
            spec[f"{p}{name}.weight"] = (c,)
            spec[f"{p}{name}.bias"] = (c,)
        spec[f"{p}ls1"] = (c,)
        spec[f"{p}ls2"] = (c,)
    spec.update({
        "mlp1.0.weight": (PROJ_IN,), "mlp1.0.bias": (PROJ_IN,),
        "mlp1.1.weight": (HIDDEN, PROJ_IN), "mlp1.1.bias": (HIDDEN,),
        "mlp1.3.weight": (HIDDEN, HIDDEN), "mlp1.3.bias": (HIDDEN,),
    })
    return spec


def _internvl_hf_vision_spec(num_layers: int) -> Spec:
    """Checkpoint keys of transformers' InternVL vision tower + projector (names as transformers 5 saves)."""
    c = VIT_HIDDEN
    spec: Spec = {
        "vision_tower.embeddings.cls_token": (1, 1, c),
        "vision_tower.embeddings.patch_embeddings.projection.weight": (c, 3, PATCH_SIZE, PATCH_SIZE),
        "vision_tower.embeddings.patch_embeddings.projection.bias": (c,),
        "vision_tower.embeddings.position_embeddings": (1, NUM_POSITIONS, c),
    }
    for i in range(num_layers):
        p = f"vision_tower.encoder.layer.{i}."
        for name, shape in (("attention.q_proj", (c, c)), ("attention.k_proj", (c, c)), ("attention.v_proj", (c, c)),
                            ("attention.projection_layer", (c, c)),
                            ("mlp.fc1", (VIT_INTERMEDIATE, c)), ("mlp.fc2", (c, VIT_INTERMEDIATE))):
            spec[f"{p}{name}.weight"] = shape
            spec[f"{p}{name}.bias"] = (shape[0],)
        for name in ("layernorm_before", "layernorm_after"):
            spec[f"{p}{name}.weight"] = (c,)
            spec[f"{p}{name}.bias"] = (c,)
        spec[f"{p}lambda_1"] = (c,)
        spec[f"{p}lambda_2"] = (c,)
    spec.update({
        "multi_modal_projector.layer_norm.weight": (PROJ_IN,), "multi_modal_projector.layer_norm.bias": (PROJ_IN,),
        "multi_modal_projector.linear_1.weight": (HIDDEN, PROJ_IN), "multi_modal_projector.linear_1.bias": (HIDDEN,),
        "multi_modal_projector.linear_2.weight": (HIDDEN, HIDDEN), "multi_modal_projector.linear_2.bias": (HIDDEN,),
    })
    return spec


def _intern_vit_config(num_layers: int) -> dict[str, Any]:
    """vision_config of InternVL2 (InternViT-300M style: LayerNorm, qkv bias, no qk norm)."""
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "num_channels": 3,
        "patch_size": PATCH_SIZE,
        "image_size": IMAGE_SIZE,
        "qkv_bias": True,
        "hidden_size": VIT_HIDDEN,
        "num_attention_heads": VIT_HEADS,
        "intermediate_size": VIT_INTERMEDIATE,
        "qk_normalization": False,
        "num_hidden_layers": num_layers,
        "use_flash_attn": False,
        "hidden_act": "gelu",
        "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6,
    }


def _internvl_chat_config(llm_config: dict[str, Any], num_layers: int, template: str) -> dict[str, Any]:
    """config.json body of an InternVLChatModel (remote code)."""
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": dict(_INTERNVL_AUTO_MAP),
        "downsample_ratio": DOWNSAMPLE,
        "select_layer": -1,
        "force_image_size": IMAGE_SIZE,
        "template": template,
        "ps_version": "v2",
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 6,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "llm_config": llm_config,
        "vision_config": _intern_vit_config(num_layers),
    }


def _internvl_hf_config(num_layers: int) -> dict[str, Any]:
    """config.json body of transformers' InternVLForConditionalGeneration (Qwen2 text model)."""
    text = _llama_like_config("qwen2", "Qwen2ForCausalLM", num_layers, bias=True)
    text.pop("torch_dtype")
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "downsample_ratio": DOWNSAMPLE,
        "image_seq_length": 1,
        "image_token_id": VOCAB - 1,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "text_config": text,
        "vision_config": {
            "model_type": "internvl_vision",
            "hidden_size": VIT_HIDDEN,
            "num_attention_heads": VIT_HEADS,
            "intermediate_size": VIT_INTERMEDIATE,
            "num_hidden_layers": num_layers,
            "image_size": [IMAGE_SIZE, IMAGE_SIZE],
            "patch_size": [PATCH_SIZE, PATCH_SIZE],
            "num_channels": 3,
            "hidden_act": "gelu",
            "attention_bias": True,
            "use_qk_norm": False,
            "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6,
            "use_mask_token": False,
            "use_mean_pooling": True,
            "use_absolute_position_embeddings": True,
            "layer_scale_init_value": 0.1,
        },
    }


def _qwen2_vl_vision_spec(num_layers: int, v25: bool) -> Spec:
    """Checkpoint keys of the Qwen2-VL / Qwen2.5-VL vision tower (``visual.*``), Hub names.

    Qwen2-VL: LayerNorm (weight + bias) and a ``fc1/fc2`` MLP; Qwen2.5-VL: RMSNorm (weight only) and a
    gated ``gate_proj/up_proj/down_proj`` MLP with biases. Both fuse attention into ``attn.qkv``.
    """
    c = VIT_HIDDEN
    spec: Spec = {"visual.patch_embed.proj.weight": (c, 3, TEMPORAL_PATCH, PATCH_SIZE, PATCH_SIZE)}
    mlp = (("mlp.gate_proj", (VIT_INTERMEDIATE, c)), ("mlp.up_proj", (VIT_INTERMEDIATE, c)),
           ("mlp.down_proj", (c, VIT_INTERMEDIATE))) if v25 else (
        ("mlp.fc1", (VIT_INTERMEDIATE, c)), ("mlp.fc2", (c, VIT_INTERMEDIATE)))
    for i in range(num_layers):
        p = f"visual.blocks.{i}."
        for name in ("norm1", "norm2"):
            spec[f"{p}{name}.weight"] = (c,)
            if not v25:
                spec[f"{p}{name}.bias"] = (c,)
        for name, shape in (("attn.qkv", (3 * c, c)), ("attn.proj", (c, c)), *mlp):
            spec[f"{p}{name}.weight"] = shape
            spec[f"{p}{name}.bias"] = (shape[0],)
    spec["visual.merger.ln_q.weight"] = (c,)
    if not v25:
        spec["visual.merger.ln_q.bias"] = (c,)
    spec.update({
        "visual.merger.mlp.0.weight": (MERGER_IN, MERGER_IN), "visual.merger.mlp.0.bias": (MERGER_IN,),
        "visual.merger.mlp.2.weight": (HIDDEN, MERGER_IN), "visual.merger.mlp.2.bias": (HIDDEN,),
    })
    return spec


def _clip_vision_spec(num_layers: int) -> Spec:
    """Checkpoint keys of llava-hf's CLIP tower (``vision_tower.vision_model.*``) and its projector."""
    c = VIT_HIDDEN
    v = "vision_tower.vision_model."
    spec: Spec = {
        f"{v}embeddings.class_embedding": (c,),
        f"{v}embeddings.patch_embedding.weight": (c, 3, PATCH_SIZE, PATCH_SIZE),
        f"{v}embeddings.position_embedding.weight": (NUM_POSITIONS, c),
        f"{v}pre_layrnorm.weight": (c,), f"{v}pre_layrnorm.bias": (c,),
    }
    for i in range(num_layers):
        p = f"{v}encoder.layers.{i}."
        for name, shape in (("self_attn.q_proj", (c, c)), ("self_attn.k_proj", (c, c)), ("self_attn.v_proj", (c, c)),
                            ("self_attn.out_proj", (c, c)),
                            ("mlp.fc1", (VIT_INTERMEDIATE, c)), ("mlp.fc2", (c, VIT_INTERMEDIATE))):
            spec[f"{p}{name}.weight"] = shape
            spec[f"{p}{name}.bias"] = (shape[0],)
        for name in ("layer_norm1", "layer_norm2"):
            spec[f"{p}{name}.weight"] = (c,)
            spec[f"{p}{name}.bias"] = (c,)
    spec.update({
        f"{v}post_layernorm.weight": (c,), f"{v}post_layernorm.bias": (c,),
        "multi_modal_projector.linear_1.weight": (HIDDEN, c), "multi_modal_projector.linear_1.bias": (HIDDEN,),
        "multi_modal_projector.linear_2.weight": (HIDDEN, HIDDEN), "multi_modal_projector.linear_2.bias": (HIDDEN,),
    })
    return spec


def _qwen2_vl_config(num_layers: int, v25: bool) -> dict[str, Any]:
    """config.json body of Qwen2-VL / Qwen2.5-VL, in the Hub's flat layout (LLM fields at the top level)."""
    arch = "Qwen2_5_VLForConditionalGeneration" if v25 else "Qwen2VLForConditionalGeneration"
    cfg = _llama_like_config("qwen2", arch, num_layers, bias=True)
    cfg.update(
        model_type="qwen2_5_vl" if v25 else "qwen2_vl",
        rope_scaling={"type": "mrope", "mrope_section": list(MROPE_SECTION)},
        vision_start_token_id=VOCAB - 4,
        vision_end_token_id=VOCAB - 3,
        video_token_id=VOCAB - 2,
        image_token_id=VOCAB - 1,
    )
    vision: dict[str, Any] = {
        "depth": num_layers,
        "num_heads": VIT_HEADS,
        "in_channels": 3,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": SPATIAL_MERGE,
        "temporal_patch_size": TEMPORAL_PATCH,
    }
    if v25:
        vision.update(model_type="qwen2_5_vl_vision", hidden_size=VIT_HIDDEN, out_hidden_size=HIDDEN,
                      intermediate_size=VIT_INTERMEDIATE, hidden_act="silu", window_size=112,
                      fullatt_block_indexes=[num_layers - 1], tokens_per_second=2)
    else:
        vision.update(model_type="qwen2_vl_vision", embed_dim=VIT_HIDDEN, hidden_size=HIDDEN,
                      mlp_ratio=VIT_INTERMEDIATE // VIT_HIDDEN, hidden_act="quick_gelu")
    cfg["vision_config"] = vision
    return cfg


def _llava_config(num_layers: int) -> dict[str, Any]:
    """config.json body of llava-hf's LlavaForConditionalGeneration (llava-1.5 style, Llama LLM).

    ``text_config`` names its ``architectures``: LMDeploy builds the LLM from it and fails without.
    """
    text = _llama_like_config("llama", "LlamaForCausalLM", num_layers, bias=False)
    text.pop("torch_dtype")
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": VOCAB - 1,
        "image_seq_length": (IMAGE_SIZE // PATCH_SIZE) ** 2,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "text_config": text,
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": VIT_HIDDEN,
            "intermediate_size": VIT_INTERMEDIATE,
            "num_hidden_layers": num_layers,
            "num_attention_heads": VIT_HEADS,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "num_channels": 3,
            "projection_dim": HIDDEN,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
    }


_Built = tuple[dict[str, Any], dict[str, str], Spec]


def _build_qwen2(n: int) -> _Built:
    return _llama_like_config("qwen2", "Qwen2ForCausalLM", n, True), {}, _llama_like_spec("", n, True)


def _build_llama(n: int) -> _Built:
    return _llama_like_config("llama", "LlamaForCausalLM", n, False), {}, _llama_like_spec("", n, False)


def _build_internlm2(n: int) -> _Built:
    return _internlm2_config(n), {"configuration_internlm2.py": _INTERNLM2_CONFIG_PY}, _internlm2_spec("", n)


_INTERNVL_FILES = {
    "configuration_internlm2.py": _INTERNLM2_CONFIG_PY,
    "configuration_intern_vit.py": _INTERN_VIT_CONFIG_PY,
    "configuration_internvl_chat.py": _INTERNVL_CHAT_CONFIG_PY,
}


def _build_internvl2_internlm2(n: int) -> _Built:
    llm = _internlm2_config(n)
    llm.pop("torch_dtype")
    cfg = _internvl_chat_config(llm, n, "internlm2-chat")
    spec = {**_intern_vit_spec(n), **_internlm2_spec("language_model.", n)}
    return cfg, dict(_INTERNVL_FILES), spec


def _build_internvl_qwen2(n: int) -> _Built:
    llm = _llama_like_config("qwen2", "Qwen2ForCausalLM", n, True)
    llm.pop("torch_dtype")
    cfg = _internvl_chat_config(llm, n, "internvl2_5")
    spec = {**_intern_vit_spec(n), **_llama_like_spec("language_model.", n, True)}
    return cfg, dict(_INTERNVL_FILES), spec


def _build_internvl_hf(n: int) -> _Built:
    spec = {**_internvl_hf_vision_spec(n), **_llama_like_spec("language_model.", n, True)}
    return _internvl_hf_config(n), {}, spec


def _build_qwen2_vl(n: int) -> _Built:
    return _qwen2_vl_config(n, v25=False), {}, {**_llama_like_spec("", n, True), **_qwen2_vl_vision_spec(n, False)}


def _build_qwen2_5_vl(n: int) -> _Built:
    return _qwen2_vl_config(n, v25=True), {}, {**_llama_like_spec("", n, True), **_qwen2_vl_vision_spec(n, True)}


def _build_llava(n: int) -> _Built:
    return _llava_config(n), {}, {**_clip_vision_spec(n), **_llama_like_spec("language_model.", n, False)}


_BUILDERS: dict[str, Callable[[int], _Built]] = {
    "qwen2": _build_qwen2,
    "llama": _build_llama,
    "internlm2": _build_internlm2,
    "internvl2_internlm2": _build_internvl2_internlm2,
    "internvl_qwen2": _build_internvl_qwen2,
    "internvl_hf": _build_internvl_hf,
    "qwen2_vl": _build_qwen2_vl,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "llava": _build_llava,
}

# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------


def _tensor_seed(seed: int, name: str) -> int:
    """Per-tensor seed, so a tensor's values depend on (seed, key) only, not on the layer count."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """std 0.02 for matrices/embeddings/biases; ~1 for norm weights and layer scales."""
    import torch

    gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
    noise = torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02
    parts = name.split(".")
    if len(shape) == 1 and parts[-1] != "bias":  # norm weights, InternViT ls1/ls2, lambda_1/2
        return noise + 1.0
    if len(parts) > 1 and parts[-2] in TOKEN_EMBEDDING_LEAVES:
        # LMDeploy zeroes the padding_idx row when loading (as HF's init does): keep checkpoint == model
        noise[PAD] = 0.0
    return noise


def detect_arch(model_dir: str | os.PathLike) -> str:
    """Which of :data:`ARCHS` a folder written by :func:`make_tiny_model` (or a real model) is."""
    cfg = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    arch = (cfg.get("architectures") or [""])[0]
    if arch == "InternVLChatModel":
        llm_arch = cfg["llm_config"]["architectures"][0]
        return "internvl2_internlm2" if llm_arch == "InternLM2ForCausalLM" else "internvl_qwen2"
    simple = {
        "Qwen2ForCausalLM": "qwen2",
        "LlamaForCausalLM": "llama",
        "InternLM2ForCausalLM": "internlm2",
        "InternVLForConditionalGeneration": "internvl_hf",
        "Qwen2VLForConditionalGeneration": "qwen2_vl",
        "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
        "LlavaForConditionalGeneration": "llava",
    }
    if arch not in simple:
        raise ValueError(f"unknown architecture {arch!r} in {model_dir}")
    return simple[arch]


def make_tiny_model(arch: str, out_dir: str | os.PathLike, *, seed: int = 0, num_layers: int = 2) -> pathlib.Path:
    """Write a complete tiny model folder (config, remote-code configs, float32 safetensors).

    ``num_layers`` is used for both the LLM and the vision tower. The same (arch, seed, num_layers)
    always gives bit-identical weights.
    """
    from safetensors.torch import save_file

    if arch not in _BUILDERS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config, files, spec = _BUILDERS[arch](num_layers)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for fname, text in files.items():
        (out / fname).write_text(text)
    gen_cfg = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    tensors: dict[str, torch.Tensor] = {
        name: _random_tensor(name, shape, seed).contiguous() for name, shape in spec.items()
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# ---------------------------------------------------------------------------------------------
# checkpoint inspection
# ---------------------------------------------------------------------------------------------


def checkpoint_shapes(model_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Every tensor key of the folder's safetensors checkpoint(s) and its shape, without loading data."""
    from safetensors import safe_open

    folder = pathlib.Path(model_dir)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def checkpoint_linear_names(model_dir: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """HF module name -> (out_features, in_features) for every Linear module of the checkpoint.

    A module is Linear when it owns a 2-D ``weight`` and is not an embedding (``embed_tokens``,
    ``tok_embeddings``, ...); norms (1-D), the patch conv (4-D) and loose parameters
    (``class_embedding``, ``ls1``) are not. Names are the checkpoint's (see ``peft_fixtures`` for
    the transformers>=4.52 renaming of ``internvl_hf``).
    """
    result: dict[str, tuple[int, int]] = {}
    for key, shape in checkpoint_shapes(model_dir).items():
        if not key.endswith(".weight") or len(shape) != 2:
            continue
        module = key[: -len(".weight")]
        if module.rsplit(".", 1)[-1] in EMBEDDING_LEAVES:
            continue
        result[module] = (int(shape[0]), int(shape[1]))
    return dict(sorted(result.items()))


def deinterleave_internlm2_wqkv(weight: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """HF InternLM2 ``wqkv`` rows ``(kv_head, group + 2, head_dim)`` -> LMDeploy's ``[Q; K; V]`` rows.

    In HF each kv head's block holds its ``group = heads / kv_heads`` query heads, then its key head,
    then its value head. LMDeploy's ``weight_spliter(layout='hgd')`` (and its ``lora_B`` loader)
    regroup the rows as all Q heads, all K heads, all V heads. Works on any trailing dims (bias, lora_B).
    """
    import torch

    group = num_heads // num_kv_heads
    head_dim = weight.shape[0] // (num_heads + 2 * num_kv_heads)
    w = weight.unflatten(0, (num_kv_heads, group + 2, head_dim))
    q = w[:, :group].flatten(0, 2)
    k = w[:, group].flatten(0, 1)
    v = w[:, group + 1].flatten(0, 1)
    return torch.cat([q, k, v], dim=0)


# ---------------------------------------------------------------------------------------------
# LMDeploy build
# ---------------------------------------------------------------------------------------------


def build_lmdeploy_model(model_dir: str | os.PathLike, dtype: str = "float32") -> torch.nn.Module:
    """Build LMDeploy's own model for ``model_dir`` on CPU and load its weights, as the engine does.

    Mirrors ``BaseModelAgent._build_model`` (lmdeploy 0.18): ``ModelConfig.from_pretrained`` with
    ``trust_remote_code``, ``build_patched_model`` with a ``BuildModelContext`` carrying the config's
    quant / lm-head settings, then ``load_model_weights`` (which also runs ``update_weights`` hooks).

    LMDeploy builds under ``torch.inference_mode()``, so every parameter is an *inference tensor*:
    reading works anywhere, but in-place edits (zeroing, copying LoRA weights) must happen inside
    ``torch.inference_mode()`` and autograd cannot use them. :func:`release_inference_tensors`
    turns them into ordinary tensors when a caller needs that.
    """
    import torch
    from lmdeploy.pytorch.config import ModelConfig
    from lmdeploy.pytorch.model_inputs import BuildModelContext
    from lmdeploy.pytorch.models.patch import build_patched_model
    from lmdeploy.pytorch.weight_loader.model_weight_loader import load_model_weights

    path = str(model_dir)
    device = torch.device("cpu")
    # device_type='cpu': otherwise LMDeploy asks CUDA whether it supports a config's bfloat16.
    cfg = ModelConfig.from_pretrained(path, trust_remote_code=True, dtype=dtype, device_type="cpu")
    ctx = BuildModelContext(
        quant_config=cfg.quant_config,
        fp32_lm_head=cfg.fp32_lm_head,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    model = build_patched_model(cfg, device=device, build_model_ctx=ctx)
    load_model_weights(model, path, device=device)
    return model


def release_inference_tensors(model: torch.nn.Module) -> torch.nn.Module:
    """Replace inference-tensor parameters/buffers by ordinary copies, keeping their attributes.

    LMDeploy hangs ``weight_loader`` / ``weight_spliter`` on its Parameters, so each new Parameter
    gets the old one's ``__dict__``. Returns ``model`` (changed in place).
    """
    import torch

    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.is_inference():
                continue
            new = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
            new.__dict__.update(param.__dict__)
            setattr(module, name, new)
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_inference():
                module._buffers[name] = buf.clone()
    return model
