"""``lmdeploy-regex-lora inspect``: what an adapter will change, from its config and safetensors header only.

An operator wants to see, before a server loads anything, which modules an adapter trains, with which
rank, alpha and scaling, and how LMDeploy will serve each of them. No weight tensor is read: the
adapter's tensors are ``meta`` tensors built from the safetensors header, and with ``--model`` the
base model is LMDeploy's own module tree built on the ``meta`` device (:mod:`lmdeploy_regex_lora.testing.build`),
so the plan printed is the one :func:`~lmdeploy_regex_lora.serve.plan.resolve_adapter` computes when serving.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import AdapterError
from ..serve.model_map import Serving
from . import common as cc

DESCRIPTION = """\
Show the resolved plan of one or more adapters without loading any weight tensor (safetensors headers only).

Without --model: per adapter, the trained modules grouped by layer pattern, their rank, alpha and
scaling (PEFT's rules, rank_pattern/alpha_pattern included), and whether target_modules selects
every trained module.
With --model BASE: the plan exactly as serving computes it on LMDeploy's model for BASE (built on
the meta device, no weights read): LMDeploy module and slot of each module and how it is served
(per request; LM head per request; vision tower / projector per request by image rows; folded into the base
weight when LMDEPLOY_REGEX_LORA_FOLD_VISION=1 asks for it; or refused and why).

Exit status: 0 every adapter would be served as trained; 1 an adapter would be refused or its
config and tensors disagree; 2 an input cannot be read (message on stderr).
"""

SERVING_LABELS = {
    Serving.PER_REQUEST: "per request",
    Serving.LM_HEAD: "LM head, per request",
    Serving.IMAGE_ROWS: "per request, image rows",
    Serving.FOLDED: "folded into base weight (all requests)",
    Serving.NON_TOKEN: "vision/projector rows",
    Serving.PLAIN_LINEAR: "plain Linear (no LoRA slot)",
    Serving.MOE_EXPERTS: "MoE experts (no LoRA path)",
    Serving.ABSORBED: "absorbed by LMDeploy (never run)",
    Serving.NO_LORA_PATH: "no LoRA path in LMDeploy",
    Serving.NOT_LOADED: "not loaded by LMDeploy",
    Serving.EMBEDDING: "embedding",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter folder, as NAME=PATH or PATH")
    parser.add_argument("--model", metavar="BASE", help="base model folder: show the plan as serving computes it")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _config_summary(cfg) -> dict:
    return {
        "target_modules": cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules),
        "r": cfg.r, "lora_alpha": cfg.lora_alpha, "use_rslora": cfg.use_rslora,
        "rank_pattern": dict(cfg.rank_pattern), "alpha_pattern": dict(cfg.alpha_pattern),
        "layers_to_transform": list(cfg.layers_to_transform) if cfg.layers_to_transform else None,
        "peft_version": cfg.peft_version, "config_file": cfg.config_file,
    }


def _read(name: str, path: str) -> tuple[object, object]:
    from ..serve.config import read_adapter_config
    from ..serve.weights import read_adapter_tensors

    cfg = read_adapter_config(name, path)
    tensors = read_adapter_tensors(name, path, headers_only=True)
    return cfg, tensors


def _module_rows_without_model(cfg, tensors) -> list[dict]:
    """Rank/alpha/scaling per trained module; raises AdapterError when the config misses a trained module."""
    from ..serve.matching import resolve_targets

    ranks = {n: p.rank for n, p in tensors.pairs.items()}
    # The model's names are unknown here: match against the trained names (every one must be selected).
    resolution = resolve_targets(cfg, list(ranks), ranks, tensors.file)
    return [{"name": c.name, "rank": c.rank, "alpha": c.alpha, "scaling": c.scaling, "serving": None,
             "lmdeploy_module": None, "slot": None, "reason": c.reason} for c in resolution.modules.values()]


def _rows_from_plan(resolved, model_map=None) -> list[dict]:
    rows = []
    for m in resolved.plan.modules:
        serving = m.serving
        if model_map is not None:  # permissive resolution of a refused adapter: show the real layer kind
            serving = model_map.site(resolved.naming.to_checkpoint[m.hf_name]).serving
        rows.append({"name": m.hf_name, "rank": m.rank, "alpha": m.alpha, "scaling": m.scaling, "serving": serving,
                     "lmdeploy_module": m.lmdeploy_module, "slot": m.slot, "reason": m.reason})
    return rows


def _entry(name: str, path: str) -> dict:
    return {"name": name, "path": os.path.abspath(path), "adapter_id": None, "status": "ok", "error": None,
            "config": None, "weights_file": None, "naming": None, "modules": [], "base_copies": []}


def inspect_adapters(adapters: dict[str, str], model: str | None) -> dict:
    """The report printed by ``inspect`` (its ``--json`` output). Raises AdapterError only for ``model``."""
    report: dict = {"model": os.path.abspath(model) if model else None, "adapters": [], "slots": None, "folds": None}
    model_map = None
    if model is not None:
        from ..serve.model_map import ModelMap
        from ..testing.build import build_lmdeploy_model

        model_map = ModelMap(build_lmdeploy_model(model, "meta"))
    resolved_ok = []
    for adapter_id, name in enumerate(sorted(adapters), start=1):
        entry = _entry(name, adapters[name])
        report["adapters"].append(entry)
        try:
            cfg, tensors = _read(name, adapters[name])
        except AdapterError as err:
            entry.update(status="unreadable", error=str(err))
            continue
        entry.update(config=_config_summary(cfg), weights_file=tensors.file,
                     base_copies=sorted(tensors.base_copies))
        if model_map is None:
            try:
                entry["modules"] = _module_rows_without_model(cfg, tensors)
            except AdapterError as err:
                entry.update(status="mismatch", error=str(err))
            continue
        entry["adapter_id"] = adapter_id
        ra = _resolve(entry, cfg, tensors, adapter_id, model_map)
        if ra is not None:
            resolved_ok.append(ra)
    if model_map is not None and resolved_ok:
        from dataclasses import asdict

        from ..serve.plan import build_slots

        report["slots"] = [asdict(s) for s in build_slots(resolved_ok, model_map)]
    # Layers folded into the base weight (only with LMDEPLOY_REGEX_LORA_FOLD_VISION / _FOLD_EXPERTS) serve
    # every request: two adapters may share one only with equal deltas, which serving checks by value
    # (inspect has none).
    folders: dict[str, list[str]] = {}
    for a in report["adapters"]:
        if a["status"] == "ok":
            for m in a["modules"]:
                if m["serving"] == Serving.FOLDED:
                    folders.setdefault(f"{m['lmdeploy_module']}[{m['slot']}]", []).append(a["name"])
    report["folds"] = folders or None
    return report


class servable_everywhere:  # noqa: N801  (used like a function)
    """``model_map`` as if every linear took LoRA per request.

    ``inspect`` uses it to still list the modules of an adapter that serving refuses only for where its
    layers are (MoE experts, a layer without a LoRA path): everything else the plan checks (naming,
    targets against tensors, ranks, shapes) stays as strict as serving.
    """

    def __init__(self, model_map) -> None:
        self._map = model_map

    def __getattr__(self, name: str):
        return getattr(self._map, name)

    def sites_for(self, names):
        from dataclasses import replace

        return {n: replace(s, serving=Serving.PER_REQUEST, lora_capable=True)
                for n, s in self._map.sites_for(names).items()}

    def site(self, name: str):
        return self.sites_for([name])[name]


def _resolve(entry: dict, cfg, tensors, adapter_id: int, model_map):
    """Fill ``entry`` from the serving plan; on refusal, still list the modules (from a permissive map)."""
    from ..serve.plan import resolve_adapter
    from ..serve.weights import AdapterTensors

    # Full weights saved beside the LoRA tensors are checked by value when serving; inspect has no values.
    bare = AdapterTensors(file=tensors.file, pairs=tensors.pairs, base_copies={})
    try:
        ra = resolve_adapter(cfg, bare, adapter_id, model_map)
    except AdapterError as err:
        entry.update(status="refused", error=str(err), refused_module=err.module)
        try:
            loose = resolve_adapter(cfg, bare, adapter_id, servable_everywhere(model_map))
        except AdapterError:
            try:
                entry["modules"] = _module_rows_without_model(cfg, tensors)
            except AdapterError:
                pass
            return None
        entry["naming"] = loose.plan.naming
        entry["modules"] = _rows_from_plan(loose, model_map)
        return None
    entry["naming"] = ra.plan.naming
    entry["modules"] = _rows_from_plan(ra)
    return ra


# -- rendering -------------------------------------------------------------------------------------------

def render(report: dict) -> str:
    lines = []
    with_model = report["model"] is not None
    if with_model:
        lines.append(f"base model: {report['model']} (LMDeploy's module tree on the meta device; no weights read)")
    for a in report["adapters"]:
        head = f"adapter {a['name']!r}" + (f" (id {a['adapter_id']})" if a["adapter_id"] else "") + f": {a['path']}"
        lines.append(head)
        cfg = a["config"]
        if cfg is not None:
            extra = "".join(f" {k}={cfg[k]!r}" for k in ("rank_pattern", "alpha_pattern", "layers_to_transform")
                            if cfg[k])
            lines.append(f"  config: target_modules={cfg['target_modules']!r} r={cfg['r']} "
                         f"lora_alpha={cfg['lora_alpha']:g} use_rslora={cfg['use_rslora']}{extra}"
                         f" (peft_version {cfg['peft_version'] or 'not recorded'})")
            lines.append(f"  weights: {a['weights_file']} (header only; {len(a['modules'])} LoRA modules)")
        if a["naming"]:
            lines.append(f"  module names: {a['naming']}")
        if a["modules"]:
            lines.append(_module_table(a["modules"], with_model, a.get("refused_module")))
        if a["base_copies"]:
            lines.append(f"  {len(a['base_copies'])} full weight(s) saved beside the LoRA tensors "
                         f"({', '.join(a['base_copies'][:3])}): served only if equal to the base model's; "
                         "inspect reads no values, `verify` checks them")
        lines.append("  " + _verdict(a, with_model))
    if report.get("slots") is not None:
        blocks: dict[int, int] = {}
        for s in report["slots"]:
            blocks[s["kernel_block_rank"]] = blocks.get(s["kernel_block_rank"], 0) + 1
        desc = " (" + ", ".join(f"{n} with kernel rank block {b}" for b, n in sorted(blocks.items())) + ")" \
            if blocks else ""
        lines.append(f"{len(report['slots'])} LoRA slots{desc}; adapter ids: "
                     + ", ".join(f"{a['adapter_id']}={a['name']}" for a in report["adapters"]) + " (0 = no adapter)")
    if report.get("folds"):
        shared = {m: names for m, names in report["folds"].items() if len(names) > 1}
        owners = sorted({n for names in report["folds"].values() for n in names})
        lines.append(f"{len(report['folds'])} vision/projector layer(s) folded into the base weights, seen by every "
                     f"request (adapters {', '.join(repr(n) for n in owners)})")
        if shared:
            lines.append(f"  {len(shared)} of them are folded by several adapters: served only if their deltas are "
                         "equal, which loading checks by value (inspect reads none)")
    return "\n".join(lines)


def _module_table(modules: list[dict], with_model: bool, refused_module: str | None) -> str:
    rows = []
    for m in modules:
        row = dict(m)
        row["slot_name"] = f"{m['lmdeploy_module']}[{m['slot']}]" if m["lmdeploy_module"] else "-"
        row["served"] = SERVING_LABELS.get(m["serving"], m["serving"] or "-")
        rows.append(row)
    groups = cc.group_rows(rows, "name", ["rank", "alpha", "scaling", "served"],
                           ["slot_name"] if with_model else [])
    headers = ["MODULES", "N", "RANK", "ALPHA", "SCALING"]
    if with_model:
        headers += ["LMDEPLOY SLOT", "SERVED"]
    body = []
    for g in groups:
        row = [g.pattern, len(g.names), g.values["rank"], cc.fmt_num(g.values["alpha"]),
               cc.fmt_num(g.values["scaling"])]
        if with_model:
            served = g.values["served"]
            if refused_module is not None and refused_module in g.names:
                served += "  <- refused here"
            row += [g.values["slot_name"], served]
        body.append(row)
    return cc.table(headers, body, indent="    ", right=(1, 2, 3, 4))


def _verdict(a: dict, with_model: bool) -> str:
    if a["status"] == "unreadable":
        return f"UNREADABLE: {a['error']}"
    if a["status"] in ("mismatch", "refused"):
        return f"REFUSED: {a['error']}"
    n = len(a["modules"])
    if with_model:
        return f"OK: served as trained ({n} modules; the config selects exactly the trained modules)"
    return (f"OK: target_modules selects all {n} trained modules (whether it also selects modules without "
            "tensors depends on the model: pass --model BASE)")


def exit_code(report: dict) -> int:
    statuses = {a["status"] for a in report["adapters"]}
    if "unreadable" in statuses:
        return cc.BAD_INPUT
    if statuses & {"mismatch", "refused"}:
        return cc.FAILED
    return cc.OK


def run(args: argparse.Namespace) -> int:
    adapters = cc.parse_adapters(args.adapters)
    report = inspect_adapters(adapters, args.model)
    cc.show(report, render, args.json)
    for a in report["adapters"]:
        if a["status"] == "unreadable":
            print(a["error"], file=sys.stderr)
    return exit_code(report)

