"""The plugin serves exactly what the merged checkpoint gives, for every model and swift regex form covered.

Each case builds LMDeploy's own model classes on CPU three ways: base weights plus adapters loaded
through LMDeploy's (hooked) ``add_adapters``, and base / merged checkpoints loaded natively. The merge
is PEFT's ``merge_and_unload`` on the Hugging Face module tree.
"""

from __future__ import annotations

import pytest
import torch

from lmdeploy_regex_lora.testing.compare import compare, load_models
from tests.support.peft_fixtures import make_peft_adapter, merge_adapter_checkpoint

QWEN_LEAVES = "v_proj|up_proj|o_proj|k_proj|down_proj|gate_proj|q_proj"
INTERNLM2_LEAVES = "w2|w3|w1|wo|wqkv"

# (arch, naming, [adapter specs]); every case has two adapters with different targets and ranks,
# one of rank 24 (not a power of two: LMDeploy's own kernel launch fails on it).
CASES = {
    "qwen2-swift-v3": ("qwen2", "checkpoint", [
        dict(target_modules=rf"^(model.*\.({QWEN_LEAVES}))$", r=24, lora_alpha=48),
        dict(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16, use_rslora=True),
    ]),
    "llama-swift-v4": ("llama", "checkpoint", [
        dict(target_modules=rf"^(model(?=\.).*\.({QWEN_LEAVES}))$", r=16, lora_alpha=32),
        dict(target_modules=r".*\.layers\.1\..*\.(o_proj|down_proj)", r=24, lora_alpha=8),
    ]),
    "internlm2-regex": ("internlm2", "checkpoint", [
        dict(target_modules=rf"^(model.*\.({INTERNLM2_LEAVES}))$", r=24, lora_alpha=16),
        dict(target_modules=["wqkv", "w1"], r=4, lora_alpha=8, use_rslora=True),
    ]),
    # InternVL2-8B layout. swift v3.0.x-v3.3.0 default (prefix + negative look-ahead; also matches
    # norms and the embedding, which are not linear and so not targets).
    "internvl2-swift-v3.0": ("internvl2_internlm2", "checkpoint", [
        dict(target_modules=r"(?!^(mlp1))^(language_model)(?!.*(lora_A|lora_B|base_layer|emb|wte|shared|lm_head"
                            r"|output|score|v_head|classifier)).*", r=8, lora_alpha=32),
        dict(target_modules=r"^(language_model(?=\.).*\.(wo|w2|wqkv))$", r=24, lora_alpha=24, use_rslora=True),
    ]),
    "internvl2-swift-v3.3.0": ("internvl2_internlm2", "checkpoint", [
        dict(target_modules=r"(?!^(mlp1))^(language_model)(?!.*\b(lora_A|lora_B|base_layer|\w*emb\w*|wte|shared"
                            r"|lm_head|output|score|v_head|classifier)\b).*", r=16, lora_alpha=16),
        dict(target_modules=["attention.wqkv"], r=24, lora_alpha=48),
    ]),
    "internvl-qwen2-swift-v3.4": ("internvl_qwen2", "checkpoint", [
        dict(target_modules=rf"^(language_model.*\.({QWEN_LEAVES}))$", r=24, lora_alpha=16),
        dict(target_modules=r"^(language_model(?=\.).*\.(q_proj|k_proj|v_proj))$", r=8, lora_alpha=8,
             use_rslora=True),
    ]),
    # swift >= 3.4.1 default for InternVL2-2B/8B/26B: the regex also matches InternLM2's LM head
    # (`language_model.output`), served per request by the LM-head slot.
    "internvl2-swift-v3.4-lm-head": ("internvl2_internlm2", "checkpoint", [
        dict(target_modules=rf"^(language_model.*\.(output|{INTERNLM2_LEAVES}))$", r=24, lora_alpha=16),
        dict(target_modules=r"^(language_model(?=\.).*\.(output|w2|w3|w1|wo|wqkv))$", r=8, lora_alpha=32,
             use_rslora=True),
    ]),
    "qwen2-lm-head-list": ("qwen2", "checkpoint", [
        dict(target_modules=["q_proj", "lm_head"], r=16, lora_alpha=16),
        dict(target_modules=rf"^(model.*\.({QWEN_LEAVES}))$", r=8, lora_alpha=8),
    ]),
    "internvl-hf-tf452": ("internvl_hf", "tf452", [
        dict(target_modules=rf"^(model\.language_model(?=\.).*\.({QWEN_LEAVES}))$", r=24, lora_alpha=32),
        dict(target_modules=["gate_proj", "up_proj"], r=8, lora_alpha=16),
    ]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_plugin_equals_merged(case, tiny_model, tmp_path, plugin_installed):
    from lmdeploy.pytorch.models import patch

    arch, naming, specs = CASES[case]
    base_dir = tiny_model(arch)
    adapters, merged_dirs = {}, {}
    for i, spec in enumerate(specs):
        name = f"adapter{i}"
        adir = make_peft_adapter(base_dir, tmp_path / name, seed=11 + i, naming=naming, **spec)
        adapters[name] = str(adir)
        merged_dirs[i + 1] = merge_adapter_checkpoint(base_dir, adir, tmp_path / f"{name}-merged")

    base, merged = load_models(base_dir, merged_dirs)
    from lmdeploy_regex_lora.testing.build import build_lmdeploy_model

    served = build_lmdeploy_model(base_dir)
    patch.add_adapters(served, adapters, dtype=torch.float32, device=torch.device("cpu"))
    stats = compare(served, base, merged)
    # Both adapters must have put LoRA somewhere; the rank-24 slot needs a 32-row kernel block.
    assert stats["targeted"] >= 2 and stats["slots"] > 0, stats
    blocks = {lora.adapter_info.max_rank for m in served.modules() if hasattr(m, "lora_adapters")
              for lora in m.lora_adapters.values()}
    assert all(b & (b - 1) == 0 and b >= 16 for b in blocks), blocks
    if any(s["r"] == 24 for s in specs):
        assert 32 in blocks
