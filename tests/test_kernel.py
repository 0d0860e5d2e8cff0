"""LMDeploy's own LoRA forward (its Triton kernel, run by Triton's interpreter on CPU) on plugin slots.

Runs in a subprocess because TRITON_INTERPRET must be set before Triton is first imported. Nothing is
mocked: the module forward, ``TritonLoRAImpl`` and ``_fused_lora_kernel`` are LMDeploy's; only the
autotuner is cut to one config, since it would time candidates on a GPU.
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
    # ranks 24 and 8 on shared modules: the kernel block must be 32.
    "qwen2": [
        dict(target_modules=r"^(model.*\.(q_proj|v_proj|o_proj|down_proj|gate_proj))$", r=24, lora_alpha=48),
        dict(target_modules=["q_proj", "up_proj", "down_proj"], r=8, lora_alpha=16, use_rslora=True),
    ],
    # InternLM2's interleaved wqkv and w1/w3 packed into gate_up_proj.
    "internlm2": [
        dict(target_modules=r"^(model.*\.(wqkv|w1|w3|w2|wo))$", r=24, lora_alpha=16),
        dict(target_modules=["wqkv", "w3"], r=4, lora_alpha=8),
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(CASES))
def test_kernel_mixed_batch(arch, tiny_model, tmp_path):
    base = tiny_model(arch)
    adapters, merged = {}, {}
    for i, spec in enumerate(CASES[arch]):
        adir = make_peft_adapter(base, tmp_path / f"a{i}", seed=5 + i, **spec)
        adapters[f"a{i}"] = str(adir)
        merged[i + 1] = str(merge_adapter_checkpoint(base, adir, tmp_path / f"a{i}-merged"))
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"base": str(base), "adapters": adapters, "merged": merged,
                                     "prefill_ids": [1, 0, 2, 1, 2]}))
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(HERE / "kernel_run.py"), str(spec_file)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["modules"] > 0 and not result["failures"], result
