"""``lmdeploy-regex-lora verify``: prove that what the plugin serves equals the merged checkpoint.

The model is built by LMDeploy on CPU (its own classes and weight loaders), the adapters are loaded
through LMDeploy's ``add_adapters`` with the plugin in place, and every adapter's merged checkpoint
(written by :mod:`.merge`, or given with ``--against``) is loaded natively by LMDeploy. Then, for every
LMDeploy linear and every adapter, what the plugin applies (base weight plus ``scaling * B @ A`` from
its LoRA slots, or the folded weight) must equal the merged weight.

The tolerance is :data:`verify.ATOL` relative to the delta (float32 rounding, as
:func:`verify.compare` uses) plus half a unit in the last place of the checkpoint's dtype at the merged
weight: a bfloat16 checkpoint can only hold the merged weight rounded to bfloat16. Layers no adapter
touches must be bit-identical.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile

from . import cli_common as cc
from .errors import AdapterError

DESCRIPTION = """\
Load ADAPTERs into LMDeploy's model for BASE through the plugin (on CPU, float32) and compare what
is served, module by module and adapter by adapter, with each adapter's merged checkpoint loaded
natively by LMDeploy. The merged checkpoints are written by `merge` into a temporary folder
(--keep DIR keeps them), or taken from --against NAME=DIR (e.g. a `swift export --merge_lora` or
PEFT merge_and_unload output) to check those instead.

Prints the largest error per module group. Needs about three copies of the model in float32 memory.

Exit status: 0 everything matches; 1 a mismatch (or the plugin is not active here); 2 an input
cannot be used (message on stderr).
"""

#: Significand bits (with the implicit one) of the checkpoint dtypes, for the rounding allowance.
_PRECISION = {"F64": 53, "F32": 24, "F16": 11, "BF16": 8}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE", help="base model folder")
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter folder, as NAME=PATH or PATH")
    parser.add_argument("--against", action="append", default=[], metavar="NAME=DIR",
                        help="compare adapter NAME with this merged checkpoint instead of merging it (repeatable)")
    parser.add_argument("--keep", metavar="DIR", help="write the merged checkpoints to DIR/NAME and keep them")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def checkpoint_precision(folder: str) -> int:
    """Fewest significand bits among the floating point weights of a safetensors checkpoint."""
    from .merge import checkpoint_shards, read_shard_header

    shards, _ = checkpoint_shards(folder)
    bits = [_PRECISION[e["dtype"]] for s in shards
            for k, e in read_shard_header(os.path.join(folder, s)).entries.items()
            if k.endswith(".weight") and e["dtype"] in _PRECISION]
    return min(bits) if bits else 24


def compare_adapter(served, base, merged, adapter_id: int, folds: dict[str, int], precision: int) -> list[dict]:
    """One row per LMDeploy linear: kind, largest error, the allowance at that element, and the verdict.

    ``allowed`` is 0.0 where the weights must be identical and None for a layer another adapter folded
    (its ``max_err`` is then that fold's size, which this adapter's requests see too).
    """
    import torch

    from .verify import ATOL, dense_weight, linear_modules, slot_delta

    served_lin, base_lin, merged_lin = linear_modules(served), linear_modules(base), linear_modules(merged)
    if not served_lin.keys() == base_lin.keys() == merged_lin.keys():
        raise AdapterError("the served, base and merged models do not have the same linear layers.",
                           fix="compare a merge of this base model.")
    rows = []
    for name, mod in served_lin.items():
        w_base, w_merged = dense_weight(base_lin[name]), dense_weight(merged_lin[name])
        ref = w_merged - w_base
        if name in folds:
            kind = "folded"
            got = dense_weight(mod) - w_base
            if folds[name] != adapter_id and not torch.any(ref):
                # Another adapter's delta, folded for every request (LMDeploy cannot pick per request on
                # vision/projector rows): this adapter's requests see it too. Reported, not a mismatch.
                rows.append(_row(name, "folded by another adapter", float(got.abs().max()), None, True))
                continue
        else:
            if not torch.equal(mod.weight, base_lin[name].weight):
                rows.append(_row(name, "base weight changed", float((dense_weight(mod) - w_base).abs().max()), 0.0,
                                 False))
                continue
            got = slot_delta(mod, adapter_id)
            kind = "lora" if torch.any(got) else "untouched"
        if kind == "untouched":
            err = float(ref.abs().max())
            rows.append(_row(name, kind, err, 0.0, err == 0.0))  # bytes copied: must be identical
            continue
        diff = (got - ref).abs()
        allowed = ATOL * max(1.0, float(ref.abs().max())) + w_merged.abs() * 2.0 ** -precision
        worst = int(torch.argmax(diff / allowed))
        err, bound = float(diff.flatten()[worst]), float(allowed.flatten()[worst])
        rows.append(_row(name, kind, float(diff.max()), bound, err <= bound))
    return rows


def _row(module: str, kind: str, err: float, allowed: float | None, ok: bool) -> dict:
    return {"module": module, "kind": kind, "max_err": err, "allowed": allowed, "ok": ok}


def _release(model) -> None:
    del model
    import gc

    gc.collect()


def verify(base: str, adapters: dict[str, str], against: dict[str, str], keep: str | None) -> dict:
    """Run the whole check; returns the report (the ``--json`` output)."""
    import torch

    import lmdeploy_regex_lora

    from . import hook
    from .merge import merge_checkpoint
    from .meta_model import build_model
    from .verify import Mismatch, check_slot_zero

    unknown = sorted(set(against) - set(adapters))
    if unknown:
        raise AdapterError(f"--against names {', '.join(map(repr, unknown))}, which is not among the adapters.",
                           field="--against", fix="use the adapter's name (its folder name, or NAME in NAME=PATH).")
    report: dict = {"base": os.path.abspath(base), "ok": False, "plugin_active": False, "slots": 0,
                    "adapters": [], "error": None}
    os.environ.pop("LMDEPLOY_REGEX_LORA_ON_ERROR", None)  # verify checks every adapter: a bad one must fail
    if not lmdeploy_regex_lora.install():
        report["error"] = (hook._stand_aside_reason() or "the plugin stood aside") + \
            "; run `lmdeploy-regex-lora doctor`"
        return report
    from lmdeploy.pytorch.models import patch

    served, _ = build_model(base, "cpu")
    # The loader logs the whole plan at INFO; `inspect` prints it, here it would bury the comparison.
    logging.getLogger("lmdeploy.regex_lora").setLevel(logging.WARNING)
    plan = patch.add_adapters(served, adapters, dtype=torch.float32, device=torch.device("cpu"))
    if plan is None or not hook.is_installed():
        report["error"] = "LMDeploy's add_adapters ran without the plugin; run `lmdeploy-regex-lora doctor`"
        return report
    report["plugin_active"] = True
    try:
        report["slots"] = check_slot_zero(served)
    except Mismatch as exc:
        report["error"] = f"'no adapter' (id 0) is not zero: {exc}"
    folds = {f.lmdeploy_module: f.adapter_id for f in getattr(plan, "folds", [])}
    base_model, _ = build_model(base, "cpu")
    work = keep or tempfile.mkdtemp(prefix="lmdeploy-regex-lora-verify-")
    try:
        for a in plan.adapters:
            entry = {"name": a.name, "adapter_id": a.adapter_id, "path": a.path, "merged": None, "rows": []}
            if a.name in against:
                entry["merged"] = os.path.abspath(against[a.name])
            else:
                entry["merged"] = merge_checkpoint(base, a.path, os.path.join(work, a.name), name=a.name,
                                                   progress=False)["out"]
            merged, _ = build_model(entry["merged"], "cpu")
            entry["rows"] = compare_adapter(served, base_model, merged, a.adapter_id, folds,
                                            checkpoint_precision(entry["merged"]))
            _release(merged)
            entry["ok"] = all(r["ok"] for r in entry["rows"])
            report["adapters"].append(entry)
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    report["ok"] = report["error"] is None and all(a["ok"] for a in report["adapters"])
    return report


def render(report: dict) -> str:
    lines = [f"base model: {report['base']} (built by LMDeploy on CPU, float32)"]
    if report["plugin_active"]:
        zero = ", 'no adapter' (id 0) is zero in every one" if report["error"] is None else ""
        lines.append(f"adapters loaded through LMDeploy's add_adapters with the plugin: {report['slots']} LoRA slots"
                     + zero)
    for a in report["adapters"]:
        lines.append(f"adapter {a['name']!r} (id {a['adapter_id']}) against {a['merged']}")
        groups = cc.group_rows(a["rows"], "module", ["kind", "ok"])
        body = []
        for g in groups:
            members = [r for r in a["rows"] if r["module"] in set(g.names)]
            worst = max(members, key=lambda r: r["max_err"])
            body.append([g.pattern, len(g.names), g.values["kind"], f"{worst['max_err']:.3g}",
                         "-" if worst["allowed"] is None else f"{worst['allowed']:.3g}" if worst["allowed"]
                         else "exact",
                         "ok" if g.values["ok"] else "MISMATCH"])
        lines.append(cc.table(["LMDEPLOY MODULES", "N", "KIND", "MAX ERROR", "ALLOWED", ""], body, indent="    ",
                              right=(1, 3, 4)))
    shared = sorted({a["name"] for a in report["adapters"] for r in a["rows"] if r["allowed"] is None})
    if shared:
        lines.append(f"note: requests for {', '.join(map(repr, shared))} also see another adapter's delta folded "
                     "into vision/projector layers (LMDeploy cannot choose an adapter per request there)")
    if report["error"]:
        lines.append(f"FAILED: {report['error']}")
    elif report["ok"]:
        lines.append("OK: the plugin serves exactly the merged weights for every adapter")
    else:
        bad = [f"{a['name']}: {r['module']} ({r['kind']}, error {r['max_err']:.3g})" for a in report["adapters"]
               for r in a["rows"] if not r["ok"]]
        lines.append(f"MISMATCH in {len(bad)} module(s): " + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    adapters = cc.parse_adapters(args.adapters)
    against = {}
    for spec in args.against:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise AdapterError(f"--against {spec!r} is not NAME=DIR.", field="--against",
                               fix="write --against NAME=DIR with the adapter's name.")
        against[name] = path
    report = verify(args.base, adapters, against, args.keep)
    if args.json:
        cc.print_json(report)
    else:
        cc.emit(render(report))
    return cc.OK if report["ok"] else cc.FAILED
