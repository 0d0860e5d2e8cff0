"""Slot buffers are allocated uninitialised (``torch.empty``); no row may ever serve that memory.

Every row of a slot belongs to one adapter and is written by its copy. If a copy ever did not reach
its rows, ``slots._zero_unplaced`` zeroes them before the NaN/Inf check and before anything is
attached. Fresh pages from the allocator are often zero already, which would hide a missing zeroing,
so ``torch.empty`` is replaced here by an allocator that returns NaN-filled tensors: that stands in
for uninitialised memory deterministically (no GPU involved; the real allocator cannot be made to
return garbage on demand).
"""

from __future__ import annotations

import pytest
import torch

from lmdeploy_regex_lora.errors import AdapterError
from lmdeploy_regex_lora.serve import loader, slots
from lmdeploy_regex_lora.testing.build import build_lmdeploy_model
from tests.support.peft_fixtures import make_peft_adapter


@pytest.fixture
def garbage_empty(monkeypatch):
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", nan_empty)


def _setup(tiny_model, tmp_path):
    base = tiny_model("qwen2")
    paths = {
        "a": str(make_peft_adapter(base, tmp_path / "a", target_modules=["q_proj", "down_proj"], r=8, seed=1)),
        "b": str(make_peft_adapter(base, tmp_path / "b", target_modules=["q_proj"], r=4, seed=2)),
    }
    model = build_lmdeploy_model(base)
    load = loader._resolve(model, paths, {}, collect=False, check_values=False)
    # Drop adapter a's tensors for one layer after planning: its rows in that slot get no copy.
    ra = next(r for r in load.adapters if r.plan.name == "a")
    dropped = "model.layers.0.self_attn.q_proj"
    del ra.by_site[dropped]
    return model, load, dropped


@torch.inference_mode()
def test_rows_without_a_copy_are_zero(tiny_model, tmp_path, garbage_empty):
    model, load, dropped = _setup(tiny_model, tmp_path)
    plan, resolved = load.plan, load.adapters
    slots.install_slots(model, load, dtype=torch.float32, device=torch.device("cpu"))
    slot = next(s for s in plan.slots if s.hf_name == dropped)
    lora = dict(model.named_modules())[slot.lmdeploy_module].lora_adapters[slot.slot]
    info = lora.adapter_info
    ids = {r.plan.name: r.plan.adapter_id for r in resolved}
    for name, expect_zero in (("a", True), ("b", False)):
        aid = ids[name]
        off, r = int(info.rank_offsets[aid]), int(info.ranks[aid])
        assert r > 0
        rows_a, rows_b = lora.lora_A[off:off + r], lora.lora_B[off:off + r]
        assert bool(torch.isfinite(rows_a).all()) and bool(torch.isfinite(rows_b).all())
        if expect_zero:
            assert not rows_a.any() and not rows_b.any()
        else:
            pair = next(r for r in resolved if r.plan.name == name).by_site[dropped][1]
            assert torch.equal(rows_a, pair.a.float()) and torch.equal(rows_b, pair.b.t().float())


@torch.inference_mode()
def test_without_the_zeroing_the_garbage_is_caught(tiny_model, tmp_path, garbage_empty, monkeypatch):
    """The control: with the zeroing switched off, the NaN rows reach the finiteness check and are refused."""
    model, load, _ = _setup(tiny_model, tmp_path)
    monkeypatch.setattr(slots, "_zero_unplaced", lambda *args: None)
    with pytest.raises(AdapterError, match="rows no adapter tensor was copied to"):
        slots.install_slots(model, load, dtype=torch.float32, device=torch.device("cpu"))
