"""``lmdeploy-regex-lora merge`` against PEFT's merge on the same model: wall time, CPU time, peak memory.

Peak memory is the peak RSS of the merging process, from ``os.wait4`` on exactly that child. The
target of issue 5 is a peak under 1.5x (largest shard + adapter file). Two floors are measured for
context: the peak RSS of an interpreter that has only imported what our merge imports (numpy and our
package; no torch, no LMDeploy) and that of ``import torch`` alone (what any torch-based merge, PEFT's
included, pays before the first byte is merged); the "peak - its import floor" column subtracts the
first from ours and the second from PEFT's. After the runs, both merged checkpoints are compared
tensor by tensor (the same keys; how many float16 values differ, and by how many rounding steps).

Runs alternate (ours, PEFT, PEFT, ours, ...); medians are reported. Model and adapter: the
Qwen2-0.5B-shaped float16 checkpoint in 4 shards (largest 300 MiB) and the ms-swift regex adapter
(r=64 on all 168 decoder linears, float32) of bench_load.

    python -m benchmarks.bench_merge [--reps 3]
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import tempfile

from . import common
from .bench_servable import merge_cli_available

BASELINE = "import numpy, lmdeploy_regex_lora.merge.writer, lmdeploy_regex_lora.serve.plan"
TORCH_FLOOR = "import torch"


def measure(cmd: list[str], out: pathlib.Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = common.run_measured([sys.executable, *cmd], cwd=common.ROOT)
    r["written"] = common.folder_bytes(out)
    return r


def load_checkpoint(folder: pathlib.Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def _not_nearest(merged, exact) -> int:
    """Elements of ``merged`` (float16) with a float16 neighbour closer to ``exact`` (float64)."""
    import torch

    bits = merged.view(torch.int16)
    dist = (exact - merged.double()).abs()
    worse = torch.zeros_like(dist, dtype=torch.bool)
    for step in (-1, 1):
        worse |= (exact - (bits + step).view(torch.float16).double()).abs() < dist
    return int(worse.sum())


def compare(ours: pathlib.Path, peft: pathlib.Path, base: pathlib.Path, adapter: pathlib.Path) -> str:
    """How far our merged tensors are from PEFT's (float16 rounding steps), and which is the nearest float16
    to the exact ``W + scaling * B @ A`` (computed in float64 here, independently of both)."""
    import torch
    from safetensors.torch import load_file

    a, b, orig = load_checkpoint(ours), load_checkpoint(peft), load_checkpoint(base)
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    off_ours = off_peft = 0
    keys_ok = a.keys() == orig.keys()
    common_keys = sorted(a.keys() & b.keys())
    changed = worst_ulps = identical = differ = elements = 0
    for key in common_keys:
        x, y = a[key].to(torch.float32), b[key].to(torch.float32)
        if not torch.equal(a[key], orig[key]):
            changed += 1
            elements += x.numel()
            differ += int((a[key] != b[key]).sum())
            module = f"base_model.model.{key.removesuffix('.weight')}"
            exact = orig[key].double() + scaling * (lora[f"{module}.lora_B.weight"].double()
                                                    @ lora[f"{module}.lora_A.weight"].double())
            off_ours += _not_nearest(a[key], exact)
            off_peft += _not_nearest(b[key], exact)
        identical += a[key].dtype == b[key].dtype and torch.equal(a[key], b[key])
        diff = (x - y).abs()
        ulp = torch.finfo(torch.float16).eps * torch.maximum(x.abs(), y.abs()).clamp_min(2.0**-14)
        worst_ulps = max(worst_ulps, float((diff / ulp).max()))
    shards = sorted(p.name for p in ours.glob("*.safetensors"))
    return (f"ours: {len(a)} tensors in {len(shards)} shard(s), same keys as the base: {keys_ok}, {changed} changed "
            f"by the merge; PEFT's save has {len(b)} tensors; on the {len(common_keys)} shared keys {identical} are "
            f"bit-identical and the largest difference is {worst_ulps:.3g} float16 rounding steps; of the "
            f"{elements} elements of the changed tensors, {differ} ({differ / max(1, elements):.2e}) differ "
            "(ours: float64, rounded once; PEFT: float32 B @ A in its BLAS's order). Against the exact "
            f"W + scaling * B @ A (float64, computed here): ours is not the nearest float16 in {off_ours} "
            f"elements, PEFT's in {off_peft}")


def main(argv: list[str] | None = None) -> int:
    args, base, adapter = common.merge_bench_setup(__doc__.splitlines()[0], argv)
    if not merge_cli_available():
        print("`python -m lmdeploy_regex_lora.cli merge` is not available in this tree; nothing to compare")
        return 1
    index = json.loads((base / "model.safetensors.index.json").read_text())
    largest = max((base / f).stat().st_size for f in set(index["weight_map"].values()))
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    target = 1.5 * (largest + adapter_bytes)

    with tempfile.TemporaryDirectory(prefix="bench-merge-", dir=args.work) as tmp:
        work = pathlib.Path(tmp)
        ours_out, peft_out = work / "ours", work / "peft"
        results = common.interleave({
            "lmdeploy-regex-lora merge": lambda: measure(
                ["-m", "lmdeploy_regex_lora.cli", "merge", str(base), str(adapter), str(ours_out), "--no-progress"],
                ours_out),
            "PEFT merge_and_unload + save_pretrained": lambda: measure(
                ["-m", "benchmarks.steps", "peft-merge", str(base), str(adapter), str(peft_out)], peft_out),
        }, reps=args.reps, warmup=0)
        floor = common.median(common.run_measured([sys.executable, "-c", BASELINE], cwd=common.ROOT)["maxrss"]
                              for _ in range(3))
        torch_floor = common.median(common.run_measured([sys.executable, "-c", TORCH_FLOOR],
                                                        cwd=common.ROOT)["maxrss"] for _ in range(3))
        check = compare(ours_out, peft_out, base, adapter)

    rows = []
    floors = {"lmdeploy-regex-lora merge": floor, "PEFT merge_and_unload + save_pretrained": torch_floor}
    for name, runs in results.items():
        rss = common.median(r["maxrss"] for r in runs)
        rows.append([name, common.fmt_seconds(common.median(r["wall"] for r in runs)),
                     common.fmt_seconds(common.median(r["cpu"] for r in runs)), common.fmt_bytes(rss),
                     f"{rss / (largest + adapter_bytes):.2f}x", common.fmt_bytes(max(0, rss - floors[name])),
                     common.fmt_bytes(runs[-1]["written"])])
    print(f"\nlargest shard {common.fmt_bytes(largest)}, adapter file {common.fmt_bytes(adapter_bytes)}: "
          f"target peak < 1.5 x {common.fmt_bytes(largest + adapter_bytes)} = {common.fmt_bytes(target)}")
    print(f"import floor (peak RSS of `python -c \"{BASELINE}\"`, median of 3): {common.fmt_bytes(floor)}")
    print(f"torch floor (peak RSS of `python -c \"{TORCH_FLOOR}\"`, median of 3): {common.fmt_bytes(torch_floor)}")
    print(f"medians of {args.reps} interleaved runs:\n")
    print(common.table(rows, ["merge", "wall", "CPU", "peak RSS", "peak / (shard + adapter)",
                              "peak - its import floor", "written"]))
    ours_peak = common.median(r["maxrss"] for r in results["lmdeploy-regex-lora merge"])
    print(f"\ntarget (peak < {common.fmt_bytes(target)}): {'met' if ours_peak < target else 'NOT met'} by our merge "
          f"({common.fmt_bytes(ours_peak)})")
    print("\n" + check)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
