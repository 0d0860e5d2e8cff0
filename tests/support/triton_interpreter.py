"""Shared plumbing of the tests that run LMDeploy's Triton kernel under TRITON_INTERPRET=1 in a subprocess.

TRITON_INTERPRET must be set before Triton is first imported, and pytest has imported it already, so those
checks run as scripts (tests/scripts/kernel.py, tests/scripts/lm_head.py) that print one JSON line of results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.peft_fixtures import make_peft_adapter, merge_adapter_checkpoint

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def adapters_and_merges(base: Path, tmp_path: Path, specs: list[dict], seed: int) -> tuple[dict, dict]:
    """Real PEFT adapters ``a0, a1, ...`` (LMDeploy ids 1, 2, ... by sorted name) and PEFT's merge of each."""
    adapters, merged = {}, {}
    for i, spec in enumerate(specs):
        adir = make_peft_adapter(base, tmp_path / f"a{i}", seed=seed + i, **spec)
        adapters[f"a{i}"] = str(adir)
        merged[i + 1] = str(merge_adapter_checkpoint(base, adir, tmp_path / f"a{i}-merged"))
    return adapters, merged


def run_interpreted(script: str, spec: dict, tmp_path: Path) -> dict:
    """Run ``tests/scripts/<script>`` on ``spec`` with TRITON_INTERPRET=1; assert exit 0; return its JSON line."""
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), str(spec_file)],
                          env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
