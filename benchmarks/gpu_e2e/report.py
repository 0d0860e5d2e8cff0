"""The run's results: the table, the machine it ran on, and ``gpu_e2e.json``, written again after every phase."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import pathlib
import platform
import sys
from collections.abc import Sequence
from typing import Any

from .compare import EFFECT_FACTOR, TOLERANCE, Seq


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table: tokens identical, largest log-probability difference, throughput ratio."""
    header = ["model", "path", "adapter", "tokens identical", "max Δlogprob, generated", "max Δlogprob, prompt",
              "adapter effect", "served / merged tok/s", "ratio", "ok"]
    lines = []
    for r in rows:
        g = r["gen"]
        ident = f"{g['identical']}/{g['n']}" + (f" (+{g['near_tie']} near tie)" if g["near_tie"] else "")
        score = f"{r['score']['max_lp_diff']:.2e}" if "score" in r else "—"
        eff = f"{r['effect']:.2f}" if "effect" in r else "—"
        tps = r.get("tps")
        tps_s = f"{tps['served']:.0f} / {tps['merged']:.0f}" if tps else "—"
        ratio = f"{tps['ratio']:.3f}" if tps else "—"
        lines.append([r["arch"], r["path"], r["adapter"], ident, f"{g['max_lp_diff']:.2e}", score, eff, tps_s,
                      ratio, "yes" if r["ok"] else "NO"])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]

    def fmt(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines)])


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Seq):
        return obj.to_dict()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, pathlib.Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def machine_info() -> dict[str, Any]:
    """Date, GPU, versions: what docs/performance.md needs next to the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    info: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                            "python": platform.python_version(), "host": platform.node()}
    for pkg in ("lmdeploy", "lmdeploy-regex-lora", "torch", "transformers", "peft", "triton", "safetensors"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except Exception as exc:  # the report must still be written
        info["gpu_error"] = repr(exc)
    return info


class Report:
    """Results written to ``--out`` after every phase, so a run cut short still returns what it measured."""

    def __init__(self, out: pathlib.Path | None, args: argparse.Namespace) -> None:
        self.out = out
        self.data: dict[str, Any] = {"machine": machine_info(), "args": vars(args),
                                     "tolerance": {**dataclasses.asdict(TOLERANCE[args.dtype]),
                                                   "effect_factor": EFFECT_FACTOR, "dtype": args.dtype},
                                     "phases": {}, "rows": [], "errors": []}
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)

    def phase(self, key: str, value: Any) -> None:
        self.data["phases"][key] = value
        self.flush()

    def flush(self) -> None:
        if self.out is not None:
            (self.out / "gpu_e2e.json").write_text(json.dumps(_jsonable(self.data), indent=1) + "\n")

    def record_error(self, where: str, exc: BaseException) -> None:
        """Record the exception being handled (with its traceback), write the report, and say so on stderr."""
        import traceback

        tb = traceback.format_exc()
        self.data["errors"].append({"arch": where, "error": repr(exc), "traceback": tb})
        self.flush()
        print(f"[{where}] FAILED: {exc!r}\n{tb}", file=sys.stderr, flush=True)

    def conclude(self, dtype: str, wall_s: float) -> bool:
        """Record the table and the wall time, write the report, print table and verdict; True when it failed."""
        failed = bool(self.data["errors"]) or not all(r["ok"] for r in self.data["rows"])
        table = format_table(self.data["rows"])
        tol = TOLERANCE[dtype]
        self.data["table"] = table
        self.data["wall_s"] = wall_s
        self.flush()
        m = self.data["machine"]
        print(f"\n{m.get('gpu')} | lmdeploy {m.get('lmdeploy')} | torch {m.get('torch')} | {m['date']} | "
              f"{dtype}, tolerance |Δlogprob| <= {tol.atol} + {tol.rtol}·|ref|")
        print(table)
        for r in self.data["rows"]:
            if not r["ok"]:
                print(f"MISMATCH {r['arch']} {r['path']} {r['adapter']}: {json.dumps(_jsonable(r))[:2000]}")
        for e in self.data["errors"]:
            print(f"ERROR {e['arch']}: {e['error']}")
        print("RESULT: " + ("FAIL" if failed else "PASS") + f" in {wall_s:.0f} s")
        return failed
