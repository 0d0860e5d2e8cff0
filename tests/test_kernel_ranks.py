"""Ranks 24 and 48 and per-module ranks from rank_pattern, through LMDeploy's own Triton LoRA kernel.

Same harness as ``test_kernel.py`` (``kernel_run.py`` under ``TRITON_INTERPRET=1`` in a subprocess; the
kernel is LMDeploy's, interpreted on CPU; only its autotuner is cut to one config): a packed batch
mixing both adapters and no adapter, per LoRA-carrying linear, against PEFT's merged checkpoints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmdeploy_regex_lora.loader import resolve
from lmdeploy_regex_lora.tiny_models import build_lmdeploy_model
from tests.peft_fixtures import make_peft_adapter, merge_adapter_checkpoint

HERE = Path(__file__).parent

# One adapter whose ranks differ per module (8 / 24 / 48 from rank_pattern, alpha per module too) and one of
# rank 48 with rsLoRA, sharing q_proj and down_proj: those slots hold ranks 48 + 48 in a 64-row kernel block.
SPECS = [
    dict(target_modules=["q_proj", "k_proj", "o_proj", "down_proj"], r=8, lora_alpha=16,
         rank_pattern={"down_proj": 48, "model.layers.1.self_attn.q_proj": 24, "o_proj": 24},
         alpha_pattern={"o_proj": 12}),
    dict(target_modules=r"^(model(?=\.).*\.(q_proj|down_proj|gate_proj))$", r=48, lora_alpha=32, use_rslora=True),
]


@pytest.mark.slow
def test_kernel_ranks_24_48_and_rank_pattern(tiny_model, tmp_path):
    base = tiny_model("qwen2")
    adapters, merged = {}, {}
    for i, spec in enumerate(SPECS):
        adir = make_peft_adapter(base, tmp_path / f"a{i}", seed=21 + i, **spec)
        adapters[f"a{i}"] = str(adir)
        merged[i + 1] = str(merge_adapter_checkpoint(base, adir, tmp_path / f"a{i}-merged"))

    plan, _, _ = resolve(build_lmdeploy_model(base), adapters)
    ranks = {m.hf_name: m.rank for m in plan.adapters[0].modules}
    assert ranks == {"model.layers.0.self_attn.q_proj": 8, "model.layers.1.self_attn.q_proj": 24,
                     "model.layers.0.self_attn.k_proj": 8, "model.layers.1.self_attn.k_proj": 8,
                     "model.layers.0.self_attn.o_proj": 24, "model.layers.1.self_attn.o_proj": 24,
                     "model.layers.0.mlp.down_proj": 48, "model.layers.1.mlp.down_proj": 48}
    assert {s.kernel_block_rank for s in plan.slots} >= {64, 32}

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"base": str(base), "adapters": adapters, "merged": merged,
                                     "prefill_ids": [2, 0, 1, 2, 1]}))
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(HERE / "kernel_run.py"), str(spec_file)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["modules"] > 0 and not result["failures"], result
