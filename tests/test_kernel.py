"""LMDeploy's own LoRA forward (its Triton kernel, run by Triton's interpreter on CPU) on plugin slots.

Runs in a subprocess because TRITON_INTERPRET must be set before Triton is first imported. Nothing is
mocked: the module forward, ``TritonLoRAImpl`` and ``_fused_lora_kernel`` are LMDeploy's; only the
autotuner is cut to one config, since it would time candidates on a GPU.
"""

from __future__ import annotations

import pytest

from tests.support.triton_interpreter import adapters_and_merges, run_interpreted

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
    adapters, merged = adapters_and_merges(base, tmp_path, CASES[arch], seed=5)
    result = run_interpreted("kernel.py", {"base": str(base), "adapters": adapters, "merged": merged,
                                               "prefill_ids": [1, 0, 2, 1, 2]}, tmp_path)
    assert result["modules"] > 0 and not result["failures"], result
