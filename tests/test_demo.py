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
    assert "language_model.output[output]" in out  # the LM head, per request
    assert "demo passed" in out and "MISMATCH" not in out
    assert (tmp_path / "w" / "checkpoint-swift-v3.4-default" / "adapter_config.json").is_file()


def test_demo_exits_non_zero_when_the_plugin_cannot_run(tmp_path):
    proc = _demo(tmp_path, LMDEPLOY_REGEX_LORA_DISABLE="1")
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert "demo passed" not in proc.stdout
