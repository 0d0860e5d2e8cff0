"""Installing LoRA slots on LMDeploy's linears from a resolved plan.

Every slot is built and filled off the model first; only when all of them are ready are they
attached, so a failure leaves the model exactly as it was. Buffers start at zero: a row range no
adapter owns stays zero, and adapter id 0 (no adapter) has rank 0 everywhere.
"""

from __future__ import annotations

import torch

from .errors import AdapterError
from .model_map import LM_HEAD
from .plan import ResolvedAdapter, SlotPlan


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
) -> None:
    """Create, fill and then attach every slot; on any error nothing stays attached."""
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
    if any(s.serving == LM_HEAD for s in slots):
        from .lm_head import install_step_recorder

        install_step_recorder(model.ctx_mgr)
    attached = []
    try:
        for slot in slots:
            mod, lora = staged[slot.hf_name]
            mod.lora_adapters[slot.slot] = lora
            attached.append((mod, slot.slot))
    except BaseException:
        for mod, key in attached:
            del mod.lora_adapters[key]
        raise
