"""A LoRA value finite in the adapter file but too large for the served dtype is refused, not served as Inf.

The NaN/Inf check runs on the filled slots in the served dtype (one pass, before anything is attached):
1e6 is a fine float32 but Inf in float16.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmdeploy_regex_lora.errors import AdapterError
from lmdeploy_regex_lora.testing.build import build_lmdeploy_model
from tests.support.peft_fixtures import make_peft_adapter

CPU = torch.device("cpu")


@pytest.fixture
def big_adapter(tiny_model, tmp_path):
    base = tiny_model("qwen2")
    adir = make_peft_adapter(base, tmp_path / "big", target_modules=["o_proj"], r=8, lora_alpha=16, seed=7)
    weights = load_file(str(adir / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"
    weights[key][3, 2] = 1e6
    save_file(weights, str(adir / "adapter_model.safetensors"))
    return base, adir, key


def test_float16_overflow_is_refused_and_nothing_attached(big_adapter, plugin_installed):
    from lmdeploy.pytorch.models import patch

    base, adir, key = big_adapter
    model = build_lmdeploy_model(base)
    with pytest.raises(AdapterError) as err:
        patch.add_adapters(model, {"big": str(adir)}, dtype=torch.float16, device=CPU)
    msg = str(err.value)
    assert key in msg and "float16" in msg and "adapter 'big'" in msg and "layers.1.self_attn.o_proj" in msg
    assert "Fix:" in msg
    assert all(len(m.lora_adapters) == 0 for m in model.modules() if hasattr(m, "lora_adapters"))


def test_the_same_adapter_serves_in_float32(big_adapter, plugin_installed):
    from lmdeploy.pytorch.models import patch

    base, adir, _ = big_adapter
    model = build_lmdeploy_model(base)
    plan = patch.add_adapters(model, {"big": str(adir)}, dtype=torch.float32, device=CPU)
    assert len(plan.slots) == 2
