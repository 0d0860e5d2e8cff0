"""LM-head LoRA per request: every row of a batch mixing two adapters and none gets its own adapter.

Runs tests/lm_head_run.py in a subprocess (TRITON_INTERPRET must be set before Triton is imported).
Row layouts come from LMDeploy's own agent code; the kernel is LMDeploy's, interpreted on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peft_fixtures import make_peft_adapter, merge_adapter_checkpoint

HERE = Path(__file__).parent

CASES = {
    "qwen2": [
        dict(target_modules=["lm_head", "q_proj"], r=24, lora_alpha=16),
        dict(target_modules=r"^(lm_head|model\.layers\.1\.mlp\.down_proj)$", r=8, lora_alpha=32, use_rslora=True),
    ],
    # swift >= 3.4.1 default for InternVL2-8B: InternLM2's LM head is `language_model.output`.
    "internvl2_internlm2": [
        dict(target_modules=r"^(language_model.*\.(output|w2|w3|w1|wo|wqkv))$", r=16, lora_alpha=32),
        dict(target_modules=r"^(language_model(?=\.).*\.(output|wo))$", r=24, lora_alpha=24),
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(CASES))
def test_lm_head_rows_follow_their_request(arch, tiny_model, tmp_path):
    base = tiny_model(arch)
    adapters, merged = {}, {}
    for i, spec in enumerate(CASES[arch]):
        adir = make_peft_adapter(base, tmp_path / f"a{i}", seed=21 + i, **spec)
        adapters[f"a{i}"] = str(adir)
        merged[i + 1] = str(merge_adapter_checkpoint(base, adir, tmp_path / f"a{i}-merged"))
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"base": str(base), "adapters": adapters, "merged": merged}))
    proc = subprocess.run([sys.executable, str(HERE / "lm_head_run.py"), str(spec_file)],
                          env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["cases"]) == 5 and not result["failures"], result
