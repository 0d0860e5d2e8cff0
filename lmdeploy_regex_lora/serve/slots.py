"""Installing LoRA slots on LMDeploy's linears from a resolved plan.

Every slot is built and filled off the model first; only when all of them are ready (and hold no
NaN or Inf) are they attached (a plain ``nn.Linear`` on image rows gets a wrapper then, vision.py). If
attaching fails part way, the one caller (``loader._install``) puts the model back from its snapshot of
slots, wrapped linears, folded weights and step context. A slot holds exactly the
rows of the adapters that target its layer (adapter id 0, no adapter, has rank 0 everywhere), so every
row is written by one adapter's copy; buffers are therefore allocated uninitialised, and any row range
that no copy reached is zeroed before the slot is checked and attached (see :func:`_zero_unplaced`).
"""

from __future__ import annotations

import torch

from ..errors import AdapterError, bug, where
from .model_map import FOLDED, IMAGE_ROWS, LM_HEAD
from .plan import FoldPlan, ResolvedAdapter, ResolvedLoad, SlotPlan
from .sites import local_lora, served_rows
from .vision_policy import image_key
from .weights import NON_FINITE_FIX, NON_FINITE_PROBLEM, all_finite


def _place(lora: torch.nn.Module, adapter_id: int, a: torch.Tensor, b: torch.Tensor) -> None:
    """Copy one adapter's A and B (this TP rank's, :func:`~.sites.local_lora`) into its rank rows of the slot; B is
    stored transposed."""
    info = lora.adapter_info
    r = int(info.ranks[adapter_id])
    off = int(info.rank_offsets[adapter_id])
    rows_a, rows_b = lora.lora_A.data[off:off + r], lora.lora_B.data[off:off + r]
    if tuple(a.shape) != tuple(rows_a.shape) or tuple(b.t().shape) != tuple(rows_b.shape):
        raise ValueError(f"this rank's shard is lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, the slot holds "
                         f"lora_A {tuple(rows_a.shape)} / lora_B^T {tuple(rows_b.shape)}")
    rows_a.copy_(a)
    rows_b.copy_(b.t())


def _build_slot(model: torch.nn.Module, modules: dict, slot: SlotPlan, dtype: torch.dtype, device: torch.device):
    from lmdeploy.pytorch.nn.linear import LoRA

    from .lm_head import RowLoRA
    from .vision import ImageRowLoRA

    mod = modules[slot.lmdeploy_module]
    ranks = torch.tensor(slot.ranks, dtype=torch.long, device=device)
    scalings = torch.tensor(slot.scalings, dtype=torch.float32, device=device)
    sum_rank = int(sum(slot.ranks))
    # Uninitialised: every row is an adapter's (written by _place) or zeroed by _zero_unplaced.
    lora_a = torch.empty((sum_rank, mod.in_features), dtype=dtype, device=device)
    lora_b = torch.empty((sum_rank, slot.base_slice[1] - slot.base_slice[0]), dtype=dtype, device=device)
    packed = slot.slot != slot.lmdeploy_module.rsplit(".", 1)[-1]
    kind = {LM_HEAD: RowLoRA, IMAGE_ROWS: ImageRowLoRA}.get(slot.serving, LoRA)
    extra = {"mm_key": image_key(model)} if kind is ImageRowLoRA else {}
    lora = kind(
        mod.in_features,
        slot.base_slice[1] - slot.base_slice[0],
        ranks=ranks,
        scalings=scalings,
        lora_a=lora_a,
        lora_b=lora_b,
        base_slice=slice(*slot.base_slice),
        ctx_mgr=getattr(model, "ctx_mgr", None),
        colwise=getattr(mod, "colwise", True),  # a plain nn.Linear (image rows only) is not tensor-parallel
        is_tp=getattr(mod, "is_tp", False),
        lora_b_spliter=None if packed else getattr(mod, "weight_spliter_lora_b", None),
        **extra,
    )
    # The kernel's rank block must be a power of two; rows past an adapter's rank are masked.
    lora.adapter_info.max_rank = slot.kernel_block_rank
    return mod, lora


def install_slots(model: torch.nn.Module, load: ResolvedLoad, dtype: torch.dtype, device: torch.device) -> None:
    """Create and fill every slot and folded weight off the model, then attach them.

    Errors before attaching leave the model untouched; the caller's snapshot undoes a partial attach.
    """
    modules = dict(model.named_modules())
    slots = load.plan.slots
    for slot in slots:
        if slot.slot in getattr(modules[slot.lmdeploy_module], "lora_adapters", {}):
            raise AdapterError(f"already has a LoRA slot {slot.slot!r}; adapters were loaded into this model "
                               "before.", module=slot.lmdeploy_module,
                               fix="load all adapters in one call (LMDeploy's --adapters a=... b=...).")
    staged = {}
    for slot in slots:
        with where(**load.slot_where(slot)):
            staged[slot.hf_name] = _build_slot(model, modules, slot, dtype, device)
    placed = _fill(load, staged, device)
    _zero_unplaced(slots, staged, placed)
    _refuse_non_finite(slots, staged, load.adapters, dtype)
    folded = _stage_folds(modules, load.plan.folds, load.adapters, load.sites)
    if any(s.serving in (LM_HEAD, IMAGE_ROWS) for s in slots):
        from .steps import record_steps

        record_steps(model.ctx_mgr)
    for slot in slots:
        with where(**load.slot_where(slot)):
            mod, lora = staged[slot.hf_name]
            if not hasattr(mod, "lora_adapters"):  # a plain nn.Linear on image rows: give it slots
                from .vision import wrap_plain_linear

                mod = wrap_plain_linear(model, slot.lmdeploy_module)
            mod.lora_adapters[slot.slot] = lora
    for region, new in folded:
        region.copy_(new)


def _fill(load: ResolvedLoad, staged: dict, device: torch.device) -> set[tuple[str, int]]:
    """Copy every adapter's A and B into its rows of the staged slots; returns the (site, adapter id) filled."""
    placed: set[tuple[str, int]] = set()
    for ra in load.adapters:
        aid = ra.plan.adapter_id
        for site_name, (module_plan, pair) in ra.by_site.items():
            if module_plan.serving == FOLDED:
                continue
            with where(adapter=ra.plan.name, file=ra.plan.weights_file, module=module_plan.hf_name):
                # Device only: ``copy_`` into the slot converts to its dtype, a second pass would not help.
                if site_name not in staged:  # this TP rank holds none of the layer
                    continue
                a, b = local_lora(load.sites[site_name], pair.a.to(device=device), pair.b.to(device=device))
                _place(staged[site_name][1], aid, a, b)
                placed.add((site_name, aid))
    return placed


def _zero_unplaced(slots: list[SlotPlan], staged: dict, placed: set[tuple[str, int]]) -> None:
    """Zero the rows of any adapter whose copy did not reach a slot, so no slot ever serves uninitialised memory.

    The plan gives an adapter rows in a slot only when it has tensors for that layer, so this finds
    nothing today; it is the guarantee that keeps ``torch.empty`` safe if that ever changes.
    """
    for slot in slots:
        lora = staged[slot.hf_name][1]
        info = lora.adapter_info
        for aid, rank in enumerate(slot.ranks):
            if rank and (slot.hf_name, aid) not in placed:
                off = int(info.rank_offsets[aid])
                lora.lora_A.data[off:off + rank].zero_()
                lora.lora_B.data[off:off + rank].zero_()


def _refuse_non_finite(slots: list[SlotPlan], staged: dict, resolved: list[ResolvedAdapter],
                       dtype: torch.dtype) -> None:
    """Refuse NaN or Inf in what will be served, naming the adapter, file, module and tensor; nothing is attached yet.

    The filled slots are checked, in the served dtype: one pass over half the bytes of the float32
    file, and a float32 value too large for float16 (which the slot would hold as Inf) is caught too.
    Folded layers never reach a slot, so their tensors are checked as read.
    """
    by_id = {ra.plan.adapter_id: ra for ra in resolved}
    loras = [staged[slot.hf_name][1] for slot in slots]
    clean = all_finite(*(t for lora in loras for t in (lora.lora_A.data, lora.lora_B.data)))
    for slot, lora in zip(slots, loras, strict=True) if not clean else ():  # one check; then find which
        if all_finite(lora.lora_A.data, lora.lora_B.data):
            continue
        info = lora.adapter_info
        for aid, ra in sorted(by_id.items()):
            entry = ra.by_site.get(slot.hf_name)
            r, off = int(info.ranks[aid]), int(info.rank_offsets[aid])
            if entry is None or r == 0:
                continue
            mplan, pair = entry
            for rows, key, source in ((lora.lora_A.data[off:off + r], pair.a_key, pair.a),
                                      (lora.lora_B.data[off:off + r], pair.b_key, pair.b)):
                if not all_finite(rows):
                    _raise_non_finite(ra, mplan.hf_name, key, source, dtype)
        # No adapter's rows explain it: never attach a slot that would serve NaN or Inf.
        raise bug("its LoRA slot holds NaN or Inf in rows no adapter tensor was copied to.", module=slot.hf_name)
    for ra in resolved:
        for mplan, pair in ra.by_site.values():
            if mplan.serving == FOLDED:
                for key, source in ((pair.a_key, pair.a), (pair.b_key, pair.b)):
                    if not all_finite(source):
                        _raise_non_finite(ra, mplan.hf_name, key, source, dtype)


def _raise_non_finite(ra: ResolvedAdapter, module: str, key: str, source: torch.Tensor, dtype: torch.dtype) -> None:
    if all_finite(source):  # finite as saved: too large for the served dtype
        biggest = float(source.detach().abs().max())
        problem = (f"holds values up to {biggest:.6g}, beyond what {str(dtype).removeprefix('torch.')} can hold: "
                   "served in that dtype they become Inf (NaN or Inf values in the LoRA slot).")
        fix = ("serve in a dtype with a wider range (bfloat16 or float32), or use a checkpoint from before the "
               "weights grew this large.")
    else:
        problem, fix = NON_FINITE_PROBLEM, NON_FINITE_FIX
    raise AdapterError(f"tensor {key!r} {problem}", adapter=ra.plan.name, file=ra.plan.weights_file, module=module,
                       fix=fix)


def _stage_folds(modules: dict, folds: list[FoldPlan], resolved: list[ResolvedAdapter], sites: dict) -> list:
    """(region of the served weight, its new values ``W + scaling * B @ A``) per folded layer, computed in float64
    off the model. A region is the layer's rows of one parameter (one expert of a fused MoE parameter), cut for
    this TP rank as LMDeploy cut the base weight; only those rows are copied, never the whole parameter."""
    by_id = {ra.plan.adapter_id: ra for ra in resolved}
    staged = []
    for fold in folds:
        ra = by_id[fold.adapter_id]
        with where(adapter=ra.plan.name, file=ra.plan.weights_file, module=fold.hf_name):
            pair = ra.by_site[fold.hf_name][1]
            region = served_rows(modules, sites[fold.hf_name])
            a, b = local_lora(sites[fold.hf_name], pair.a, pair.b)
            if tuple(region.shape) != (b.shape[0], a.shape[1]):
                raise bug(f"the served rows of {fold.lmdeploy_module} are {tuple(region.shape)}, the adapter's part "
                          f"of the layer is {b.shape[0]}x{a.shape[1]}.", module=fold.hf_name)
            delta = fold.scaling * (b.to(region.device, torch.float64) @ a.to(region.device, torch.float64))
            staged.append((region, (region.detach().to(torch.float64) + delta).to(region.dtype)))
    return staged

