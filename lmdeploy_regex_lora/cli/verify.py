"""``lmdeploy-regex-lora verify``: prove that what the plugin serves equals the merged checkpoint.

The model is built by LMDeploy on CPU (its own classes and weight loaders), the adapters are loaded
through LMDeploy's ``add_adapters`` with the plugin in place, and every adapter's merged checkpoint
(written by :mod:`lmdeploy_regex_lora.merge`, or given with ``--against``) is loaded natively by LMDeploy.
Then, for every LMDeploy linear and every adapter, what the plugin applies (base weight plus
``scaling * B @ A`` from its LoRA slots, the vision tower's and projector's image-row slots included, or the
weight folded when LMDEPLOY_REGEX_LORA_FOLD_VISION=1 asks for it) must equal the merged weight: the one
comparison of :mod:`lmdeploy_regex_lora.testing.compare`, with half a unit in the last place of the merged
checkpoint's dtype allowed on top (a bfloat16 checkpoint can only hold the merged weight rounded to
bfloat16). Layers no adapter touches must be bit-identical.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile

from ..errors import AdapterError
from . import common as cc

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

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE", help="base model folder")
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter folder, as NAME=PATH or PATH")
    parser.add_argument("--against", action="append", default=[], metavar="NAME=DIR",
                        help="compare adapter NAME with this merged checkpoint instead of merging it (repeatable)")
    parser.add_argument("--keep", metavar="DIR", help="write the merged checkpoints to DIR/NAME and keep them")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def checkpoint_precision(folder: str) -> int:
    """Fewest significand bits among the floating point weights of a safetensors checkpoint."""
    from ..merge.planner import checkpoint_shards, read_shard_header
    from ..safetensors_io import DTYPES

    shards, _ = checkpoint_shards(folder)
    bits = [DTYPES[e.dtype].significand_bits for s in shards
            for k, e in read_shard_header(os.path.join(folder, s)).entries.items()
            if k.endswith(".weight") and DTYPES.get(e.dtype) and DTYPES[e.dtype].significand_bits]
    return min(bits) if bits else 24


def _release(model) -> None:
    del model
    import gc

    gc.collect()


def verify(base: str, adapters: dict[str, str], against: dict[str, str], keep: str | None) -> dict:
    """Run the whole check; returns the report (the ``--json`` output)."""
    import torch

    import lmdeploy_regex_lora

    from ..merge.writer import merge_checkpoint
    from ..serve import hook
    from ..testing.build import build_lmdeploy_model
    from ..testing.compare import Mismatch, check_slot_zero, compare_adapter

    unknown = sorted(set(against) - set(adapters))
    if unknown:
        raise AdapterError(f"--against names {', '.join(map(repr, unknown))}, which is not among the adapters.",
                           field="--against", fix="use the adapter's name (its folder name, or NAME in NAME=PATH).")
    report: dict = {"base": os.path.abspath(base), "ok": False, "plugin_active": False, "slots": 0,
                    "adapters": [], "error": None}
    os.environ.pop("LMDEPLOY_REGEX_LORA_ON_ERROR", None)  # verify checks every adapter: a bad one must fail
    if not lmdeploy_regex_lora.install():
        report["error"] = (hook.stand_aside_reason() or "the plugin stood aside") + \
            "; run `lmdeploy-regex-lora doctor`"
        return report
    from lmdeploy.pytorch.models import patch

    served = build_lmdeploy_model(base)
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
    folded = {f.lmdeploy_module for f in getattr(plan, "folds", [])}
    base_model = build_lmdeploy_model(base)
    work = keep or tempfile.mkdtemp(prefix="lmdeploy-regex-lora-verify-")
    try:
        for a in plan.adapters:
            entry = {"name": a.name, "adapter_id": a.adapter_id, "path": a.path, "merged": None, "rows": []}
            if a.name in against:
                entry["merged"] = os.path.abspath(against[a.name])
            else:
                entry["merged"] = merge_checkpoint(base, a.path, os.path.join(work, a.name), name=a.name,
                                                   progress=False)["out"]
            merged = build_lmdeploy_model(entry["merged"])
            try:
                entry["rows"] = compare_adapter(served, base_model, merged, a.adapter_id, folded,
                                                checkpoint_precision(entry["merged"]))
            except Mismatch as exc:  # not the same architecture: there is nothing to compare module by module
                raise AdapterError(f"{exc}.", file=entry["merged"], fix="compare a merge of this base model.") from None
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
                     "into vision/projector layers (LMDEPLOY_REGEX_LORA_FOLD_VISION=1; without it those layers are "
                     "served per request)")
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
    cc.show(report, render, args.json)
    return cc.OK if report["ok"] else cc.FAILED
