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

from .tiny_configs import (
    BOS,
    EOS,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    INTERMEDIATE,
    INTERN_VIT_CONFIG_PY,
    INTERNLM2_CONFIG_PY,
    INTERNVL_CHAT_CONFIG_PY,
    KV_HEADS,
    MERGER_IN,
    NUM_POSITIONS,
    PAD,
    PATCH_SIZE,
    PROJ_IN,
    TEMPORAL_PATCH,
    VIT_HIDDEN,
    VIT_INTERMEDIATE,
    VOCAB,
    internlm2_config,
    internvl_chat_config,
    internvl_hf_config,
    llama_like_config,
    llava_config,
    qwen2_vl_config,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "ARCHS",
    "detect_arch",
    "make_tiny_model",
    "checkpoint_shapes",
    "checkpoint_linear_names",
]

ARCHS: tuple[str, ...] = ("qwen2", "llama", "internlm2", "internvl2_internlm2", "internvl_qwen2", "internvl_hf",
                          "qwen2_vl", "qwen2_5_vl", "llava")

# Module leaf names that hold 2-D weights but are embeddings, not Linear layers.
EMBEDDING_LEAVES = frozenset({"embed_tokens", "tok_embeddings", "wte", "word_embeddings", "position_embedding"})
# Of those, the token embeddings: LMDeploy builds them with ``padding_idx`` (CLIP's position table has none).
TOKEN_EMBEDDING_LEAVES = frozenset({"embed_tokens", "tok_embeddings", "wte", "word_embeddings"})

Spec = dict[str, tuple[int, ...]]
_Built = tuple[dict[str, Any], dict[str, str], Spec]

# ---------------------------------------------------------------------------------------------
# configs and checkpoint key specs
# ---------------------------------------------------------------------------------------------


def _decoder_spec(prefix: str, num_layers: int, embed: str, layer: dict[str, tuple[int, ...]], head: str) -> Spec:
    """Checkpoint keys of a decoder-only LM under ``prefix``: embedding, ``layer`` per layer, final norm, head."""
    spec: Spec = {f"{prefix}model.{embed}.weight": (VOCAB, HIDDEN)}
    for i in range(num_layers):
        spec.update({f"{prefix}model.layers.{i}.{name}": shape for name, shape in layer.items()})
    spec[f"{prefix}model.norm.weight"] = (HIDDEN,)
    spec[f"{prefix}{head}.weight"] = (VOCAB, HIDDEN)
    return spec


def _llama_like_spec(prefix: str, num_layers: int, bias: bool) -> Spec:
    """Checkpoint keys of a Qwen2 / Llama causal LM under ``prefix``."""
    q_out, kv_out = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    layer: dict[str, tuple[int, ...]] = {}
    for name, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
        layer[f"self_attn.{name}.weight"] = (out, HIDDEN)
        if bias:
            layer[f"self_attn.{name}.bias"] = (out,)
    layer.update({"self_attn.o_proj.weight": (HIDDEN, q_out), "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
                  "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN), "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
                  "input_layernorm.weight": (HIDDEN,), "post_attention_layernorm.weight": (HIDDEN,)})
    return _decoder_spec(prefix, num_layers, "embed_tokens", layer, "lm_head")


def _internlm2_spec(prefix: str, num_layers: int) -> Spec:
    """Checkpoint keys of InternLM2ForCausalLM (``wqkv`` rows: interleaved per kv head)."""
    layer = {"attention.wqkv.weight": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
             "attention.wo.weight": (HIDDEN, HEADS * HEAD_DIM), "feed_forward.w1.weight": (INTERMEDIATE, HIDDEN),
             "feed_forward.w3.weight": (INTERMEDIATE, HIDDEN), "feed_forward.w2.weight": (HIDDEN, INTERMEDIATE),
             "attention_norm.weight": (HIDDEN,), "ffn_norm.weight": (HIDDEN,)}
    return _decoder_spec(prefix, num_layers, "tok_embeddings", layer, "output")


def _vit_layers(prefix: str, num_layers: int, linears: tuple[tuple[str, tuple[int, int]], ...],
                norms: tuple[str, ...], scales: tuple[str, ...]) -> Spec:
    """A ViT's encoder layers: linears with biases, LayerNorms (weight and bias), per-channel layer scales."""
    c = VIT_HIDDEN
    spec: Spec = {}
    for i in range(num_layers):
        p = f"{prefix}.{i}."
        for name, shape in linears:
            spec[f"{p}{name}.weight"] = shape
            spec[f"{p}{name}.bias"] = (shape[0],)
        for name in norms:
            spec[f"{p}{name}.weight"] = (c,)
            spec[f"{p}{name}.bias"] = (c,)
        for name in scales:
            spec[f"{p}{name}"] = (c,)
    return spec


def _vit_embeddings(prefix: str, cls: str, patch: str, positions: str) -> Spec:
    """An InternViT-style embedding: a class token, a patch convolution (with bias), a position table."""
    c = VIT_HIDDEN
    return {f"{prefix}{cls}": (1, 1, c), f"{prefix}{patch}.weight": (c, 3, PATCH_SIZE, PATCH_SIZE),
            f"{prefix}{patch}.bias": (c,), f"{prefix}{positions}": (1, NUM_POSITIONS, c)}


def _pixel_shuffle_projector(norm: str, first: str, second: str) -> Spec:
    """InternVL's projector: LayerNorm over the pixel-shuffled features, Linear to the LLM, GELU, Linear."""
    return {f"{norm}.weight": (PROJ_IN,), f"{norm}.bias": (PROJ_IN,),
            f"{first}.weight": (HIDDEN, PROJ_IN), f"{first}.bias": (HIDDEN,),
            f"{second}.weight": (HIDDEN, HIDDEN), f"{second}.bias": (HIDDEN,)}


def _intern_vit_spec(num_layers: int) -> Spec:
    """Checkpoint keys of InternViT (``vision_model.*``) plus the ``mlp1`` projector."""
    c = VIT_HIDDEN
    spec = _vit_embeddings("vision_model.embeddings.", "class_embedding", "patch_embedding", "position_embedding")
    linears = (("attn.qkv", (3 * c, c)), ("attn.proj", (c, c)), ("mlp.fc1", (VIT_INTERMEDIATE, c)),
               ("mlp.fc2", (c, VIT_INTERMEDIATE)))
    spec.update(_vit_layers("vision_model.encoder.layers", num_layers, linears, ("norm1", "norm2"), ("ls1", "ls2")))
    spec.update(_pixel_shuffle_projector("mlp1.0", "mlp1.1", "mlp1.3"))
    return spec


def _internvl_hf_vision_spec(num_layers: int) -> Spec:
    """Checkpoint keys of transformers' InternVL vision tower + projector (names as transformers 5 saves)."""
    c = VIT_HIDDEN
    spec = _vit_embeddings("vision_tower.embeddings.", "cls_token", "patch_embeddings.projection",
                           "position_embeddings")
    linears = (("attention.q_proj", (c, c)), ("attention.k_proj", (c, c)), ("attention.v_proj", (c, c)),
               ("attention.projection_layer", (c, c)), ("mlp.fc1", (VIT_INTERMEDIATE, c)),
               ("mlp.fc2", (c, VIT_INTERMEDIATE)))
    spec.update(_vit_layers("vision_tower.encoder.layer", num_layers, linears, ("layernorm_before", "layernorm_after"),
                            ("lambda_1", "lambda_2")))
    p = "multi_modal_projector."
    spec.update(_pixel_shuffle_projector(f"{p}layer_norm", f"{p}linear_1", f"{p}linear_2"))
    return spec


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


def _build_qwen2(n: int) -> _Built:
    return llama_like_config("qwen2", "Qwen2ForCausalLM", n, True), {}, _llama_like_spec("", n, True)


def _build_llama(n: int) -> _Built:
    return llama_like_config("llama", "LlamaForCausalLM", n, False), {}, _llama_like_spec("", n, False)


def _build_internlm2(n: int) -> _Built:
    return internlm2_config(n), {"configuration_internlm2.py": INTERNLM2_CONFIG_PY}, _internlm2_spec("", n)


_INTERNVL_FILES = {
    "configuration_internlm2.py": INTERNLM2_CONFIG_PY,
    "configuration_intern_vit.py": INTERN_VIT_CONFIG_PY,
    "configuration_internvl_chat.py": INTERNVL_CHAT_CONFIG_PY,
}


def _build_internvl2_internlm2(n: int) -> _Built:
    llm = internlm2_config(n)
    llm.pop("torch_dtype")
    cfg = internvl_chat_config(llm, n, "internlm2-chat")
    spec = {**_intern_vit_spec(n), **_internlm2_spec("language_model.", n)}
    return cfg, dict(_INTERNVL_FILES), spec


def _build_internvl_qwen2(n: int) -> _Built:
    llm = llama_like_config("qwen2", "Qwen2ForCausalLM", n, True)
    llm.pop("torch_dtype")
    cfg = internvl_chat_config(llm, n, "internvl2_5")
    spec = {**_intern_vit_spec(n), **_llama_like_spec("language_model.", n, True)}
    return cfg, dict(_INTERNVL_FILES), spec


def _build_internvl_hf(n: int) -> _Built:
    spec = {**_internvl_hf_vision_spec(n), **_llama_like_spec("language_model.", n, True)}
    return internvl_hf_config(n), {}, spec


def _build_qwen2_vl(n: int) -> _Built:
    return qwen2_vl_config(n, v25=False), {}, {**_llama_like_spec("", n, True), **_qwen2_vl_vision_spec(n, False)}


def _build_qwen2_5_vl(n: int) -> _Built:
    return qwen2_vl_config(n, v25=True), {}, {**_llama_like_spec("", n, True), **_qwen2_vl_vision_spec(n, True)}


def _build_llava(n: int) -> _Built:
    return llava_config(n), {}, {**_clip_vision_spec(n), **_llama_like_spec("language_model.", n, False)}


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


def tensor_seed(seed: int, name: str) -> int:
    """Per-tensor seed, so a tensor's values depend on (seed, key) only, not on the layer count."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """std 0.02 for matrices/embeddings/biases; ~1 for norm weights and layer scales."""
    import torch

    gen = torch.Generator().manual_seed(tensor_seed(seed, name))
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
        name: random_tensor(name, shape, seed).contiguous() for name, shape in spec.items()
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# ---------------------------------------------------------------------------------------------
# checkpoint inspection
# ---------------------------------------------------------------------------------------------


def checkpoint_shapes(model_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Every tensor key of the folder's safetensors checkpoint(s) and its shape, from the headers only."""
    from ..safetensors_io import read_header

    folder = pathlib.Path(model_dir)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    headers = [read_header(str(file), what="checkpoint") for file in files]
    return {key: entry.shape for header in headers for key, entry in header.entries.items()}


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
