"""Installing LoRA slots on LMDeploy's linears from a resolved plan.

Every slot is built and filled off the model first; only when all of them are ready are they
attached, so a failure leaves the model exactly as it was. Buffers start at zero: a row range no
adapter owns stays zero, and adapter id 0 (no adapter) has rank 0 everywhere.
"""

from __future__ import annotations

import torch

from .errors import AdapterError
from .model_map import FOLDED, LM_HEAD
from .plan import FoldPlan, ResolvedAdapter, SlotPlan


def deinterleave_qkv_rows(b: torch.Tensor, num_kv_heads: int, q_per_kv: int, head_dim: int) -> torch.Tensor:
    """InternLM2 ``wqkv`` rows are (kv_head, q_per_kv + 2, head_dim); LMDeploy stores them as [Q; K; V]."""
    grouped = b.unflatten(0, (num_kv_heads, q_per_kv + 2, head_dim))
    q = grouped[:, :q_per_kv].flatten(0, 2)
    k = grouped[:, q_per_kv].flatten(0, 1)
    v = grouped[:, q_per_kv + 1].flatten(0, 1)
    return torch.cat([q, k, v], dim=0)


def _build_slot(model: torch.nn.Module, modules: dict, slot: SlotPlan, dtype: torch.dtype, device: torch.device):
    from lmdeploy.pytorch.nn.linear import LoRA

    from .lm_head import RowLoRA

    mod = modules[slot.lmdeploy_module]
    ranks = torch.tensor(slot.ranks, dtype=torch.long, device=device)
    scalings = torch.tensor(slot.scalings, dtype=torch.float32, device=device)
    sum_rank = int(sum(slot.ranks))
    lora_a = torch.zeros((sum_rank, mod.in_features), dtype=dtype, device=device)
    lora_b = torch.zeros((sum_rank, slot.base_slice[1] - slot.base_slice[0]), dtype=dtype, device=device)
    packed = slot.slot != slot.lmdeploy_module.rsplit(".", 1)[-1]
    lora = (RowLoRA if slot.serving == LM_HEAD else LoRA)(
        mod.in_features,
        slot.base_slice[1] - slot.base_slice[0],
        ranks=ranks,
        scalings=scalings,
        lora_a=lora_a,
        lora_b=lora_b,
        base_slice=slice(*slot.base_slice),
        ctx_mgr=getattr(model, "ctx_mgr", None),
        colwise=mod.colwise,
        is_tp=mod.is_tp,
        lora_b_spliter=None if packed else getattr(mod, "weight_spliter_lora_b", None),
    )
    # The kernel's rank block must be a power of two; rows past an adapter's rank are masked.
    lora.adapter_info.max_rank = slot.kernel_block_rank
    return mod, lora


def install_slots(
    model: torch.nn.Module,
    slots: list[SlotPlan],
    resolved: list[ResolvedAdapter],
    interleaved: dict[str, tuple[int, int, int] | None],
    dtype: torch.dtype,
    device: torch.device,
    folds: list[FoldPlan] = (),
) -> None:
    """Create and fill every slot and folded weight off the model, then attach; on any error nothing changes."""
    modules = dict(model.named_modules())
    for slot in slots:
        existing = modules[slot.lmdeploy_module].lora_adapters
        if slot.slot in existing:
            raise AdapterError(f"already has a LoRA slot {slot.slot!r}; adapters were loaded into this model "
                               "before.", module=slot.lmdeploy_module,
                               fix="load all adapters in one call (LMDeploy's --adapters a=... b=...).")
    staged = {}
    for slot in slots:
        staged[slot.hf_name] = _build_slot(model, modules, slot, dtype, device)
    for ra in resolved:
        aid = ra.plan.adapter_id
        for site_name, (mplan, pair) in ra.by_site.items():
            if mplan.serving == FOLDED:
                continue
            _, lora = staged[site_name]
            try:
                a = pair.a.to(device=device, dtype=dtype)
                b = pair.b.to(device=device, dtype=dtype)
                layout = interleaved.get(site_name)
                if layout is not None:
                    b = deinterleave_qkv_rows(b, *layout)
                lora.weight_loader_A(lora.lora_A, a, adapter_id=aid)
                lora.weight_loader_B(lora.lora_B, b, adapter_id=aid)
            except AdapterError:
                raise
            except Exception as exc:
                raise AdapterError(f"placing its LoRA weights failed ({type(exc).__name__}: {exc}).",
                                   adapter=ra.plan.name, file=ra.plan.weights_file, module=mplan.hf_name,
                                   fix="this is a bug in lmdeploy-regex-lora; please report it with the "
                                       "adapter_config.json.") from exc
    folded = _stage_folds(modules, folds, resolved)
    if any(s.serving == LM_HEAD for s in slots):
        from .lm_head import install_step_recorder

        install_step_recorder(model.ctx_mgr)
    attached, originals = [], []
    try:
        for slot in slots:
            mod, lora = staged[slot.hf_name]
            mod.lora_adapters[slot.slot] = lora
            attached.append((mod, slot.slot))
        for weight, new in folded:
            originals.append((weight, weight.detach().clone()))
            weight.data.copy_(new)
    except BaseException:
        for weight, old in originals:
            weight.data.copy_(old)
        for mod, key in attached:
            del mod.lora_adapters[key]
        raise


def _stage_folds(modules: dict, folds: list[FoldPlan], resolved: list[ResolvedAdapter]) -> list:
    """New weights ``W + scaling * B @ A`` for folded layers, computed in float64 off the model."""
    by_id = {ra.plan.adapter_id: ra for ra in resolved}
    staged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for fold in folds:
        ra = by_id[fold.adapter_id]
        mplan, pair = ra.by_site[fold.hf_name]
        weight = modules[fold.lmdeploy_module].weight
        start, stop = fold.base_slice
        out_f, in_f = pair.b.shape[0], pair.a.shape[1]
        if weight.dim() != 2 or weight.shape[1] != in_f or stop - start != out_f or stop > weight.shape[0]:
            raise AdapterError(
                f"cannot fold its delta into {fold.lmdeploy_module}: the served weight is {tuple(weight.shape)} "
                f"(split across tensor-parallel ranks?), the adapter's layer is {out_f}x{in_f} at rows "
                f"{start}:{stop}.", adapter=ra.plan.name, file=ra.plan.weights_file,
                module=mplan.hf_name, fix="serve with tp=1, or merge the adapter into the base model.")
        delta = fold.scaling * (pair.b.to(weight.device, torch.float64) @ pair.a.to(weight.device, torch.float64))
        if fold.lmdeploy_module not in staged:  # packed layers (gate/up) fold several deltas into one weight
            staged[fold.lmdeploy_module] = (weight, weight.detach().clone())
        new = staged[fold.lmdeploy_module][1]
        new[start:stop] = (weight.detach()[start:stop].to(torch.float64) + delta).to(weight.dtype)
    return list(staged.values())
