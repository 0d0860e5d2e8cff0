"""``lmdeploy-regex-lora merge``: the base checkpoint with one adapter folded in, streamed shard by shard.

For engines without LoRA (LMDeploy's TurboMind, and any other), and for layers no engine can serve
LoRA on per request. The work is :mod:`lmdeploy_regex_lora.merge`'s; this module is the command.
"""

from __future__ import annotations

import argparse

from . import common as cc

DESCRIPTION = """\
Write BASE with ADAPTER merged in (W + scaling * B @ A) to OUT, for TurboMind or any engine without LoRA.

Safetensors in, safetensors out: the same shards, the same model.safetensors.index.json, every
non-weight file (config, tokenizer, remote code) copied. Shards and the adapter are streamed and
neither torch nor LMDeploy is loaded, so memory stays at a few tens of MiB. Targets and scalings
are resolved by the plugin's own matcher on BASE's weight names (PEFT's rules); an adapter the
plugin refuses for its content is refused here too. Layers LMDeploy cannot serve LoRA on per
request (vision tower, projector) are merged like any other: merging is the fix for those.
Merged weights are W + scaling * B @ A computed in float64, rounded once to the shard's dtype.

Exit status: 0 written; 2 an input cannot be used (message on stderr). OUT must not exist or be empty.
"""

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE", help="base model folder (safetensors checkpoint)")
    parser.add_argument("adapter", metavar="ADAPTER", help="adapter folder, as NAME=PATH or PATH")
    parser.add_argument("out", metavar="OUT", help="output folder (created; must be empty if it exists)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of a table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (plain lines are printed "
                        "when stderr is not a terminal)")


def render(summary: dict) -> str:
    lines = [f"merged adapter {summary['adapter']!r} ({summary['adapter_path']}) into {summary['base']}",
             f"  module names: {summary['naming']}"]
    rows = [{"name": m["module"], "rank": m["rank"], "alpha": m["alpha"], "scaling": m["scaling"],
             "key": m["key"]} for m in summary["modules"]]
    groups = cc.group_rows(rows, "name", ["rank", "alpha", "scaling"], ["key"])
    lines.append(cc.table(["MODULES", "N", "RANK", "ALPHA", "SCALING", "CHECKPOINT TENSOR"],
                          [[g.pattern, len(g.names), g.values["rank"], cc.fmt_num(g.values["alpha"]),
                            cc.fmt_num(g.values["scaling"]), g.values["key"]] for g in groups],
                          indent="    ", right=(1, 2, 3, 4)))
    lines.append(cc.table(["SHARD", "TENSORS", "MERGED", "MIB"],
                          [[s["file"], s["tensors"], s["merged"], f"{s['bytes'] / 2**20:.1f}"]
                           for s in summary["shards"]], indent="    ", right=(1, 2, 3)))
    lines.append(f"  copied {len(summary['copied'])} other file(s)"
                 + (f"; index {summary['index']} kept as is" if summary["index"] else ""))
    if summary["not_copied"]:
        lines.append(f"  not copied (weights in another format, or caches): {', '.join(summary['not_copied'])}")
    lines.append(f"wrote {summary['out']} in {summary['seconds']:.1f} s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    adapters = cc.parse_adapters([args.adapter])
    (name, path), = adapters.items()
    from ..merge.writer import merge_checkpoint

    summary = merge_checkpoint(args.base, path, args.out, name=name, progress=not args.no_progress and not args.json)
    if args.json:
        cc.print_json(summary)
    else:
        cc.emit(render(summary))
    return cc.OK
