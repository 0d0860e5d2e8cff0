"""The resolved plan: which LMDeploy module gets which rank and scaling for which adapter, and why.

Data flows one way: configs and tensors in (:mod:`.adapter_config`, :mod:`.adapter_weights`), the
model's layout (:mod:`.model_map`), then this plan, plain data that tests and the CLI print, and
only then LMDeploy's modules are filled from it (:mod:`.slots`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from ..errors import AdapterError, Blame, where
from .config import AdapterConfig
from .matching import resolve_targets
from .model_map import FOLDED, IMAGE_ROWS, LM_HEAD, NON_TOKEN, PER_REQUEST, PLAIN_LINEAR, ModelMap, Serving, Site
from .naming import Naming
from .sites import local_weight
from .vision_policy import ENV_FOLD_VISION, FOLD_FIX, VisionPolicy, off_token_rows, vision_policy
from .weights import AdapterTensors, LoraPair

#: LMDeploy's Triton LoRA kernel sizes a block with ``tl.arange(0, max(16, max_rank))``: it must be a
#: power of two. The kernel masks rows past each adapter's own rank, so rounding up is exact.
MIN_KERNEL_BLOCK = 16
#: Opt-in: fold LoRA on routed MoE experts (which LMDeploy's fused MoE cannot serve per request) into their weights.
ENV_FOLD_EXPERTS = "LMDEPLOY_REGEX_LORA_FOLD_EXPERTS"


def kernel_block_rank(max_rank: int) -> int:
    block = MIN_KERNEL_BLOCK
    while block < max_rank:
        block *= 2
    return block


@dataclass(frozen=True)
class ModulePlan:
    """One adapter on one Hugging Face linear layer."""

    hf_name: str  # the name as the adapter (its trainer's model) has it
    lmdeploy_module: str
    slot: str
    rank: int
    alpha: float
    scaling: float
    serving: Serving
    reason: str


@dataclass
class AdapterPlan:
    name: str
    adapter_id: int
    path: str
    config_file: str
    weights_file: str
    target_modules: str | list[str]
    naming: str
    use_rslora: bool
    layer_rule: str | None
    pattern_rule: str | None
    modules: list[ModulePlan] = field(default_factory=list)


@dataclass
class SlotPlan:
    """One LoRA slot (``lora_adapters[slot]`` on an LMDeploy linear) shared by all adapters."""

    lmdeploy_module: str
    slot: str
    hf_name: str  # checkpoint name of the Hugging Face layer this slot stands for
    in_features: int
    out_features: int
    base_slice: tuple[int, int]
    ranks: list[int]  # per adapter id; id 0 is "no adapter" and always 0
    scalings: list[float]
    kernel_block_rank: int
    #: LM_HEAD and IMAGE_ROWS slots map their rows to requests themselves (lm_head.py, vision.py)
    serving: Serving = PER_REQUEST


@dataclass
class FoldPlan:
    """A layer folded because the operator chose to (vision tower and projector with
    ``LMDEPLOY_REGEX_LORA_FOLD_VISION=1``, routed MoE experts with ``LMDEPLOY_REGEX_LORA_FOLD_EXPERTS=1``):
    the one adapter that changes it is added to its base weight, for every request."""

    hf_name: str  # checkpoint name
    lmdeploy_module: str
    adapter: str
    adapter_id: int
    scaling: float
    rank: int
    base_slice: tuple[int, int]  # the rows of the LMDeploy weight this layer occupies (packed layers)
    serving: Serving = NON_TOKEN  # the site's kind: vision/projector rows, or MoE experts (ENV_FOLD_EXPERTS)


@dataclass
class LoadPlan:
    adapters: list[AdapterPlan]
    slots: list[SlotPlan]
    folds: list[FoldPlan] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"adapters": [asdict(a) for a in self.adapters], "slots": [asdict(s) for s in self.slots]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def render(self) -> str:
        """A table per adapter: module, slot, rank, alpha, scaling, why it matched."""
        lines = []
        for a in self.adapters:
            lines.append(f"adapter {a.name!r} (id {a.adapter_id}) from {a.path}")
            lines.append(f"  target_modules={a.target_modules!r}  naming: {a.naming}"
                         f"{'  use_rslora' if a.use_rslora else ''}")
            lines.append(f"  {'module (adapter name)':<56} {'LMDeploy slot':<44} {'r':>4} {'alpha':>7} {'scale':>8}")
            for m in a.modules:
                slot = f"{m.lmdeploy_module}[{m.slot}]"
                lines.append(f"  {m.hf_name:<56} {slot:<44} {m.rank:>4} {m.alpha:>7g} {m.scaling:>8.4g}  {m.reason}")
        for f in self.folds:
            why = (f"{ENV_FOLD_EXPERTS}=1: LMDeploy's fused MoE has no LoRA path" if f.serving == Serving.MOE_EXPERTS
                   else f"as {ENV_FOLD_VISION}=1 asks")
            lines.append(f"folded into the base weight of {f.lmdeploy_module} ({f.hf_name}) for every request: "
                         f"adapter {f.adapter!r} (r={f.rank}, scale={f.scaling:.4g}); {why}")
        images = sum(s.serving == IMAGE_ROWS for s in self.slots)
        if images:
            lines.append(f"{images} vision/projector slots serve per request: each image's rows use its own "
                         "sequence's adapter")
        lines.append(f"{len(self.slots)} LoRA slots; adapter ids: "
                     + ", ".join(f"{a.adapter_id}={a.name}" for a in self.adapters) + " (0 = no adapter)")
        return "\n".join(lines)


@dataclass
class ResolvedAdapter:
    """An adapter after matching: its plan and, per site (checkpoint name), the module plan and tensors."""

    plan: AdapterPlan
    by_site: dict[str, tuple[ModulePlan, LoraPair]]
    naming: Naming | None = None  # how its module names map onto the checkpoint's (None: a skipped placeholder)


@dataclass
class ResolvedLoad:
    """What one load hands from planning to the slots: the printable plan, every adapter's tensors by site,
    and the model's sites (where each layer's rows go)."""

    plan: LoadPlan
    adapters: list[ResolvedAdapter]
    sites: dict[str, Site]

    def slot_where(self, slot: SlotPlan) -> dict[str, str | None]:
        """The :func:`~lmdeploy_regex_lora.errors.where` context of a slot: its module, the adapters that
        fill it, and their weights file when there is one adapter."""
        owners = [ra for ra in self.adapters if slot.ranks[ra.plan.adapter_id]]
        return {"module": slot.hf_name, "adapter": ", ".join(ra.plan.name for ra in owners) or None,
                "file": owners[0].plan.weights_file if len(owners) == 1 else None}


def resolve_adapter(
    cfg: AdapterConfig, tensors: AdapterTensors, adapter_id: int, model_map: ModelMap
) -> ResolvedAdapter:
    """Match one adapter's config against the model and check it against its own tensors."""
    file = tensors.file
    bad = Blame(cfg.name, file)
    policy = vision_policy(getattr(model_map, "model", None))
    if policy.refusal:
        raise bad(policy.refusal, "merge the adapter into the base model (`lmdeploy-regex-lora merge`) and serve "
                  "the merge, which needs no LoRA.")
    naming = model_map.naming_for(cfg.name, file, tensors.pairs)
    model_map.sites_for(naming.to_checkpoint.values())  # traces what the adapter trained, in one pass
    names, not_linear = target_names(naming, model_map)
    output = model_map.output_layer() if cfg.all_linear else None
    # Which modules, under which PEFT layer / rank-alpha rules: the tensors decide (matching.resolve_targets).
    resolution = resolve_targets(cfg, names, {n: p.rank for n, p in tensors.pairs.items()}, file, not_linear,
                                 naming.trainer(output) if output else None)
    _check_base_copies(cfg, tensors, naming, model_map)

    plan = AdapterPlan(
        name=cfg.name, adapter_id=adapter_id, path=cfg.path, config_file=cfg.config_file, weights_file=file,
        target_modules=cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules),
        naming=naming.label, use_rslora=cfg.use_rslora, layer_rule=resolution.layer_rule,
        pattern_rule=resolution.pattern_rule,
    )
    by_site: dict[str, tuple[ModulePlan, LoraPair]] = {}
    unservable: list[tuple[str, Site]] = []
    for name in sorted(resolution.modules):
        with where(module=name):
            site = model_map.site(names[name])
            pair = tensors.pairs[name]
            _check_shapes(bad, name, pair, site)
            serving, why = _serving(site, policy, model_map.modules.get(site.lmdeploy_module))
            if serving is None:
                unservable.append((name, replace(site, detail=why) if why else site))
                continue
            choice = resolution.modules[name]
            module_plan = ModulePlan(name, site.lmdeploy_module, site.slot, pair.rank, choice.alpha, choice.scaling,
                                     serving, choice.reason)
            plan.modules.append(module_plan)
            by_site[site.hf_name] = (module_plan, pair)
    if unservable:
        raise _unservable(bad, unservable)
    return ResolvedAdapter(plan=plan, by_site=by_site, naming=naming)


def target_names(naming: Naming, model_map: ModelMap) -> tuple[dict[str, str], Callable[[set[str]], set[str]]]:
    """{name as the trainer's model had it: checkpoint name} for every candidate layer of the model, and the
    question matching asks about layers a config selects without tensors: which of them are no linear layers."""
    names = naming.names(model_map.candidates)
    trained = list(naming.to_checkpoint.values())

    def not_linear(selected: set[str]) -> set[str]:
        dropped = model_map.not_linear([names[n] for n in selected], trained)
        return {n for n in selected if names[n] in dropped}

    return names, not_linear


#: Site kinds LoRA cannot be served on: (what they are, why, fix).
_MERGE_FIX = "merge the adapter into the base model (`lmdeploy-regex-lora merge`) and serve the merge"
UNSERVABLE: dict[Serving, tuple[str, str]] = {
    Serving.MOE_EXPERTS: ("MoE experts", f"{_MERGE_FIX}, or serve an adapter trained without LoRA on the routed "
                                          f"experts; {ENV_FOLD_EXPERTS}=1 folds one adapter's expert deltas into the "
                                          "expert weights for every request (see docs/supported.md)"),
    Serving.ABSORBED: ("layers LMDeploy absorbs into others after loading", _MERGE_FIX),
    Serving.NO_LORA_PATH: ("layers LMDeploy builds without a LoRA path", _MERGE_FIX),
    Serving.NOT_LOADED: ("layers LMDeploy does not load", "serve an adapter without LoRA on them; LMDeploy's model "
                                                          "does not run them, so a merge would not help either"),
    Serving.EMBEDDING: ("embeddings", _MERGE_FIX),
    NON_TOKEN: ("vision/projector layers", FOLD_FIX.rstrip(".")),
    PLAIN_LINEAR: ("vision/projector layers", FOLD_FIX.rstrip(".")),
}


def _unservable(bad: Blame, unservable: list[tuple[str, Site]]) -> AdapterError:
    """One refusal naming the kind of module (MoE experts, ...), why LMDeploy cannot serve it, and the fix."""
    kinds: dict[Serving, list[tuple[str, Site]]] = {}
    for name, site in unservable:
        kinds.setdefault(site.serving, []).append((name, site))
    parts = []
    for serving, items in kinds.items():
        what = UNSERVABLE.get(serving, (f"{serving} layers", _MERGE_FIX))[0]
        more = f" and {len(items) - 3} more" if len(items) > 3 else ""
        parts.append(f"{what}: " + ", ".join(repr(n) for n, _ in items[:3]) + more + f" ({items[0][1].detail})")
    first = next(iter(kinds))
    return bad("targets layers LMDeploy cannot serve LoRA on: " + "; ".join(parts) + ". Dropping them would serve a "
               "model different from the one trained.", UNSERVABLE.get(first, ("", _MERGE_FIX))[1] + ".",
               module=unservable[0][0])


def fold_experts() -> bool:
    """The opt-in of :data:`ENV_FOLD_EXPERTS`: fold LoRA on routed MoE experts into their weights."""
    return os.environ.get(ENV_FOLD_EXPERTS, "").strip().lower() in ("1", "true", "yes", "on")


def _serving(site: Site, policy: VisionPolicy, module: object) -> tuple[Serving | None, str]:
    """How a targeted site is served, or (None, why it cannot be, when the site's own detail does not say)."""
    if off_token_rows(site):  # vision tower and projector: per image, or folded when asked (vision_policy)
        return policy.serving(site, module)
    if site.serving == Serving.MOE_EXPERTS and fold_experts():
        return FOLDED, ""
    if site.serving in (PER_REQUEST, LM_HEAD) and site.lora_capable:
        return site.serving, ""
    return None, ""


def _check_shapes(bad: Blame, name: str, pair: LoraPair, site: Site) -> None:
    rank = pair.rank
    if tuple(pair.a.shape) == (rank, site.in_features) and tuple(pair.b.shape) == (site.out_features, rank):
        return
    shapes = f"lora_A is {tuple(pair.a.shape)} and lora_B is {tuple(pair.b.shape)}"
    raise bad(f"{shapes}, but the model's layer is {site.out_features}x{site.in_features} (out x in).",
              "the adapter was trained on a different base model (size or architecture); serve it on the model it "
              "was trained on.", module=name)


def check_base_copies(adapter: str, tensors: AdapterTensors, naming: Naming, same: Callable[[str, object], bool],
                      *, against: str, fix: str, consequence: str = "LoRA slots cannot carry it") -> None:
    """Full weights saved beside the LoRA tensors (``<module>.base_layer.weight``) must equal the base model's:
    ``same(module, tensor)`` compares one under the checkpoint's name; any difference is refused."""
    for key, (module, tensor) in sorted(tensors.base_copies.items()):
        if not same(naming.to_checkpoint.get(module, module), tensor):
            raise Blame(adapter, tensors.file)(
                f"tensor {key!r} is a full weight that differs from {against} (a resized vocabulary, "
                f"modules_to_save, or another base model); {consequence}.", fix, module=module)


def _check_base_copies(cfg: AdapterConfig, tensors: AdapterTensors, naming: Naming, model_map: ModelMap) -> None:
    """Serving compares each copy, cut as LMDeploy cut the base weight for this TP rank, with the served rows."""
    def same(name: str, tensor) -> bool:
        if name not in model_map.candidates:
            return False
        site = model_map.site(name)
        if not site.lmdeploy_module or site.empty or tuple(tensor.shape) != (site.out_features, site.in_features):
            return False
        import torch

        served = model_map.served_weight(site)
        local = local_weight(site, tensor)
        return tuple(served.shape) == tuple(local.shape) and torch.equal(
            local.to(device=served.device, dtype=served.dtype), served.detach())

    check_base_copies(cfg.name, tensors, naming, same, against="the served model's",
                      fix="merge the adapter into the base model and serve the merge.")


def build_folds(resolved: list[ResolvedAdapter], model_map: ModelMap) -> list[FoldPlan]:
    """Vision/projector deltas: fold when one adapter changes a layer (or all that do agree), else refuse."""
    owners: dict[str, list[ResolvedAdapter]] = {}
    for ra in resolved:
        for site_name, (m, _) in ra.by_site.items():
            if m.serving == FOLDED and not model_map.site(site_name).empty:
                owners.setdefault(site_name, []).append(ra)
    folds, conflicts = [], []
    for site_name, ras in sorted(owners.items()):
        with where(module=site_name):
            site = model_map.site(site_name)
            fold = _fold_or_conflict(site_name, ras, site.base_slice, site.serving)
        if fold is None:
            conflicts.append((site_name, [r.plan.name for r in ras], site.serving))
        else:
            folds.append(fold)
    if conflicts:
        site_name, names, serving = conflicts[0]
        more = f" (and {len(conflicts) - 1} more layers)" if len(conflicts) > 1 else ""
        experts = serving == Serving.MOE_EXPERTS
        what, switch = ("MoE expert", ENV_FOLD_EXPERTS) if experts else ("vision/projector layer", ENV_FOLD_VISION)
        raise AdapterError(
            f"adapters {', '.join(repr(n) for n in names)} change the same {what} differently{more}. {switch}=1 folds "
            "such layers into the one base weight every request shares, so at most one delta can be folded into "
            "each.", adapter=names[0], module=site_name,
            fix="serve these adapters from separate servers, or merge each into its own copy of the base model."
            if experts else f"unset {ENV_FOLD_VISION}: these layers are then served per request, each image with its "
                            "own request's adapter.")
    return folds


def _fold_or_conflict(site_name: str, owners: list[ResolvedAdapter], base_slice: tuple[int, int],
                      serving: Serving) -> FoldPlan | None:
    """The fold of the first owner, or None when another owner's delta differs from it."""
    import torch  # serving path only (merge never plans folds)

    first_m, first_p = owners[0].by_site[site_name]
    if len(owners) > 1:  # only several owners need the deltas compared; slots computes the one it folds
        reference = first_m.scaling * (first_p.b.double() @ first_p.a.double())
        for other in owners[1:]:
            m, p = other.by_site[site_name]
            if not torch.equal(m.scaling * (p.b.double() @ p.a.double()), reference):
                return None
    return FoldPlan(site_name, first_m.lmdeploy_module, owners[0].plan.name, owners[0].plan.adapter_id,
                    first_m.scaling, first_m.rank, base_slice, serving)


def build_slots(resolved: list[ResolvedAdapter], model_map: ModelMap) -> list[SlotPlan]:
    """One slot per targeted LMDeploy (module, slot); rank 0 for every adapter that leaves it alone."""
    num_ids = 1 + len(resolved)
    by_site: dict[str, SlotPlan] = {}
    for ra in resolved:
        for site_name, (m, _) in ra.by_site.items():
            site = model_map.site(site_name)
            if m.serving == FOLDED or site.empty:  # folded, or this TP rank holds none of the layer
                continue
            with where(adapter=ra.plan.name, file=ra.plan.weights_file, module=m.hf_name):
                slot = by_site.get(site_name)
                if slot is None:
                    slot = by_site[site_name] = SlotPlan(site.lmdeploy_module, site.slot, site.hf_name,
                                                         site.in_features, site.out_features, site.base_slice,
                                                         [0] * num_ids, [0.0] * num_ids, 0, m.serving)
                slot.ranks[ra.plan.adapter_id] = m.rank
                slot.scalings[ra.plan.adapter_id] = m.scaling
    for slot in by_site.values():
        slot.kernel_block_rank = kernel_block_rank(max(slot.ranks))
    return [by_site[k] for k in sorted(by_site)]
