"""What runs in place of LMDeploy's ``add_adapters``: read every adapter, plan, then fill LoRA slots.

Adapter ids follow LMDeploy's ``AdapterManager``: names sorted, id 0 reserved for "no adapter".
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

import torch

from .adapter_config import read_adapter_config
from .adapter_weights import read_adapter_tensors
from .errors import AdapterError
from .model_map import ModelMap
from .plan import LoadPlan, ResolvedAdapter, build_slots, resolve_adapter
from .slots import install_slots

logger = logging.getLogger("lmdeploy.regex_lora")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # LMDeploy may hand over its CUDA-graph runner; the modules live in the wrapped model.
    return model.get_model() if hasattr(model, "get_model") else model


def resolve(model: torch.nn.Module, adapters: Mapping[str, str | os.PathLike]) -> tuple[LoadPlan, list, dict]:
    """Read and match every adapter against the model; touches nothing. Returns (plan, resolved, layouts)."""
    model = _unwrap(model)
    if not isinstance(adapters, Mapping):
        raise AdapterError(f"adapters must be a mapping of names to folders, got {type(adapters).__name__}.",
                           fix="pass --adapters NAME=PATH [NAME=PATH ...].")
    names = sorted(adapters)
    model_map = ModelMap(model)
    resolved: list[ResolvedAdapter] = []
    for adapter_id, name in enumerate(names, start=1):
        path = os.fspath(adapters[name])
        cfg = read_adapter_config(name, path)
        tensors = read_adapter_tensors(name, path)
        resolved.append(resolve_adapter(cfg, tensors, adapter_id, model_map))
    slots = build_slots(resolved, model_map)
    layouts = {name: site.interleaved_qkv for name, site in model_map.sites.items() if site.interleaved_qkv}
    return LoadPlan(adapters=[r.plan for r in resolved], slots=slots), resolved, layouts


@torch.inference_mode()
def add_adapters(model: torch.nn.Module, adapters: Mapping[str, str] | None, dtype: torch.dtype = torch.float16,
                 device: torch.device | None = None) -> LoadPlan | None:
    """Load ``adapters`` into LMDeploy's ``model`` exactly as PEFT computes them, or raise :class:`AdapterError`."""
    if not adapters:
        return None
    if device is None:
        device = torch.device("cuda")
    start = time.perf_counter()
    model = _unwrap(model)
    plan, resolved, layouts = resolve(model, adapters)
    install_slots(model, plan.slots, resolved, layouts, dtype=dtype, device=torch.device(device))
    logger.info("loaded %d adapter(s) into %d LoRA slots in %.2f s:\n%s", len(plan.adapters), len(plan.slots),
                time.perf_counter() - start, plan.render())
    return plan
