"""The hand-written naming and row tables the package used before issue 11, kept as a test oracle only.

Until issue 11 the package mapped Hugging Face names onto LMDeploy's modules with per-model tables
(:data:`NAMING_SCHEMES`, ``packed_modules_mapping`` walking, :func:`_conventional_packing`,
:data:`_INTERLEAVED_QKV_CLASSES`) and cut LoRA tensors for a TP rank by mirroring LMDeploy's loaders
(:func:`deinterleave_qkv_rows`, :func:`shard_lora`). The package now reads all of it from LMDeploy's own
``load_weights`` (``serve/weight_trace.py``). The tables stay here for two checks: they must agree with the
trace where they were right (``tests/test_weight_trace.py``), and :class:`HandModelMap` (a ``ModelMap`` made
from them) is the mutation that shows the derivation is what makes Qwen3-VL and Phi-3 load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmdeploy_regex_lora.errors import AdapterError
from lmdeploy_regex_lora.serve.model_map import ModelMap
from lmdeploy_regex_lora.serve.naming import Naming
from lmdeploy_regex_lora.serve.sites import LM_HEAD, NON_TOKEN, PER_REQUEST, PLAIN_LINEAR, Serving, Site
from lmdeploy_regex_lora.serve.weight_trace import to_spans

_INTERLEAVED_QKV_CLASSES = {"InternLM2ForCausalLM", "InternLM2ForRewardModel"}

NAMING_SCHEMES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("checkpoint names", ()),
    ("transformers>=4.52 names (model.language_model.*, wrapper style)", (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower."),
        ("model.vision_model.", "vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("lm_head", "language_model.lm_head"),
    )),
    ("transformers>=5 names (model.language_model.*, LLaVA CLIP tower without vision_model)", (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("lm_head", "language_model.lm_head"),
    )),
    ("transformers>=4.52 names (model.language_model.*, Qwen2-VL style)", (
        ("model.language_model.", "model."),
        ("model.visual.", "visual."),
    )),
)


@dataclass(frozen=True)
class OldSite:
    hf_name: str
    lmdeploy_module: str
    slot: str
    in_features: int
    out_features: int
    base_slice: tuple[int, int]
    serving: Serving
    interleaved_qkv: tuple[int, int, int] | None = None
    lora_capable: bool = True


def rename(name: str, rules) -> str:
    for src, dst in rules:
        if src.endswith("."):
            if name.startswith(src):
                return dst + name[len(src):]
        elif name == src or name.startswith(src + "."):
            return dst + name[len(src):]
    return name


def unrename(name: str, rules) -> str:
    return rename(name, tuple((dst, src) for src, dst in rules))


def _conventional_packing(leaf: str, mod) -> list[str] | None:
    outs = getattr(mod, "all_out_features", None)
    if leaf == "qkv_proj" and hasattr(mod, "qkv_split_section") and outs is not None and len(outs) == 3:
        return ["q_proj", "k_proj", "v_proj"]
    if leaf == "gate_up_proj" and outs is not None and len(outs) == 2:
        return ["gate_proj", "up_proj"]
    return None


def unsharded_sizes(mod) -> tuple[int, list[int]]:
    local_outs = [int(o) for o in getattr(mod, "all_out_features", None) or [mod.out_features]]
    world = int(getattr(mod, "tp", 1)) if getattr(mod, "is_tp", False) else 1
    if world <= 1:
        return int(mod.in_features), local_outs
    if not mod.colwise:
        return int(mod.in_features) * world, local_outs
    sections = getattr(mod, "qkv_split_section", None)
    if sections is None and hasattr(mod, "all_out_features"):
        sections = getattr(mod, "split_section", None)
    if sections is not None and len(sections) == len(local_outs):
        return int(mod.in_features), [int(s) for s in sections]
    return int(mod.in_features), [o * world for o in local_outs]


def old_sites(model: torch.nn.Module) -> dict[str, OldSite]:
    """The pre-issue-11 ``ModelMap(model).sites``: every linear by (assumed) Hugging Face name."""
    from lmdeploy.pytorch.nn.linear.base import LinearBase

    modules = dict(model.named_modules())
    backbone = None
    try:
        emb = model.get_input_embeddings()
        backbone = next(n.rsplit(".", 1)[0] if "." in n else "" for n, m in modules.items() if m is emb)
    except Exception:  # GLM-4's raises: the old table then called every layer non-token
        pass
    sites: dict[str, OldSite] = {}
    for name, mod in modules.items():
        if isinstance(mod, LinearBase):
            _add_linear(sites, name, mod, modules, backbone, model)
        elif isinstance(mod, torch.nn.Linear):
            sites[name] = OldSite(name, name, name.rsplit(".", 1)[-1], mod.in_features, mod.out_features,
                                  (0, mod.out_features), PLAIN_LINEAR, lora_capable=False)
    return sites


def _packing(name: str, modules: dict, model) -> list[str] | None:
    leaf = name.rsplit(".", 1)[-1]
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        anc = modules.get(".".join(parts[:i]) if i else "")
        mapping = getattr(anc, "packed_modules_mapping", None) if anc is not None else None
        if isinstance(mapping, dict) and mapping:
            return list(mapping[leaf]) if leaf in mapping else None
    return None


def _add_linear(sites: dict, name: str, mod, modules: dict, backbone: str | None, model) -> None:
    parent, _, leaf = name.rpartition(".")
    if backbone is not None and (backbone == "" or name.startswith(backbone + ".")):
        serving = PER_REQUEST
    elif leaf in ("lm_head", "output"):
        serving = LM_HEAD
    else:
        serving = NON_TOKEN
    subs = _packing(name, modules, model) or _conventional_packing(leaf, mod)
    prefix = parent + "." if parent else ""
    full_in, full_outs = unsharded_sizes(mod)
    if subs is not None:
        start = 0
        for sub, out, full_out in zip(subs, list(mod.all_out_features), full_outs, strict=True):
            sites[prefix + sub] = OldSite(prefix + sub, name, sub, full_in, full_out, (start, start + out), serving)
            start += out
        return
    interleaved = None
    owners = [modules.get(".".join(name.split(".")[:i])) for i in range(name.count(".") + 1)]
    if leaf == "wqkv" and any(type(o).__name__ in _INTERLEAVED_QKV_CLASSES for o in owners if o is not None):
        head = mod.head_size
        q, kv = mod.qkv_split_section[0] // head, mod.qkv_split_section[1] // head
        interleaved = (kv, q // kv, head)
    sites[name] = OldSite(name, name, leaf, full_in, sum(full_outs), (0, mod.out_features), serving, interleaved)


def deinterleave_qkv_rows(b: torch.Tensor, num_kv_heads: int, q_per_kv: int, head_dim: int) -> torch.Tensor:
    """InternLM2 ``wqkv`` rows are (kv_head, q_per_kv + 2, head_dim); LMDeploy stores them as [Q; K; V]."""
    grouped = b.unflatten(0, (num_kv_heads, q_per_kv + 2, head_dim))
    q = grouped[:, :q_per_kv].flatten(0, 2)
    k = grouped[:, q_per_kv].flatten(0, 1)
    v = grouped[:, q_per_kv + 1].flatten(0, 1)
    return torch.cat([q, k, v], dim=0)


def shard_lora(mod, base_slice: tuple[int, int], a: torch.Tensor, b: torch.Tensor):
    """This TP rank's lora_A and lora_B, cut by mirroring LMDeploy's base loaders (the old slots.shard_lora)."""
    from lmdeploy.pytorch.nn.utils import chunk_aligned

    world, rank = (int(mod.tp), int(mod.tp_rank)) if getattr(mod, "is_tp", False) else (1, 0)
    if world == 1:
        return a, b
    if not mod.colwise:
        return chunk_aligned(a, world, 1, getattr(mod, "tp_align_size", 1))[rank], b
    outs = [int(o) for o in getattr(mod, "all_out_features", None) or [mod.out_features]]
    qkv = hasattr(mod, "qkv_split_section")
    merged = not qkv and hasattr(mod, "all_out_features") and hasattr(mod, "split_section")
    if not qkv and not merged:
        return a, chunk_aligned(b, world, 0, getattr(mod, "tp_align_size", 1))[rank]

    def cut(part, index):
        if not qkv:
            return part.chunk(world, 0)[rank]
        chunks, chunk = world, rank
        replicas = int(getattr(mod, "num_replicate_kv_heads", 1) or 1)
        if replicas > 1 and index in (1, 2):
            chunks, chunk = world // replicas, rank // replicas
        align = mod.head_size if index in (0, 1) else mod.head_size_v
        return chunk_aligned(part, chunks, 0, align)[chunk]

    start, stop = base_slice
    if (start, stop) != (0, sum(outs)):
        offsets = [sum(outs[:i]) for i in range(len(outs))]
        index = next(i for i, (o, n) in enumerate(zip(offsets, outs, strict=True)) if (o, o + n) == (start, stop))
        return a, cut(b, index)
    sections = mod.qkv_split_section if qkv else mod.split_section
    return a, torch.cat([cut(part, i) for i, part in enumerate(b.split(list(sections), 0))], 0)


def as_site(model: torch.nn.Module, old: OldSite) -> Site:
    """The old site with the gathers its tables implied (probes pushed through deinterleave + shard_lora)."""
    mod = model.get_submodule(old.lmdeploy_module)
    rows = torch.arange(old.out_features, dtype=torch.float64).view(-1, 1)
    cols = torch.arange(old.in_features, dtype=torch.float64).view(1, -1)
    if old.interleaved_qkv is not None:
        rows = deinterleave_qkv_rows(rows, *old.interleaved_qkv)
    a, b = shard_lora(mod, old.base_slice, cols, rows)
    b_rows, a_cols = b.flatten().long(), a.flatten().long()
    return Site(old.hf_name, old.lmdeploy_module, old.slot, old.in_features, old.out_features, old.base_slice,
                old.serving, old.lora_capable, "plain-linear" if old.serving == PLAIN_LINEAR else "lora-linear",
                rows=to_spans(torch.arange(len(b_rows)), b_rows), cols=to_spans(torch.arange(len(a_cols)), a_cols))


class HandModelMap(ModelMap):
    """A ``ModelMap`` whose naming and rows come from the old hand tables instead of LMDeploy's loader."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
        self.model, self.modules, self.dtype = model, dict(model.named_modules()), dtype
        self.model_dir, self.aliases = None, {}
        self._old = old_sites(model)
        self._hand = {n: as_site(model, s) for n, s in self._old.items()}
        self.candidates = {n: (s.out_features, s.in_features) for n, s in self._hand.items()}

    def sites_for(self, names):
        return {n: self._hand[n] for n in names}

    def not_linear(self, names):
        return set()

    def output_layer(self):
        return next((n for n, s in self._hand.items() if s.serving == LM_HEAD), None)

    def naming_for(self, adapter, file, tensor_modules):
        tensor_modules = list(tensor_modules)
        for label, rules in NAMING_SCHEMES:
            if all(rename(m, rules) in self._hand for m in tensor_modules):
                return Naming(label, {m: rename(m, rules) for m in tensor_modules}, lambda c, r=rules: unrename(c, r))
        raise AdapterError(f"{len(tensor_modules)} LoRA tensors name modules this model does not have as linear "
                           "layers (hand tables).", adapter=adapter, file=file,
                           fix="check that the adapter was trained on this base model.")
