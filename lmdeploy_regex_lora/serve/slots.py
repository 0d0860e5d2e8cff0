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
from .weights import NON_FINITE_FIX, NON_FINITE_PROBLEM, all_finite


def deinterleave_qkv_rows(b: torch.Tensor, num_kv_heads: int, q_per_kv: int, head_dim: int) -> torch.Tensor:
    """InternLM2 ``wqkv`` rows are (kv_head, q_per_kv + 2, head_dim); LMDeploy stores them as [Q; K; V]."""
    grouped = b.unflatten(0, (num_kv_heads, q_per_kv + 2, head_dim))
    q = grouped[:, :q_per_kv].flatten(0, 2)
    k = grouped[:, q_per_kv].flatten(0, 1)
    v = grouped[:, q_per_kv + 1].flatten(0, 1)
    return torch.cat([q, k, v], dim=0)


def _tp_world_rank(mod: torch.nn.Module) -> tuple[int, int]:
    """The module's own TP size and rank (per layer type: attention and MLP may differ), as its loader uses."""
    if not getattr(mod, "is_tp", False):
        return 1, 0
    return int(mod.tp), int(mod.tp_rank)


def _qkv_part(mod: torch.nn.Module, part: torch.Tensor, index: int, world: int, rank: int) -> torch.Tensor:
    """This rank's rows of q (0), k (1) or v (2), cut as ``QKVBaseLinear.weight_loader`` cuts the base weight:
    whole heads, and k/v shared by ``num_replicate_kv_heads`` ranks when TP exceeds the KV-head count."""
    from lmdeploy.pytorch.nn.utils import chunk_aligned

    chunks, chunk = world, rank
    replicas = int(getattr(mod, "num_replicate_kv_heads", 1) or 1)
    if replicas > 1 and index in (1, 2):
        chunks, chunk = world // replicas, rank // replicas
    align = mod.head_size if index in (0, 1) else mod.head_size_v
    return chunk_aligned(part, chunks, 0, align)[chunk]


def shard_lora(mod: torch.nn.Module, base_slice: tuple[int, int], a: torch.Tensor,
               b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This TP rank's ``lora_A`` (r, in) and ``lora_B`` (out, r), cut exactly as LMDeploy cuts the base weight.

    ``b`` is one layer's full lora_B: a packed section (q, k, gate, ...) when ``base_slice`` is narrower
    than the module, else the whole output (split into the module's sections, each cut, re-joined).
    LMDeploy's own ``LoRA.weight_loader_B`` chunks k/v plainly, ignoring KV-head replication, and uses
    the global TP size even for MLP layers; the base loaders (mirrored here) do neither.
    """
    world, rank = _tp_world_rank(mod)
    if world == 1:
        return a, b
    from lmdeploy.pytorch.nn.utils import chunk_aligned

    if not mod.colwise:  # row-parallel: the input dim is split, the output is all-reduced
        return chunk_aligned(a, world, 1, getattr(mod, "tp_align_size", 1))[rank], b
    outs = [int(o) for o in getattr(mod, "all_out_features", None) or [mod.out_features]]
    qkv = hasattr(mod, "qkv_split_section")
    merged = not qkv and hasattr(mod, "all_out_features") and hasattr(mod, "split_section")
    if not qkv and not merged:
        return a, chunk_aligned(b, world, 0, getattr(mod, "tp_align_size", 1))[rank]

    def cut(part: torch.Tensor, index: int) -> torch.Tensor:
        # MergedBaseLinear.weight_loader: a plain chunk per section.
        return _qkv_part(mod, part, index, world, rank) if qkv else part.chunk(world, 0)[rank]

    start, stop = base_slice
    if (start, stop) != (0, sum(outs)):  # one packed section: find it by its local rows
        offsets = [sum(outs[:i]) for i in range(len(outs))]
        index = next(i for i, (o, n) in enumerate(zip(offsets, outs, strict=True)) if (o, o + n) == (start, stop))
        return a, cut(b, index)
    sections = mod.qkv_split_section if qkv else mod.split_section
    return a, torch.cat([cut(part, i) for i, part in enumerate(b.split(list(sections), 0))], 0)


def _place(lora: torch.nn.Module, adapter_id: int, a: torch.Tensor, b: torch.Tensor) -> None:
    """Copy one adapter's (already sharded) A and B into its rank rows of the slot; B is stored transposed."""
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
    folded = _stage_folds(modules, load.plan.folds, load.adapters)
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
    for weight, new in folded:
        weight.data.copy_(new)


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
                a = pair.a.to(device=device)
                b = pair.b.to(device=device)
                layout = load.sites[site_name].interleaved_qkv
                if layout is not None:
                    b = deinterleave_qkv_rows(b, *layout)
                mod, lora = staged[site_name]
                cols = lora.adapter_info.base_slice
                _place(lora, aid, *shard_lora(mod, (cols.start, cols.stop), a, b))
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


def _stage_folds(modules: dict, folds: list[FoldPlan], resolved: list[ResolvedAdapter]) -> list:
    """New weights ``W + scaling * B @ A`` for folded layers, computed in float64 off the model."""
    by_id = {ra.plan.adapter_id: ra for ra in resolved}
    staged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for fold in folds:
        ra = by_id[fold.adapter_id]
        with where(adapter=ra.plan.name, file=ra.plan.weights_file, module=fold.hf_name):
            pair = ra.by_site[fold.hf_name][1]
            weight = modules[fold.lmdeploy_module].weight
            start, stop = fold.base_slice
            # This TP rank's part, cut like the base weight.
            a, b = shard_lora(modules[fold.lmdeploy_module], (start, stop), pair.a, pair.b)
            out_f, in_f = b.shape[0], a.shape[1]
            if weight.dim() != 2 or weight.shape[1] != in_f or stop - start != out_f or stop > weight.shape[0]:
                raise AdapterError(
                    f"cannot fold its delta into {fold.lmdeploy_module}: the served weight is {tuple(weight.shape)} "
                    f"(split across tensor-parallel ranks?), the adapter's layer is {out_f}x{in_f} at rows "
                    f"{start}:{stop}.", adapter=ra.plan.name, file=ra.plan.weights_file,
                    module=fold.hf_name, fix="serve with tp=1, or merge the adapter into the base model.")
            delta = fold.scaling * (b.to(weight.device, torch.float64) @ a.to(weight.device, torch.float64))
            if fold.lmdeploy_module not in staged:  # packed layers (gate/up) fold several deltas into one weight
                staged[fold.lmdeploy_module] = (weight, weight.detach().clone())
            new = staged[fold.lmdeploy_module][1]
            new[start:stop] = (weight.detach()[start:stop].to(torch.float64) + delta).to(weight.dtype)
    return list(staged.values())
