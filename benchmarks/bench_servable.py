"""Time to a servable model: the plugin against merge-then-load, with the bytes each writes to disk.

Each path runs as fresh processes (imports included), as an operator would run them, ending with
LMDeploy's model built on CPU and ready to serve the adapter:

* plugin: LMDeploy builds the base model and loads the adapter through the plugin (one process);
* PEFT merge: transformers loads the base, PEFT ``merge_and_unload``, ``save_pretrained``; then LMDeploy
  builds the merged folder (two processes);
* our ``merge``: ``python -m lmdeploy_regex_lora.cli merge BASE ADAPTER OUT``; then LMDeploy builds OUT
  (two processes), when the installed code has the subcommand.

Paths alternate (A/B/C, then C/B/A, ...); the median of each is reported. The adapter is the ms-swift
regex form (r=64 on all 168 decoder linears) of the Qwen2-0.5B-shaped float16 model of bench_load.

    python -m benchmarks.bench_servable [--reps 3]
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

from . import common
from .steps import step_times


def merge_cli_available() -> bool:
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "lmdeploy_regex_lora.cli", "merge", "--help"], cwd=common.ROOT,
                          env=common.child_env(), capture_output=True, text=True)
    return proc.returncode == 0


def run_path(steps: list[list[str]], out: pathlib.Path | None) -> dict:
    """Run the steps one after another; total wall/CPU, the largest peak RSS, bytes written, phase times."""
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    total = {"wall": 0.0, "cpu": 0.0, "maxrss": 0, "phases": []}
    for cmd in steps:
        r = common.run_measured([sys.executable, *cmd], cwd=common.ROOT)
        total["wall"] += r["wall"]
        total["cpu"] += r["cpu"]
        total["maxrss"] = max(total["maxrss"], r["maxrss"])
        total["phases"].append({"step": cmd[2], "wall": round(r["wall"], 2),
                                **step_times(r["output"])})
    total["written"] = common.folder_bytes(out) if out is not None else 0
    return total


def main(argv: list[str] | None = None) -> int:
    args, base, adapter = common.merge_bench_setup(__doc__.splitlines()[0], argv)
    have_merge = merge_cli_available()

    with tempfile.TemporaryDirectory(prefix="bench-servable-", dir=args.work) as tmp:
        work = pathlib.Path(tmp)
        peft_out, our_out = work / "peft-merged", work / "our-merged"
        paths = {
            "plugin (build + add_adapters)": lambda: run_path(
                [["-m", "benchmarks.steps", "build", str(base), f"a={adapter}"]], None),
            "PEFT merge_and_unload + save, then build": lambda: run_path(
                [["-m", "benchmarks.steps", "peft-merge", str(base), str(adapter), str(peft_out)],
                 ["-m", "benchmarks.steps", "build", str(peft_out)]], peft_out),
        }
        if have_merge:
            paths["lmdeploy-regex-lora merge, then build"] = lambda: run_path(
                [["-m", "lmdeploy_regex_lora.cli", "merge", str(base), str(adapter), str(our_out), "--no-progress"],
                 ["-m", "benchmarks.steps", "build", str(our_out)]], our_out)
        else:
            print("note: `python -m lmdeploy_regex_lora.cli merge` is not available in this tree; path skipped")
        results = common.interleave(paths, reps=args.reps, warmup=0)

    ref = common.median(r["wall"] for r in results["plugin (build + add_adapters)"])
    rows = []
    for name, runs in results.items():
        wall = common.median(r["wall"] for r in runs)
        cpu = common.median(r["cpu"] for r in runs)
        rss = common.median(r["maxrss"] for r in runs)
        rows.append([name, common.fmt_seconds(wall), f"{wall / ref:.2f}x", common.fmt_seconds(cpu),
                     common.fmt_bytes(rss), common.fmt_bytes(runs[-1]["written"])])
        print(f"{name}: phases of the last run: {runs[-1]['phases']}")
    print(f"\nbase: {common.folder_bytes(base) / 2**20:.0f} MiB float16 in 4 shards; adapter: "
          f"{common.folder_bytes(adapter) / 2**20:.0f} MiB; medians of {args.reps} interleaved runs:\n")
    print(common.table(rows, ["path to a servable model", "wall", "vs plugin", "CPU", "peak RSS (largest step)",
                              "written to disk"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
