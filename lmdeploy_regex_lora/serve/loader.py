"""What runs in place of LMDeploy's ``add_adapters``: read every adapter, plan, then fill LoRA slots.

Adapter ids follow LMDeploy's ``AdapterManager``: names sorted, id 0 reserved for "no adapter".

``LMDEPLOY_REGEX_LORA_ON_ERROR`` decides what a bad adapter does to the whole load:

* ``raise`` (default): the first :class:`AdapterError` stops the load and the model is left as it
  was (LMDeploy then fails to start, with our message).
* ``skip``: the bad adapter is logged at ERROR level and left out; the others are served. LMDeploy
  numbers adapters by sorted name on its own (``AdapterManager``), so the skipped one keeps its id
  with rank 0 in every LoRA slot, and the others keep theirs. A request that names the skipped
  adapter is still accepted by LMDeploy and gets the **base model's** outputs; the ERROR line says so.

Set it in the environment of the process that builds the model (LMDeploy's engine process, its
``mp`` workers or Ray actors inherit the server's environment). Errors that name no single
adapter (e.g. adapters loaded twice) always raise.

Whatever fails, nothing stays attached: LoRA slots added by this call are removed again, plain
``nn.Linear`` layers it wrapped put back (the same objects), weights folded by it restored, and
LMDeploy's step context manager put back as it was. An exception the
plugin did not foresee is re-raised as an :class:`AdapterError` naming the adapter and module it
was working on, with the original chained.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

import torch

from ..errors import AdapterError, stage, where
from .config import read_adapter_config
from .model_map import ModelLayoutError, ModelMap, Serving
from .plan import (
    ENV_FOLD_EXPERTS,
    AdapterPlan,
    LoadPlan,
    ResolvedAdapter,
    ResolvedLoad,
    build_folds,
    build_slots,
    resolve_adapter,
)
from .sites import served_rows
from .slots import install_slots
from .vision_policy import ENV_FOLD_VISION, fold_vision
from .weights import read_adapter_tensors

logger = logging.getLogger("lmdeploy.regex_lora")

ENV_ON_ERROR = "LMDEPLOY_REGEX_LORA_ON_ERROR"
ON_ERROR_MODES = ("raise", "skip")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # LMDeploy may hand over its CUDA-graph runner; the modules live in the wrapped model.
    return model.get_model() if hasattr(model, "get_model") else model


def on_error_mode() -> str:
    """``raise`` or ``skip`` from :data:`ENV_ON_ERROR`; a typo is an error, not a silent default."""
    value = os.environ.get(ENV_ON_ERROR, "").strip().lower() or "raise"
    if value not in ON_ERROR_MODES:
        raise AdapterError(f"{ENV_ON_ERROR}={value!r} is not one of {', '.join(ON_ERROR_MODES)}.", field=ENV_ON_ERROR,
                           fix=f"set {ENV_ON_ERROR}=raise (the default) or {ENV_ON_ERROR}=skip.")
    return value


def _checked_paths(adapters: object) -> dict[str, str]:
    """Names -> folder paths as ``str``; bytes and ``os.PathLike`` are accepted, anything else refused."""
    if not isinstance(adapters, Mapping):
        raise AdapterError(f"adapters must be a mapping of names to folders, got {type(adapters).__name__}.",
                           fix="pass --adapters NAME=PATH [NAME=PATH ...].")
    out = {}
    for name, path in adapters.items():
        if not isinstance(name, str):
            raise AdapterError(f"adapter names must be strings, got {name!r}.", fix="pass --adapters NAME=PATH.")
        if not isinstance(path, (str, bytes, os.PathLike)):
            raise AdapterError(f"the path must be a folder name, got {type(path).__name__} {path!r}.", adapter=name,
                               field="path", fix="pass --adapters NAME=PATH with the adapter's folder.")
        out[name] = os.fsdecode(path)
    return out


def _skipped_placeholder(name: str, adapter_id: int, path: str, err: AdapterError) -> ResolvedAdapter:
    """Keeps the skipped adapter's id: it owns no module, so build_slots gives it rank 0 everywhere."""
    plan = AdapterPlan(name=name, adapter_id=adapter_id, path=path, config_file=err.file or "", weights_file="",
                       target_modules=[], naming=f"NOT SERVED, requests get the base model ({err.problem})",
                       use_rslora=False, layer_rule=None, pattern_rule=None)
    return ResolvedAdapter(plan=plan, by_site={})


def _resolve(model: torch.nn.Module, paths: dict[str, str], skipped: dict[str, AdapterError],
             collect: bool, check_values: bool = True, dtype: torch.dtype | None = None) -> ResolvedLoad:
    """``check_values=False`` when the caller installs the slots, which checks NaN/Inf on the filled slots.

    Every adapter is read before the model's layout is traced, so a bad adapter is reported as such first.
    """
    def attempt(name: str, adapter_id: int, what: str, step) -> object:
        try:
            with stage(what), where(adapter=name, file=paths[name]):
                return step()
        except AdapterError as err:
            if not collect or isinstance(err, ModelLayoutError):
                raise
            skipped[name] = err
            _log_skipped(name, adapter_id, err)
            return None

    ids = {name: i for i, name in enumerate(sorted(paths), start=1)}
    read: dict[str, tuple] = {}
    for name, adapter_id in ids.items():
        if name not in skipped:
            got = attempt(name, adapter_id, "reading the adapter", lambda n=name: (
                read_adapter_config(n, paths[n]), read_adapter_tensors(n, paths[n], check_values=check_values)))
            if got is not None:
                read[name] = got
    with stage("reading where LMDeploy's loader puts the checkpoint's rows"):
        model_map = ModelMap(model, dtype)
    resolved: list[ResolvedAdapter] = []
    for name, adapter_id in ids.items():
        ra = None
        if name in read:
            ra = attempt(name, adapter_id, "matching the adapter",
                         lambda n=name, i=adapter_id: resolve_adapter(*read[n], i, model_map))
        resolved.append(ra or _skipped_placeholder(name, adapter_id, paths[name], skipped[name]))
    with stage("planning the LoRA slots"):
        slots = build_slots(resolved, model_map)
        folds = build_folds(resolved, model_map)
    plan = LoadPlan(adapters=[r.plan for r in resolved], slots=slots, folds=folds)
    used = {site for r in resolved for site in r.by_site}
    return ResolvedLoad(plan=plan, adapters=resolved, sites=model_map.sites_for(sorted(used)))


def _warn_folds(plan: LoadPlan) -> None:
    """One warning per kind of fold: every request (other adapters and the base model included) sees a fold."""
    experts = [f for f in plan.folds if f.serving == Serving.MOE_EXPERTS]
    for folds, what, why in (
            ([f for f in plan.folds if f not in experts], "vision/projector layers",
             f"{ENV_FOLD_VISION}=1 asked for it; without it they are served per request"),
            (experts, "routed MoE experts", f"{ENV_FOLD_EXPERTS}=1 asked for it; LMDeploy's fused MoE has no LoRA "
                                            "path")):
        if not folds:
            continue
        counts: dict[str, int] = {}
        for f in folds:
            counts[f.adapter] = counts.get(f.adapter, 0) + 1
        logger.warning(
            "LoRA on %s is folded into the base weights, so EVERY request (other adapters and the base model "
            "included) sees it: %s. %s; the plan lists the layers.", what,
            ", ".join(f"adapter {a!r}: {n} layer(s)" for a, n in sorted(counts.items())), why)


def resolve(model: torch.nn.Module, adapters: Mapping[str, str | os.PathLike]) -> ResolvedLoad:
    """Read and match every adapter against the model; touches nothing."""
    return _resolve(_unwrap(model), _checked_paths(adapters), {}, collect=False)


def _log_skipped(name: str, adapter_id: int, err: AdapterError) -> None:
    logger.error("adapter %r (id %d) is NOT served: %s=skip left it out. Requests naming %r get the BASE MODEL's "
                 "outputs (rank 0 in every LoRA slot), not the adapter's; the other adapters keep their ids. "
                 "Reason: %s", name, adapter_id, ENV_ON_ERROR, name, err)


# -- installing with rollback -------------------------------------------------------------------------

class _Snapshot:
    """What this call may change on LMDeploy's objects, to put back after any failure."""

    def __init__(self, model: torch.nn.Module, load: ResolvedLoad) -> None:
        modules = dict(model.named_modules())
        self.slots = {name: dict(mod.lora_adapters) for name, mod in modules.items()
                      if isinstance(getattr(mod, "lora_adapters", None), torch.nn.ModuleDict)}
        self.weights = {}  # only the rows a fold changes (one expert of a fused MoE parameter, ...)
        for fold in load.plan.folds:
            region = served_rows(modules, load.sites[fold.hf_name])
            self.weights[fold.hf_name] = (region, region.detach().clone())
        # Plain nn.Linear layers on image rows get a wrapper when their slots are attached (vision.py).
        self.plain = {name: mod for name, mod in modules.items() if type(mod) is torch.nn.Linear}
        self.ctx_mgr = getattr(model, "ctx_mgr", None)
        self.ctx_attrs = dict(vars(self.ctx_mgr)) if hasattr(self.ctx_mgr, "__dict__") else None

    def restore(self, model: torch.nn.Module) -> None:
        for name, original in self.plain.items():
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if getattr(parent, leaf) is not original:
                setattr(parent, leaf, original)
        modules = dict(model.named_modules())
        for name, before in self.slots.items():
            current = modules[name].lora_adapters
            for key in [k for k in current if before.get(k) is not current[k]]:
                del current[key]
            for key, lora in before.items():
                if key not in current:
                    current[key] = lora
        for region, old in self.weights.values():
            if not torch.equal(region, old):
                region.copy_(old)
        if self.ctx_attrs is not None:
            attrs = vars(self.ctx_mgr)
            for key in [k for k in attrs if k not in self.ctx_attrs]:
                del attrs[key]
            attrs.update(self.ctx_attrs)


def _install(model: torch.nn.Module, load: ResolvedLoad, dtype: torch.dtype, device: torch.device) -> None:
    snapshot = _Snapshot(model, load)
    try:
        with stage("filling the LoRA slots"):
            install_slots(model, load, dtype=dtype, device=device)
    except BaseException:
        snapshot.restore(model)
        raise


@torch.inference_mode()
def add_adapters(model: torch.nn.Module, adapters: Mapping[str, str] | None, dtype: torch.dtype = torch.float16,
                 device: torch.device | None = None) -> LoadPlan | None:
    """Load ``adapters`` into LMDeploy's ``model`` exactly as PEFT computes them, or raise :class:`AdapterError`.

    With ``LMDEPLOY_REGEX_LORA_ON_ERROR=skip`` a bad adapter is logged and left out instead (see the module doc).
    """
    if not adapters:
        return None
    if device is None:
        device = torch.device("cuda")
    start = time.perf_counter()
    skip = on_error_mode() == "skip"
    fold_vision()  # a typo in that switch stops the load here, whatever the error mode
    model = _unwrap(model)
    paths = _checked_paths(adapters)
    skipped: dict[str, AdapterError] = {}
    ids = {name: i for i, name in enumerate(sorted(paths), start=1)}
    while True:
        try:
            load = _resolve(model, paths, skipped, collect=skip, check_values=False, dtype=dtype)
            _install(model, load, dtype, torch.device(device))
            break
        except AdapterError as err:
            # Slot planning or filling failed for one adapter: leave it out too and plan again.
            if not skip or err.adapter not in ids or err.adapter in skipped:
                raise
            skipped[err.adapter] = err
            _log_skipped(err.adapter, ids[err.adapter], err)
    plan = load.plan
    _warn_folds(plan)
    served = len(plan.adapters) - len(skipped)  # the skipped ones keep a placeholder (their id)
    logger.info("loaded %d adapter(s) into %d LoRA slots in %.2f s%s:\n%s", served, len(plan.slots),
                time.perf_counter() - start, f" ({len(skipped)} skipped: {', '.join(sorted(skipped))})"
                if skipped else "", plan.render())
    return plan
