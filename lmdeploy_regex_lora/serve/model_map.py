"""Mapping Hugging Face module names to LMDeploy's modules.

LMDeploy builds its own module tree: it packs ``q/k/v_proj`` into ``qkv_proj`` and ``gate/up_proj``
(InternLM2: ``w1/w3``) into ``gate_up_proj``, keeps InternLM2's ``wqkv`` but de-interleaves its rows,
and otherwise keeps the checkpoint's names. This module walks that tree once and lists every linear
layer the Hugging Face model had (a :class:`Site`), with where its LoRA slot would go and whether
LMDeploy can serve LoRA on it per request. Names an adapter was trained under with newer
transformers (``model.language_model.*``) are translated by :data:`NAMING_SCHEMES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from ..errors import AdapterError

if TYPE_CHECKING:  # only ModelMap needs torch; CheckpointMap (merge) must not import it
    import torch


class Serving(str, Enum):
    """How a linear layer takes LoRA. A ``str`` enum: plans and JSON keep the plain names."""

    PER_REQUEST = "per-request"  # a LoRA slot on token rows: each sequence's own adapter
    LM_HEAD = "lm-head"  # a slot that maps logits rows to sequences itself (lm_head.RowLoRA)
    NON_TOKEN = "non-token-rows"  # a layer on vision/projector rows (a site's kind, not a way to serve)
    PLAIN_LINEAR = "plain-linear"  # a torch.nn.Linear: LMDeploy has no LoRA slot on it
    #: A slot on vision/projector rows: each image's rows use its sequence's adapter (vision.ImageRowLoRA).
    IMAGE_ROWS = "per-request-image"
    #: Only with LMDEPLOY_REGEX_LORA_FOLD_VISION=1: the delta is folded into the base weight at load time,
    #: so every request sees it (plan.build_folds).
    FOLDED = "folded"

    def __str__(self) -> str:
        return self.value


PER_REQUEST, LM_HEAD, NON_TOKEN, PLAIN_LINEAR, IMAGE_ROWS, FOLDED = (
    Serving.PER_REQUEST, Serving.LM_HEAD, Serving.NON_TOKEN, Serving.PLAIN_LINEAR, Serving.IMAGE_ROWS, Serving.FOLDED)

# Model classes (LMDeploy's) whose fused ``wqkv`` stores rows interleaved per KV head in the
# checkpoint: (kv_head, q_per_kv + 2, head_dim). LMDeploy's own LoRA loader for InternLM2 reorders
# lora_B the same way it reorders the base weight.
_INTERLEAVED_QKV_CLASSES = {"InternLM2ForCausalLM", "InternLM2ForRewardModel"}

#: Prefix rewrites from the names an adapter may carry to the checkpoint names LMDeploy uses,
#: tried in order; the first under which every tensor of the adapter lands wins.
NAMING_SCHEMES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("checkpoint names", ()),
    ("transformers>=4.52 names (model.language_model.*, wrapper style)", (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower."),
        ("model.vision_model.", "vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("lm_head", "language_model.lm_head"),
    )),
    # transformers 5 dropped CLIPVisionModel's `vision_model` level: LLaVA's tower is `model.vision_tower.encoder.*`.
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
class Site:
    """One Hugging Face linear layer as LMDeploy holds it."""

    hf_name: str
    lmdeploy_module: str
    slot: str
    in_features: int  # unsharded (the adapter's lora_A/lora_B sizes), see unsharded_sizes
    out_features: int
    base_slice: tuple[int, int]  # this TP rank's rows of the LMDeploy weight
    serving: Serving
    #: (num_kv_heads, q_heads_per_kv, head_dim) when lora_B rows must be de-interleaved.
    interleaved_qkv: tuple[int, int, int] | None = None
    lora_capable: bool = True


def _conventional_packing(leaf: str, mod) -> list[str] | None:
    """Packing that a model's ``load_weights`` does without declaring it (e.g. LLaVA's CLIP and InternVL-hf's
    vision attention load ``q/k/v_proj`` into ``qkv_proj``): LMDeploy's stacked-params naming convention."""
    outs = getattr(mod, "all_out_features", None)
    if leaf == "qkv_proj" and hasattr(mod, "qkv_split_section") and outs is not None and len(outs) == 3:
        return ["q_proj", "k_proj", "v_proj"]
    if leaf == "gate_up_proj" and outs is not None and len(outs) == 2:
        return ["gate_proj", "up_proj"]
    return None


def unsharded_sizes(mod) -> tuple[int, list[int]]:
    """(in_features, out_features per packed section) of ``mod`` before tensor-parallel sharding.

    Adapters hold full-size tensors while each TP rank holds a shard, so sites carry the full sizes
    (what an adapter's shapes are checked against) and the local ``base_slice`` (where its rows go).
    LMDeploy records the full sections of merged/QKV linears; a plain sharded linear is assumed split
    evenly (``local * tp``), as LMDeploy's own LoRA loader assumes too; an uneven split then fails the
    shape check loudly rather than loading wrong rows.
    """
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


def rename(name: str, rules: tuple[tuple[str, str], ...]) -> str:
    """Apply the first matching prefix rule (a rule without a trailing dot matches a whole name part)."""
    for src, dst in rules:
        if src.endswith("."):
            if name.startswith(src):
                return dst + name[len(src):]
        elif name == src or name.startswith(src + "."):
            return dst + name[len(src):]
    return name


def unrename(name: str, rules: tuple[tuple[str, str], ...]) -> str:
    """The inverse of :func:`rename`: checkpoint name -> the name under the scheme."""
    return rename(name, tuple((dst, src) for src, dst in rules))


class ModelMap:
    """Every linear layer of the served model, by Hugging Face (checkpoint) name."""

    def __init__(self, model: torch.nn.Module) -> None:
        import torch
        from lmdeploy.pytorch.nn.linear.base import LinearBase

        self.model = model
        self.sites: dict[str, Site] = {}
        self.modules = modules = dict(model.named_modules())
        backbone = self._backbone_prefix(model, modules)
        for name, mod in modules.items():
            if isinstance(mod, LinearBase):
                self._add_lmdeploy_linear(name, mod, modules, backbone)
            elif isinstance(mod, torch.nn.Linear):
                self.sites[name] = Site(name, name, name.rsplit(".", 1)[-1], mod.in_features, mod.out_features,
                                        (0, mod.out_features), PLAIN_LINEAR, lora_capable=False)

    @staticmethod
    def _backbone_prefix(model: torch.nn.Module, modules: dict[str, torch.nn.Module]) -> str | None:
        """The text decoder: the parent of the input embedding. Its linears run on token rows."""
        emb = None
        getter = getattr(model, "get_input_embeddings", None)
        if callable(getter):
            try:
                emb = getter()
            except Exception:
                emb = None
        if emb is not None:
            for name, mod in modules.items():
                if mod is emb:
                    return name.rsplit(".", 1)[0] if "." in name else ""
        return None

    def _packing(self, name: str, modules: dict[str, torch.nn.Module]) -> tuple[list[str] | None, torch.nn.Module]:
        """Sub-module names packed into ``name``, from the nearest ancestor's ``packed_modules_mapping``."""
        leaf = name.rsplit(".", 1)[-1]
        parts = name.split(".")
        for i in range(len(parts) - 1, -1, -1):
            anc = modules.get(".".join(parts[:i]) if i else "")
            mapping = getattr(anc, "packed_modules_mapping", None) if anc is not None else None
            if isinstance(mapping, dict) and mapping:
                return (list(mapping[leaf]) if leaf in mapping else None), anc
        return None, self.model

    def _owner_class(self, name: str, modules: dict[str, torch.nn.Module]) -> str:
        parts = name.split(".")
        for i in range(len(parts) - 1, -1, -1):
            anc = modules.get(".".join(parts[:i]) if i else "")
            if anc is not None and type(anc).__name__ in _INTERLEAVED_QKV_CLASSES:
                return type(anc).__name__
        return ""

    def _add_lmdeploy_linear(self, name: str, mod, modules, backbone: str | None) -> None:
        parent, _, leaf = name.rpartition(".")
        if backbone is not None and (backbone == "" or name.startswith(backbone + ".")):
            serving = PER_REQUEST
        elif leaf in ("lm_head", "output"):
            serving = LM_HEAD
        else:
            serving = NON_TOKEN
        subs, _ = self._packing(name, modules)
        if subs is None:
            subs = _conventional_packing(leaf, mod)
        prefix = parent + "." if parent else ""
        full_in, full_outs = unsharded_sizes(mod)
        if subs is not None:
            outs = list(mod.all_out_features)
            start = 0
            for sub, out, full_out in zip(subs, outs, full_outs, strict=True):
                self.sites[prefix + sub] = Site(prefix + sub, name, sub, full_in, full_out, (start, start + out),
                                                serving)
                start += out
            return
        interleaved = None
        if leaf == "wqkv" and self._owner_class(name, modules):
            # The checkpoint's (and adapter's) interleave spans all heads, not this TP rank's share.
            head = mod.head_size
            q, kv = mod.qkv_split_section[0] // head, mod.qkv_split_section[1] // head
            interleaved = (kv, q // kv, head)
        self.sites[name] = Site(name, name, leaf, full_in, sum(full_outs), (0, mod.out_features),
                                serving, interleaved_qkv=interleaved)

    def base_weight(self, name: str) -> torch.Tensor | None:
        """The served weight of checkpoint module ``name`` (this rank's shard), or None when LMDeploy has none."""
        if not hasattr(self, "_params"):
            self._params = dict(self.model.named_parameters())
        param = self._params.get(f"{name}.weight")
        if param is None and name in self.sites:
            param = self._params.get(f"{self.sites[name].lmdeploy_module}.weight")
        return param

    def choose_scheme(self, adapter: str, file: str, tensor_modules: list[str]) -> tuple[str, tuple]:
        return choose_scheme(self.sites, adapter, file, tensor_modules)


def choose_scheme(sites: Mapping[str, Site], adapter: str, file: str, tensor_modules: list[str]
                  ) -> tuple[str, tuple]:
    """Pick the naming scheme under which every tensor of the adapter names a linear layer of the model."""
    best = None
    for label, rules in NAMING_SCHEMES:
        missing = [m for m in tensor_modules if rename(m, rules) not in sites]
        if not missing:
            return label, rules
        if best is None or len(missing) < len(best[2]):
            best = (label, rules, missing)
    label, rules, missing = best
    sample = ", ".join(repr(m) for m in missing[:3])
    raise AdapterError(
        f"{len(missing)} of its {len(tensor_modules)} LoRA tensors name modules this model does not have as "
        f"linear layers (e.g. {sample}; closest naming: {label}).",
        adapter=adapter, file=file, module=missing[0],
        fix="check that the adapter was trained on this base model; an adapter for another architecture or "
            "size cannot be served on it.")


class CheckpointMap:
    """The linear layers of a checkpoint as its safetensors headers list them, for ``merge``.

    A merge writes checkpoint tensors, so its sites are the checkpoint's own: every 2-D
    ``<module>.weight`` (``merge`` refuses a quantized one by name) under the checkpoint's name,
    with its full (out, in) shape, in the checkpoint's row order (InternLM2's interleaved ``wqkv``
    included: the adapter was trained on that order). It offers what :func:`~.plan.resolve_adapter`
    asks of a :class:`ModelMap` (sites, modules, naming, base weights), so naming, matching and every
    check of the adapter are serving's; neither LMDeploy nor torch is needed.
    """

    def __init__(self, sites: dict[str, Site]) -> None:
        self.sites = sites
        self.modules: dict = {}  # no LMDeploy modules: nothing is tensor-parallel here

    @classmethod
    def from_shapes(cls, weights: Mapping[str, tuple[int, ...] | list[int]]) -> CheckpointMap:
        sites = {}
        for key, shape in weights.items():
            if key.endswith(".weight") and len(shape) == 2:
                name = key[: -len(".weight")]
                sites[name] = Site(name, name, name.rsplit(".", 1)[-1], int(shape[1]), int(shape[0]),
                                   (0, int(shape[0])), PER_REQUEST)
        return cls(sites)

    def base_weight(self, name: str) -> None:
        """Base copies are compared by ``merge`` against the shard bytes themselves."""
        return None

    def choose_scheme(self, adapter: str, file: str, tensor_modules: list[str]) -> tuple[str, tuple]:
        return choose_scheme(self.sites, adapter, file, tensor_modules)
