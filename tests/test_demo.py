"""The main job, run as a user runs it: `python -m lmdeploy_regex_lora.cli demo` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _demo(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmdeploy_regex_lora.cli", "demo", "--keep", str(tmp_path / "w")],
                          cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)


def test_demo_passes_and_shows_the_native_failure(tmp_path):
    proc = _demo(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "fails: AssertionError" in out and "patch.py" in out  # LMDeploy alone
    assert out.count("in ms-swift 2.2.5's default form") == 2 and "projector ['mlp1.1', 'mlp1.3']" in out
    assert "mlp1.1[1]" in out and "2 vision/projector slots serve per request" in out  # both, side by side
    requests = [line for line in out.splitlines() if line.strip().startswith("request ")]
    assert len(requests) == 3 and "bit-identical to the base model" in requests[1], requests
    assert all("its adapter changes them by up to" in requests[i] for i in (0, 2)), requests
    assert "the projector's image-row slots included" in out
    assert "demo passed" in out and "MISMATCH" not in out
    assert (tmp_path / "w" / "checkpoint-task-b" / "adapter_config.json").is_file()


def test_demo_exits_non_zero_when_the_plugin_cannot_run(tmp_path):
    proc = _demo(tmp_path, LMDEPLOY_REGEX_LORA_DISABLE="1")
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert "demo passed" not in proc.stdout
