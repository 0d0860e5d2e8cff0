"""The bug this plugin exists for: LMDeploy alone fails on swift's regex adapters; with the plugin they load.

LMDeploy's own ``add_adapters`` is called with the plugin uninstalled (``uninstall()`` restores the very
function objects LMDeploy defined, checked in tests/test_hook.py).
"""

from __future__ import annotations

import pytest
import torch

import lmdeploy_regex_lora
from lmdeploy_regex_lora.testing.build import build_lmdeploy_model
from lmdeploy_regex_lora.testing.compare import compare, load_models
from tests.support.peft_fixtures import make_peft_adapter, merge_adapter_checkpoint

CPU = torch.device("cpu")


@pytest.mark.slow
@pytest.mark.parametrize("arch, regex, error, text", [
    # No digit in the regex: the characters match no module, no slot is made, the weight lookup fails
    # (testing-on-cpu.md; lmdeploy#4162 reports the same KeyError).
    ("qwen2", r".*\.(q_proj|v_proj|down_proj)", KeyError,
     "model.layers.0.mlp.down_proj.lora_adapters.down_proj.lora_A"),
    ("internvl_qwen2", r"^(language_model.*\.(v_proj|up_proj|o_proj|k_proj|down_proj|gate_proj|q_proj))$", KeyError,
     "lora_adapters"),
    # A digit in the regex ('1' of mlp1) makes '1' a "target", which finds InternVL's plain nn.Linear mlp1.1.
    ("internvl2_internlm2", r"(?!^(mlp1))^(language_model)(?!.*(lora_A|lora_B|base_layer|emb|wte|shared|lm_head"
                            r"|output|score|v_head|classifier)).*", AssertionError, ""),
])
def test_lmdeploy_alone_fails_and_the_plugin_loads(arch, regex, error, text, tiny_model, tmp_path):
    from lmdeploy.pytorch.models import patch

    base_dir = tiny_model(arch)
    adapter = make_peft_adapter(base_dir, tmp_path / "a", target_modules=regex, r=8, lora_alpha=16, seed=3)

    lmdeploy_regex_lora.uninstall()
    assert not lmdeploy_regex_lora.is_installed()
    with pytest.raises(error) as exc:
        patch.add_adapters(build_lmdeploy_model(base_dir), {"a": str(adapter)}, dtype=torch.float32, device=CPU)
    assert text in str(exc.value)

    assert lmdeploy_regex_lora.install()
    try:
        base, merged = load_models(base_dir, {1: merge_adapter_checkpoint(base_dir, adapter, tmp_path / "m")})
        served = build_lmdeploy_model(base_dir)
        patch.add_adapters(served, {"a": str(adapter)}, dtype=torch.float32, device=CPU)
        assert compare(served, base, merged)["targeted"] > 0
    finally:
        lmdeploy_regex_lora.uninstall()
