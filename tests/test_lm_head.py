"""LM-head LoRA per request: every row of a batch mixing two adapters and none gets its own adapter.

Runs tests/scripts/lm_head.py in a subprocess (TRITON_INTERPRET must be set before Triton is imported).
Row layouts come from LMDeploy's own agent code; the kernel is LMDeploy's, interpreted on CPU.
"""

from __future__ import annotations

import pytest

from tests.support.triton_interpreter import adapters_and_merges, run_interpreted

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
    adapters, merged = adapters_and_merges(base, tmp_path, CASES[arch], seed=21)
    result = run_interpreted("lm_head.py", {"base": str(base), "adapters": adapters, "merged": merged}, tmp_path)
    assert len(result["cases"]) == 5 and not result["failures"], result
