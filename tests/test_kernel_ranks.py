"""Ranks 24 and 48 and per-module ranks from rank_pattern, through LMDeploy's own Triton LoRA kernel.

Same harness as ``test_kernel.py`` (``tests/scripts/kernel.py`` under ``TRITON_INTERPRET=1`` in a subprocess; the
kernel is LMDeploy's, interpreted on CPU; only its autotuner is cut to one config): a packed batch
mixing both adapters and no adapter, per LoRA-carrying linear, against PEFT's merged checkpoints.
"""

from __future__ import annotations

import pytest

from lmdeploy_regex_lora.serve.loader import resolve
from lmdeploy_regex_lora.testing.build import build_lmdeploy_model
from tests.support.triton_interpreter import adapters_and_merges, run_interpreted

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
    adapters, merged = adapters_and_merges(base, tmp_path, SPECS, seed=21)

    plan = resolve(build_lmdeploy_model(base), adapters).plan
    ranks = {m.hf_name: m.rank for m in plan.adapters[0].modules}
    assert ranks == {"model.layers.0.self_attn.q_proj": 8, "model.layers.1.self_attn.q_proj": 24,
                     "model.layers.0.self_attn.k_proj": 8, "model.layers.1.self_attn.k_proj": 8,
                     "model.layers.0.self_attn.o_proj": 24, "model.layers.1.self_attn.o_proj": 24,
                     "model.layers.0.mlp.down_proj": 48, "model.layers.1.mlp.down_proj": 48}
    assert {s.kernel_block_rank for s in plan.slots} >= {64, 32}

    result = run_interpreted("kernel.py", {"base": str(base), "adapters": adapters, "merged": merged,
                                               "prefill_ids": [2, 0, 1, 2, 1]}, tmp_path)
    assert result["modules"] > 0 and not result["failures"], result
