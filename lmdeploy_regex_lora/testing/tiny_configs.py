"""Config files of the tiny test models: ``config.json`` bodies and remote-code configuration modules.

Field names follow the Hub's files for each architecture (Qwen2-VL's flat LLM fields, LLaVA's nested
``text_config``, InternVL chat's remote code); the sizes are the smallest that keep the real structure.
"""

from __future__ import annotations

from typing import Any

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

# ---------------------------------------------------------------------------------------------
# remote-code configuration files (our own minimal versions; field names follow the originals)
# ---------------------------------------------------------------------------------------------

INTERNLM2_CONFIG_PY = '''\
"""Minimal InternLM2 config for tiny test checkpoints (written by lmdeploy_regex_lora.testing.tiny_models)."""
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

INTERN_VIT_CONFIG_PY = '''\
"""Minimal InternViT config for tiny test checkpoints (written by lmdeploy_regex_lora.testing.tiny_models)."""
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

INTERNVL_CHAT_CONFIG_PY = '''\
"""Minimal InternVLChatModel config for tiny test checkpoints (written by lmdeploy_regex_lora.testing.tiny_models).

LMDeploy needs ``llm_config`` / ``vision_config`` as config objects (a plain PretrainedConfig would leave
them as dicts), so they are built here from the dicts in config.json.
"""
from transformers import LlamaConfig, Phi3Config, Qwen2Config, Qwen3Config
from transformers.configuration_utils import PretrainedConfig

from .configuration_intern_vit import InternVisionConfig
from .configuration_internlm2 import InternLM2Config

_LLM_CONFIGS = {
    "InternLM2ForCausalLM": InternLM2Config,
    "LlamaForCausalLM": LlamaConfig,
    "Qwen2ForCausalLM": Qwen2Config,
    "Qwen3ForCausalLM": Qwen3Config,
    "Phi3ForCausalLM": Phi3Config,
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

INTERNLM2_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}
INTERNVL_AUTO_MAP = {
    "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
    "AutoModel": "modeling_internvl_chat.InternVLChatModel",
    "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
}


def _llm_fields(arch: str, model_type: str, num_layers: int) -> dict[str, Any]:
    """The fields every tiny decoder's config.json shares (sizes, activation, token ids)."""
    return {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": num_layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "torch_dtype": "float32",
    }


def llama_like_config(model_type: str, arch: str, num_layers: int, bias: bool) -> dict[str, Any]:
    """config.json body of a tiny transformers-native Qwen2 / Llama LLM."""
    cfg = _llm_fields(arch, model_type, num_layers)
    cfg.update(head_dim=HEAD_DIM, rope_theta=10000.0)
    if model_type == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    else:
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=num_layers)
    assert bias == (model_type == "qwen2")
    return cfg


def internlm2_config(num_layers: int) -> dict[str, Any]:
    """config.json body of a tiny InternLM2 (remote code)."""
    cfg = _llm_fields("InternLM2ForCausalLM", "internlm2", num_layers)
    cfg.update(auto_map=dict(INTERNLM2_AUTO_MAP), rope_theta=10000, rope_scaling=None, bias=False,
               attn_implementation="eager")
    return cfg


def intern_vit_config(num_layers: int) -> dict[str, Any]:
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


def internvl_chat_config(llm_config: dict[str, Any], num_layers: int, template: str) -> dict[str, Any]:
    """config.json body of an InternVLChatModel (remote code)."""
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": dict(INTERNVL_AUTO_MAP),
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
        "vision_config": intern_vit_config(num_layers),
    }


def internvl_hf_config(num_layers: int) -> dict[str, Any]:
    """config.json body of transformers' InternVLForConditionalGeneration (Qwen2 text model)."""
    text = llama_like_config("qwen2", "Qwen2ForCausalLM", num_layers, bias=True)
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


def qwen2_vl_config(num_layers: int, v25: bool) -> dict[str, Any]:
    """config.json body of Qwen2-VL / Qwen2.5-VL, in the Hub's flat layout (LLM fields at the top level)."""
    arch = "Qwen2_5_VLForConditionalGeneration" if v25 else "Qwen2VLForConditionalGeneration"
    cfg = llama_like_config("qwen2", arch, num_layers, bias=True)
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


def llava_config(num_layers: int) -> dict[str, Any]:
    """config.json body of llava-hf's LlavaForConditionalGeneration (llava-1.5 style, Llama LLM).

    ``text_config`` names its ``architectures``: LMDeploy builds the LLM from it and fails without.
    """
    text = llama_like_config("llama", "LlamaForCausalLM", num_layers, bias=False)
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
