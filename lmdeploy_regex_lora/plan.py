"""The resolved plan: which LMDeploy module gets which rank and scaling for which adapter, and why.

Data flows one way: configs and tensors in (:mod:`.adapter_config`, :mod:`.adapter_weights`), the
model's layout (:mod:`.model_map`), then this plan, plain data that tests and the CLI print, and
only then LMDeploy's modules are filled from it (:mod:`.slots`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .adapter_config import AdapterConfig
from .adapter_weights import AdapterTensors, LoraPair
from .errors import AdapterError
from .matching import resolve_targets
from .model_map import FOLDED, LM_HEAD, NON_TOKEN, PER_REQUEST, PLAIN_LINEAR, ModelMap, Site, rename, unrename

#: LMDeploy's Triton LoRA kernel sizes a block with ``tl.arange(0, max(16, max_rank))``: it must be a
#: power of two. The kernel masks rows past each adapter's own rank, so rounding up is exact.
MIN_KERNEL_BLOCK = 16


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
    serving: str
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
    serving: str = PER_REQUEST  # LM_HEAD slots map their rows to requests themselves (lm_head.py)


@dataclass
class FoldPlan:
    """A layer whose rows are not token rows (vision tower, projector): LMDeploy cannot pick an adapter per
    request there, so the one adapter that changes it is folded into its base weight for every request."""

    hf_name: str  # checkpoint name
    lmdeploy_module: str
    adapter: str
    adapter_id: int
    scaling: float
    rank: int
    base_slice: tuple[int, int]  # the rows of the LMDeploy weight this layer occupies (packed layers)


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
            lines.append(f"folded into the base weight of {f.lmdeploy_module} for every request: adapter "
                         f"{f.adapter!r} (r={f.rank}, scale={f.scaling:.4g}); LMDeploy cannot tell which request "
                         "a vision/projector row belongs to")
        lines.append(f"{len(self.slots)} LoRA slots; adapter ids: "
                     + ", ".join(f"{a.adapter_id}={a.name}" for a in self.adapters) + " (0 = no adapter)")
        return "\n".join(lines)


@dataclass
class ResolvedAdapter:
    """An adapter after matching: its plan and, per site (checkpoint name), the module plan and tensors."""

    plan: AdapterPlan
    by_site: dict[str, tuple[ModulePlan, LoraPair]]


def _error(cfg: AdapterConfig, file: str, problem: str, fix: str, module: str | None = None,
           field_: str | None = None) -> AdapterError:
    return AdapterError(problem, adapter=cfg.name, file=file, module=module, field=field_, fix=fix)


def _describe(names, limit: int = 4) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def resolve_adapter(
    cfg: AdapterConfig, tensors: AdapterTensors, adapter_id: int, model_map: ModelMap
) -> ResolvedAdapter:
    """Match one adapter's config against the model and check it against its own tensors."""
    file = tensors.file
    label, rules = model_map.choose_scheme(cfg.name, file, list(tensors.pairs))
    # Names as the trainer's model had them, for every linear layer of the served model.
    names = {unrename(site_name, rules): site_name for site_name in model_map.sites}
    # Which modules, under which PEFT layer / rank-alpha rules: the tensors decide (matching.resolve_targets).
    resolution = resolve_targets(cfg, names, {n: p.rank for n, p in tensors.pairs.items()}, file)
    selected = set(resolution.modules)

    _check_base_copies(cfg, tensors, rules, model_map)

    plan = AdapterPlan(
        name=cfg.name, adapter_id=adapter_id, path=cfg.path, config_file=cfg.config_file, weights_file=file,
        target_modules=cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules),
        naming=label, use_rslora=cfg.use_rslora,
        layer_rule=resolution.layer_rule,
        pattern_rule=resolution.pattern_rule,
    )
    by_site: dict[str, tuple[ModulePlan, LoraPair]] = {}
    unservable: list[tuple[str, Site]] = []
    for n in sorted(selected):
        site = model_map.sites[rename(n, rules)]
        pair = tensors.pairs[n]
        rank = pair.rank
        if tuple(pair.a.shape) != (rank, site.in_features) or tuple(pair.b.shape) != (site.out_features, rank):
            module = model_map.modules.get(site.lmdeploy_module)
            world = int(getattr(module, "tp", 1)) if getattr(module, "is_tp", False) else 1
            if world > 1:
                # A sharded layer's full size is this rank's size x TP only when the split is even.
                raise _error(cfg, file, f"lora_A is {tuple(pair.a.shape)} and lora_B is {tuple(pair.b.shape)}, but "
                             f"this tensor-parallel rank holds {site.out_features}x{site.in_features} (out x in) "
                             f"of the layer as if split evenly over {world} ranks: either the layer is split "
                             "unevenly (its heads do not divide by the TP size) or the adapter belongs to another "
                             "base model.", "serve with a TP size that divides this layer's heads, or check that "
                             "the adapter was trained on this base model.", module=n)
            raise _error(cfg, file, f"lora_A is {tuple(pair.a.shape)} and lora_B is {tuple(pair.b.shape)}, but the "
                         f"model's layer is {site.out_features}x{site.in_features} (out x in).",
                         "the adapter was trained on a different base model (size or architecture); serve it on "
                         "the model it was trained on.", module=n)
        if site.serving in (NON_TOKEN, PLAIN_LINEAR):
            if site.interleaved_qkv is not None:
                unservable.append((n, site))  # folding needs the checkpoint's row order
                continue
            serving = FOLDED
        elif site.serving in (PER_REQUEST, LM_HEAD) and site.lora_capable:
            serving = site.serving
        else:
            unservable.append((n, site))
            continue
        choice = resolution.modules[n]
        mplan = ModulePlan(n, site.lmdeploy_module, site.slot, rank, choice.alpha, choice.scaling, serving,
                           choice.reason)
        plan.modules.append(mplan)
        by_site[site.hf_name] = (mplan, pair)
    if unservable:
        desc = ", ".join(f"{n!r} ({s.serving})" for n, s in unservable[:4])
        more = f" and {len(unservable) - 4} more" if len(unservable) > 4 else ""
        raise _error(cfg, file, f"targets layers LMDeploy cannot serve LoRA on: {desc}{more}. "
                     "Dropping them would serve a model different from the one trained.",
                     "merge the adapter into the base model (`lmdeploy-regex-lora merge`) and serve the merge.",
                     module=unservable[0][0])
    return ResolvedAdapter(plan=plan, by_site=by_site)


def _check_base_copies(cfg: AdapterConfig, tensors: AdapterTensors, rules: tuple, model_map: ModelMap) -> None:
    """Full weights saved beside the LoRA tensors must equal what the model serves, or we refuse."""
    for key, (module, tensor) in sorted(tensors.base_copies.items()):
        served = model_map.base_weight(rename(module, rules))
        same = False
        if served is not None:
            import torch

            local = tensor
            if tuple(served.shape) != tuple(tensor.shape) and tensor.shape[0] % served.shape[0] == 0:
                from lmdeploy.pytorch.distributed import get_tp_world_rank

                world, rank = get_tp_world_rank()
                if world * served.shape[0] == tensor.shape[0]:
                    local = tensor.chunk(world, 0)[rank]
            same = tuple(served.shape) == tuple(local.shape) and torch.equal(
                local.to(device=served.device, dtype=served.dtype), served.detach())
        if not same:
            raise _error(cfg, tensors.file, f"tensor {key!r} is a full weight that differs from the served model's "
                         "(a resized vocabulary, modules_to_save, or another base model); LoRA slots cannot carry "
                         "it.", "merge the adapter into the base model and serve the merge.", module=module)


def build_folds(resolved: list[ResolvedAdapter], model_map: ModelMap) -> list[FoldPlan]:
    """Vision/projector deltas: fold when one adapter changes a layer (or all that do agree), else refuse."""
    import torch  # serving path only (merge never plans folds)

    owners: dict[str, list[ResolvedAdapter]] = {}
    site_slices = {name: site.base_slice for name, site in model_map.sites.items()}
    for ra in resolved:
        for site_name, (m, _) in ra.by_site.items():
            if m.serving == FOLDED:
                owners.setdefault(site_name, []).append(ra)
    folds = []
    conflicts = []
    for site_name, ras in sorted(owners.items()):
        first_m, first_p = ras[0].by_site[site_name]
        # Only several owners need the deltas compared; slots._stage_folds computes the one it folds.
        reference = first_m.scaling * (first_p.b.double() @ first_p.a.double()) if len(ras) > 1 else None
        for other in ras[1:]:
            m, p = other.by_site[site_name]
            if not torch.equal(m.scaling * (p.b.double() @ p.a.double()), reference):
                conflicts.append((site_name, [r.plan.name for r in ras]))
                break
        else:
            folds.append(FoldPlan(site_name, first_m.lmdeploy_module, ras[0].plan.name, ras[0].plan.adapter_id,
                                  first_m.scaling, first_m.rank, site_slices[site_name]))
    if conflicts:
        site_name, names = conflicts[0]
        more = f" (and {len(conflicts) - 1} more layers)" if len(conflicts) > 1 else ""
        raise AdapterError(
            f"adapters {', '.join(repr(n) for n in names)} change the same vision/projector layer differently"
            f"{more}. LMDeploy cannot tell which request an image row belongs to, so at most one delta can be "
            "folded into such a layer.", adapter=names[0], module=site_name,
            fix="serve these adapters from separate servers, or merge each into its own copy of the base model.")
    return folds


def build_slots(resolved: list[ResolvedAdapter], model_map: ModelMap) -> list[SlotPlan]:
    """One slot per targeted LMDeploy (module, slot); rank 0 for every adapter that leaves it alone."""
    num_ids = 1 + len(resolved)
    by_site: dict[str, SlotPlan] = {}
    for ra in resolved:
        for site_name, (m, _) in ra.by_site.items():
            if m.serving == FOLDED:
                continue
            site = model_map.sites[site_name]
            slot = by_site.get(site_name)
            if slot is None:
                slot = by_site[site_name] = SlotPlan(site.lmdeploy_module, site.slot, site.hf_name,
                                                     site.in_features, site.out_features, site.base_slice,
                                                     [0] * num_ids, [0.0] * num_ids, 0, site.serving)
            slot.ranks[ra.plan.adapter_id] = m.rank
            slot.scalings[ra.plan.adapter_id] = m.scaling
    for slot in by_site.values():
        slot.kernel_block_rank = kernel_block_rank(max(slot.ranks))
    return [by_site[k] for k in sorted(by_site)]
