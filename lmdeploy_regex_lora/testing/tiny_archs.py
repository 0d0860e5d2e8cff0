"""Tiny, deterministic checkpoints of the architectures issue 11 covers, in each Hub model's layout.

Weights come from transformers' own model classes (``save_pretrained``: the checkpoint names transformers
writes), every tensor drawn again from :func:`.tiny_models.random_tensor` so the same (arch, seed) gives
bit-identical files; what transformers has no class for (InternViT, MiniCPM-V's resampler) is written by
hand. Renames after ``save_pretrained`` bring names to the Hub's where transformers writes others
(Gemma 3's SigLIP tower, Intern-S1, MiniCPM-V's ``vpm``), and fused MoE experts into the Hub's layout
LMDeploy reads. Configs: :mod:`.tiny_arch_configs`. LMDeploy builds DeepSeek on CPU only under the
test-only stand-ins of tests/support/cpu_standins.py.

Phi-3 (InternVL2-4B's LLM) is built with grouped KV heads (4/2, Phi-3-mini has 32/32), so its fused
``qkv_proj`` splits unevenly, a stronger check.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import re
import tempfile
from collections.abc import Callable
from typing import Any

from . import tiny_arch_configs as c
from .tiny_configs import (
    HIDDEN,
    INTERN_VIT_CONFIG_PY,
    INTERNLM2_CONFIG_PY,
    INTERNVL_CHAT_CONFIG_PY,
    internvl_chat_config,
)
from .tiny_models import _intern_vit_spec, random_tensor

__all__ = ["ARCHS", "make_arch", "detect_new_arch"]

_Made = tuple[dict[str, Any], dict[str, str], dict[str, Any]]


def _hf_state(config: dict[str, Any], cls_name: str, seed: int) -> dict[str, Any]:
    """What transformers' ``cls_name`` built from ``config`` writes with ``save_pretrained``, every tensor
    replaced by :func:`random_tensor` of its name first."""
    import torch
    import transformers
    from safetensors.torch import load_file

    cfg = copy.deepcopy(config)
    obj = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = getattr(transformers, cls_name)(obj).float().eval()
    with torch.no_grad():
        seen = set()
        for name, t in model.state_dict(keep_vars=True).items():
            if id(t) not in seen and t.is_floating_point():
                seen.add(id(t))
                t.data.copy_(random_tensor(name, tuple(t.shape), seed))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        state: dict[str, Any] = {}
        for f in sorted(pathlib.Path(tmp).glob("*.safetensors")):
            state.update(load_file(str(f)))
    return state


def _rename(state: dict[str, Any], rules: list[tuple[str, str]]) -> dict[str, Any]:
    out = {}
    for k, v in state.items():
        for old, new in rules:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def _fuse_experts(state: dict[str, Any], layout: str) -> dict[str, Any]:
    """Routed experts in the Hub's fused 3-D layout: 'EHI' gate_up (E, hidden, 2I) / down (E, I, hidden)
    (Qwen3-VL-MoE, Llama 4), 'EIH' gate_up (E, 2I, hidden) / down (E, hidden, I) (Qwen3.5-MoE)."""
    import torch

    pat = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    groups: dict[str, dict[str, dict[int, Any]]] = {}
    out = {}
    for k, v in state.items():
        m = pat.match(k)
        if m:
            groups.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = v
        elif k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            hidden_first = v.shape[1] == HIDDEN
            current = ("EHI" if hidden_first else "EIH") if k.endswith("gate_up_proj") else \
                ("EIH" if hidden_first else "EHI")
            out[k] = v if current == layout else v.transpose(1, 2).contiguous()
        else:
            out[k] = v
    for prefix, parts in groups.items():
        n = len(parts["down_proj"])
        gate_up = torch.cat([torch.stack([parts["gate_proj"][i] for i in range(n)]),
                             torch.stack([parts["up_proj"][i] for i in range(n)])], dim=1)
        down = torch.stack([parts["down_proj"][i] for i in range(n)])
        if layout == "EHI":
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        out[f"{prefix}.gate_up_proj"], out[f"{prefix}.down_proj"] = gate_up.contiguous(), down.contiguous()
    return out


def _hf(cfg_fn: Callable[[int], dict], cls: str, rules=(), fuse: str | None = None) -> Callable[[int, int], _Made]:
    def make(n: int, seed: int) -> _Made:
        cfg = cfg_fn(n)
        state = _rename(_hf_state(cfg, cls, seed), list(rules))
        return cfg, {}, _fuse_experts(state, fuse) if fuse else state
    return make


def _spec_state(spec: dict[str, tuple[int, ...]], seed: int) -> dict[str, Any]:
    return {k: random_tensor(k, shape, seed) for k, shape in spec.items()}


def _internvl_chat(llm_fn: Callable[[int], dict], llm_cls: str, template: str) -> Callable[[int, int], _Made]:
    """InternVLChatModel (remote code): InternViT + ``mlp1`` + a transformers LLM under ``language_model.``."""
    def make(n: int, seed: int) -> _Made:
        llm = llm_fn(n)
        llm.pop("torch_dtype", None)
        state = {**_spec_state(_intern_vit_spec(n), seed),
                 **{f"language_model.{k}": v for k, v in _hf_state(llm, llm_cls, seed).items()}}
        files = {"configuration_internlm2.py": INTERNLM2_CONFIG_PY, "configuration_intern_vit.py": INTERN_VIT_CONFIG_PY,
                 "configuration_internvl_chat.py": INTERNVL_CHAT_CONFIG_PY}
        return internvl_chat_config(llm, n, template), files, state
    return make


def _qwen3_text(n: int) -> dict[str, Any]:
    return c.text_cfg("qwen3", "Qwen3ForCausalLM", n, attention_bias=False, use_sliding_window=False,
                      sliding_window=None, max_window_layers=n)


def _internvl3_hf(n: int, seed: int) -> _Made:
    # OpenGVLab/InternVL3_5-1B-HF style: InternVLForConditionalGeneration with a Qwen3 text model
    cfg = c.internvl_hf_cfg(n, _qwen3_text(n), "InternVLForConditionalGeneration", "internvl", "internvl_vision")
    return cfg, {}, _hf_state(cfg, "InternVLForConditionalGeneration", seed)


def _interns1(n: int, seed: int) -> _Made:
    # internlm/Intern-S1-mini (remote code): InternVL3-hf's structure under Intern-S1's checkpoint names
    cfg = c.internvl_hf_cfg(n, _qwen3_text(n), "InternS1ForConditionalGeneration", "interns1", "interns1_vision")
    cfg["auto_map"] = {"AutoConfig": "configuration_interns1.InternS1Config",
                       "AutoModel": "modeling_interns1.InternS1Model",
                       "AutoModelForCausalLM": "modeling_interns1.InternS1ForConditionalGeneration"}
    hf_cfg = c.internvl_hf_cfg(n, _qwen3_text(n), "InternVLForConditionalGeneration", "internvl", "internvl_vision")
    state = _rename(_hf_state(hf_cfg, "InternVLForConditionalGeneration", seed), [
        ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")])
    return cfg, {"configuration_interns1.py": c.INTERNS1_CONFIG_PY}, state


def _minicpmv26(n: int, seed: int) -> _Made:
    # openbmb/MiniCPM-V-2_6 (remote code): a Qwen2 LLM under llm.*, SigLIP under vpm.*, resampler.*
    cfg = c.base_llm("MiniCPMV", "minicpmv", n, attention_bias=True, use_sliding_window=False, sliding_window=None,
                     max_window_layers=n, rope_theta=1000000.0)
    cfg.pop("head_dim")
    cfg.update(auto_map={"AutoConfig": "configuration_minicpm.MiniCPMVConfig",
                         "AutoModel": "modeling_minicpmv.MiniCPMV",
                         "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV"},
               version=2.6, query_num=4, image_size=56, patch_size=14, drop_vision_last_layer=False,
               batch_vision_input=True, use_image_id=True, vision_batch_size=16, slice_mode=True,
               slice_config={"max_slice_nums": 9, "model_type": "minicpmv"},
               vision_config={"model_type": "siglip", "hidden_size": c.VIT_HIDDEN, "image_size": 56,
                              "intermediate_size": c.VIT_INTER, "num_attention_heads": c.VIT_HEADS,
                              "num_hidden_layers": n, "patch_size": 14})
    llm = c.base_llm("Qwen2ForCausalLM", "qwen2", n, use_sliding_window=False, sliding_window=None,
                     max_window_layers=n, rope_theta=1000000.0)
    llm.pop("head_dim")
    state = {f"llm.{k}": v for k, v in _hf_state(llm, "Qwen2ForCausalLM", seed).items()}
    vis = {"model_type": "siglip_vision_model", "vision_use_head": False,
           **{k: v for k, v in cfg["vision_config"].items() if k != "model_type"}}
    # transformers 5 saves SiglipVisionModel without its vision_model level; MiniCPM-V's vpm *is* that level
    state.update({"vpm." + k.removeprefix("vision_model."): v for k, v in _hf_state(vis, "SiglipVisionModel",
                                                                                    seed).items()})
    e, kv = HIDDEN, c.VIT_HIDDEN
    state.update(_spec_state({
        "resampler.query": (cfg["query_num"], e), "resampler.kv_proj.weight": (e, kv),
        "resampler.attn.in_proj_weight": (3 * e, e), "resampler.attn.in_proj_bias": (3 * e,),
        "resampler.attn.out_proj.weight": (e, e), "resampler.attn.out_proj.bias": (e,),
        **{f"resampler.{ln}.{p}": (e,) for ln in ("ln_q", "ln_kv", "ln_post") for p in ("weight", "bias")},
        "resampler.proj": (e, e)}, seed))
    return cfg, {"configuration_minicpm.py": c.MINICPMV_CONFIG_PY}, state


_MAKERS: dict[str, Callable[[int, int], _Made]] = {
    "qwen3": _hf(c.qwen3_cfg, "Qwen3ForCausalLM"),
    "qwen3_moe": _hf(c.qwen3_moe_cfg, "Qwen3MoeForCausalLM"),
    "mistral": _hf(c.mistral_cfg, "MistralForCausalLM"),
    "mixtral": _hf(c.mixtral_cfg, "MixtralForCausalLM"),
    "llama3": _hf(c.llama3_cfg, "LlamaForCausalLM"),
    "gemma2": _hf(c.gemma2_cfg, "Gemma2ForCausalLM"),
    "gemma3_text": _hf(c.gemma3_text_cfg, "Gemma3ForCausalLM"),
    "glm4": _hf(c.glm4_cfg, "Glm4ForCausalLM"),
    "glm4_moe": _hf(c.glm4_moe_cfg, "Glm4MoeForCausalLM"),
    "deepseek_v2": _hf(c.deepseek_v2_cfg, "DeepseekV2ForCausalLM"),
    "deepseek_v3": _hf(c.deepseek_v3_cfg, "DeepseekV3ForCausalLM"),
    "qwen3_vl": _hf(lambda n: c.qwen3_vl_cfg(n, False), "Qwen3VLForConditionalGeneration"),
    "qwen3_vl_moe": _hf(lambda n: c.qwen3_vl_cfg(n, True), "Qwen3VLMoeForConditionalGeneration", fuse="EHI"),
    "qwen3_5": _hf(lambda n: c.qwen3_5_cfg(n, False), "Qwen3_5ForConditionalGeneration"),
    "qwen3_5_moe": _hf(lambda n: c.qwen3_5_cfg(n, True), "Qwen3_5MoeForConditionalGeneration", fuse="EIH"),
    "glm4_1v": _hf(c.glm4v_cfg, "Glm4vForConditionalGeneration"),
    "gemma3_vl": _hf(c.gemma3_vl_cfg, "Gemma3ForConditionalGeneration",
                     rules=[("vision_tower.", "vision_tower.vision_model.")]),
    "llama4": _hf(c.llama4_cfg, "Llama4ForConditionalGeneration", fuse="EHI"),
    "internvl_qwen3": _internvl_chat(c.qwen3_cfg, "Qwen3ForCausalLM", "internvl2_5"),
    "internvl_phi3": _internvl_chat(c.phi3_llm, "Phi3ForCausalLM", "phi3-chat"),
    "internvl3_hf_qwen3": _internvl3_hf,
    "interns1": _interns1,
    "minicpmv26": _minicpmv26,
}
ARCHS: tuple[str, ...] = tuple(_MAKERS)


def make_arch(arch: str, out_dir: str | os.PathLike, *, seed: int = 0, num_layers: int = 2) -> pathlib.Path:
    """Write a complete tiny model folder for ``arch``; the same (arch, seed, num_layers) gives the same bytes."""
    from safetensors.torch import save_file

    if arch not in _MAKERS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg, files, state = _MAKERS[arch](num_layers, seed)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for fname, text in files.items():
        (out / fname).write_text(text)
    gen = {k: cfg.get(k, v) for k, v in c.IDS.items()}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in sorted(state.items())}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "tiny_arch").write_text(arch + "\n")  # which builder wrote it (detect_new_arch)
    return out


def detect_new_arch(model_dir: str | os.PathLike) -> str | None:
    """The :data:`ARCHS` name of a folder written by :func:`make_arch`, else None."""
    marker = pathlib.Path(model_dir) / "tiny_arch"
    return marker.read_text().strip() if marker.is_file() else None
