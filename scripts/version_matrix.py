"""Run tests/test_versions.py on every LMDeploy release near the supported range; print the docs' table.

CI runs tests/test_versions.py on a few releases (its DEFAULT_VERSIONS plus the installed one); this runs
the same test on all of them (each installed from PyPI into an overlay venv; pip caches the wheels, about
100 MB each) and prints a Markdown table of what was checked and measured. Exit status is pytest's.

    python scripts/version_matrix.py [RELEASE ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALL_RELEASES = ("0.12.1", "0.12.2", "0.12.3", "0.13.0", "0.14.0", "0.15.0", "0.16.0", "0.17.0")


def fmt(err: float | None) -> str:
    return "-" if err is None else f"{err:.1e}"


def table(report: dict) -> str:
    rows = ["| LMDeploy | plugin | Qwen2 / InternVL2 vs PEFT merge (max abs err) | Triton LoRA forward, mixed "
            "batch | TP=4 rank 3 vs LMDeploy's shard | run (s) |", "|---|---|---|---|---|---|"]
    for key, r in sorted(report.items()):
        release, mode = key.split("/", 1)
        if mode != "plugin":
            continue
        if "failed" in r:
            rows.append(f"| {release} | FAILED | see pytest output | | | |")
            continue
        cases = r["cases"]
        eq = " / ".join(fmt(cases[a].get("compare", {}).get("max_err")) for a in ("qwen2", "internvl2_internlm2"))
        kernel = cases["qwen2"].get("kernel", {})
        tp = cases["qwen2"].get("tp", {})
        rows.append(f"| {release} | active | {eq} | {len(kernel.get('modules', []))} linears, "
                    f"{fmt(kernel.get('max_err'))} | {fmt(tp.get('max_err'))} | {r['seconds']} |")
    for key, r in sorted(report.items()):
        release, mode = key.split("/", 1)
        if mode == "observe" and "failed" not in r:
            rows.append(f"| {release} | stands aside (1 warning) | LMDeploy unchanged: same results and LoRA "
                        "tensors as with LMDEPLOY_REGEX_LORA_DISABLE=1 | | | |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    releases = argv or list(ALL_RELEASES)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = dict(os.environ, LMDEPLOY_REGEX_LORA_TEST_VERSIONS=" ".join(releases),
                   LMDEPLOY_REGEX_LORA_VERSION_REPORT=str(report))
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/test_versions.py"], cwd=ROOT, env=env)
        if report.is_file():
            print(table(json.loads(report.read_text())))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
