"""The naming and row layer is read from LMDeploy's own loader (serve/weight_trace.py, serve/model_map.py).

* Where the old hand tables were right (the nine architectures of ``tiny_models``, every rank of TP=1/2), the
  trace gives the same module, slot, rows and columns; where they differ, the trace is the one LMDeploy's
  loaded weights agree with.
* Mutation: with the trace replaced by the hand tables, Qwen3-VL and InternVL2-4B (Phi-3) adapters are refused;
  with the trace they are served exactly (test_architectures.py).
* A served model the skeleton cannot stand for, or a model without its checkpoint folder, is refused with a
  clear error and left untouched.
"""

from __future__ import annotations

import pytest
import torch

from lmdeploy_regex_lora.errors import AdapterError
from lmdeploy_regex_lora.serve.model_map import ModelMap
from lmdeploy_regex_lora.serve.sites import local_weight, served_rows
from lmdeploy_regex_lora.testing.build import build_lmdeploy_model
from lmdeploy_regex_lora.testing.tiny_models import ARCHS
from tests.support.hand_tables import HandModelMap, as_site, old_sites
from tests.support.peft_fixtures import _load_checkpoint, make_peft_adapter
from tests.test_architectures import CASES

pytestmark = pytest.mark.slow


def _rank_models(folder, tp: int):
    from lmdeploy.pytorch.distributed import get_dist_manager

    from tests.test_tp import _dist_context, build_rank

    for rank in range(tp):
        model = build_lmdeploy_model(folder) if tp == 1 else build_rank(folder, tp, rank)
        ctx = get_dist_manager().context(_dist_context(tp, rank)) if tp > 1 else None
        yield rank, model, ctx


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch", ARCHS)
def test_trace_agrees_with_the_hand_tables_and_with_lmdeploys_weights(arch, tp, tiny_model):
    import contextlib

    folder = tiny_model(arch)
    ckpt = _load_checkpoint(folder)
    for rank, model, ctx in _rank_models(folder, tp):
        with ctx or contextlib.nullcontext():
            traced = ModelMap(model).sites
            hand = {n: as_site(model, s) for n, s in old_sites(model).items()}
        for name, site in traced.items():
            if not site.lmdeploy_module or site.empty:
                continue
            # ground truth: LMDeploy's loaded weight holds the checkpoint's rows/columns where the site says
            assert torch.equal(served_rows(dict(model.named_modules()), site),
                               local_weight(site, ckpt[f"{name}.weight"])), (arch, tp, rank, name)
        linear = {n: s for n, s in traced.items() if s.kind in ("lora-linear", "plain-linear")}
        assert linear.keys() == hand.keys(), (arch, sorted(linear.keys() ^ hand.keys())[:4])
        for name, site in linear.items():
            old = hand[name]
            got = (site.lmdeploy_module, site.slot, site.base_slice, site.in_features, site.out_features)
            assert got == (old.lmdeploy_module, old.slot, old.base_slice, old.in_features, old.out_features), name
            rows = site.rows if site.rows is not None else ((0, 0, site.out_features),)
            cols = site.cols if site.cols is not None else ((0, 0, site.in_features),)
            assert (rows, cols) == (old.rows, old.cols), (arch, tp, rank, name)


@pytest.mark.parametrize("arch", ["qwen3_vl", "internvl_phi3"])
def test_mutation_hand_tables_refuse_what_the_trace_serves(arch, tiny_arch, tmp_path, plugin_installed, monkeypatch):
    """The derivation is what makes these load: swap the trace for the old hand tables and the same swift
    adapter is refused (Qwen3-VL: LMDeploy names the LLM language_model.layers.*; Phi-3: the checkpoint holds
    fused qkv_proj / gate_up_proj)."""
    from lmdeploy.pytorch.models import patch

    from lmdeploy_regex_lora.serve import loader

    base = tiny_arch(arch)
    spec = dict(CASES[arch][1][0])
    adir = make_peft_adapter(base, tmp_path / "a", seed=5, **spec)
    model = build_lmdeploy_model(base)
    patch.add_adapters(model, {"a": str(adir)}, dtype=torch.float32, device=torch.device("cpu"))
    assert any(len(getattr(m, "lora_adapters", {})) for m in model.modules())

    monkeypatch.setattr(loader, "ModelMap", HandModelMap)
    with pytest.raises(AdapterError):
        patch.add_adapters(build_lmdeploy_model(base), {"a": str(adir)}, dtype=torch.float32,
                           device=torch.device("cpu"))


def test_trace_only_what_the_adapter_needs(tiny_arch, tmp_path):
    """Loading traces the modules the adapters have tensors for (plus what matching asks about), not the model."""
    from lmdeploy_regex_lora.serve import loader

    base = tiny_arch("qwen3")
    adir = make_peft_adapter(base, tmp_path / "a", naming="tf5", target_modules=["q_proj"], r=4, lora_alpha=8)
    model = build_lmdeploy_model(base)
    load = loader.resolve(model, {"a": str(adir)})
    assert set(load.sites) == {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}


def _refused_after(change, tiny_model, tmp_path) -> str:
    """Build Qwen2, apply ``change`` to the served model, load an adapter: refused, the model left as it was."""
    from lmdeploy.pytorch.models import patch

    base = tiny_model("qwen2")
    adir = make_peft_adapter(base, tmp_path / "a", target_modules=["q_proj"], r=4, lora_alpha=8)
    model = build_lmdeploy_model(base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    change(model)
    with pytest.raises(AdapterError) as err:
        patch.add_adapters(model, {"a": str(adir)}, dtype=torch.float32, device=torch.device("cpu"))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(len(getattr(m, "lora_adapters", {})) for m in model.modules())
    return str(err.value)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_missing_checkpoint_folder_is_refused(on_error, tiny_model, tmp_path, plugin_installed, monkeypatch):
    """Names no adapter: even LMDEPLOY_REGEX_LORA_ON_ERROR=skip stops the load (it would otherwise skip all)."""
    monkeypatch.setenv("LMDEPLOY_REGEX_LORA_ON_ERROR", on_error)

    def move(model):
        model.config._name_or_path = str(tmp_path / "moved-away")

    msg = _refused_after(move, tiny_model, tmp_path)
    assert "moved-away" in msg and "_name_or_path" in msg and " Fix: " in msg, msg


def test_skeleton_that_differs_from_the_served_model_is_refused(tiny_model, tmp_path, plugin_installed):
    """The rebuild from model.config must be the served model (here the config says 3 layers, the model has 2)."""
    import copy

    def grow(model):
        model.config = copy.copy(model.config)
        model.config.num_hidden_layers = 3

    msg = _refused_after(grow, tiny_model, tmp_path)
    assert "differs from the one LMDeploy builds" in msg and "layers.2" in msg and " Fix: " in msg, msg


def test_tied_lm_head_takes_the_embeddings_rows(tiny_model, tmp_path, plugin_installed):
    """With tie_word_embeddings the checkpoint has no lm_head.weight and LMDeploy's lm_head *is* the embedding's
    parameter after loading: its site has the embedding's rows (post-load alias), served per request. (A PEFT
    merge would change the shared embedding too, so the check is the slot against scaling * B @ A.)"""
    import json
    import shutil

    from lmdeploy.pytorch.models import patch
    from safetensors.torch import load_file, save_file

    from lmdeploy_regex_lora.testing.compare import slot_delta

    folder = tmp_path / "tied"
    shutil.copytree(tiny_model("qwen2"), folder)
    state = load_file(str(folder / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"tie_word_embeddings": True}))
    adir = make_peft_adapter(folder, tmp_path / "a", seed=9, target_modules=["lm_head", "q_proj"], r=4, lora_alpha=8)
    model = build_lmdeploy_model(folder)
    plan = patch.add_adapters(model, {"a": str(adir)}, dtype=torch.float32, device=torch.device("cpu"))
    head = next(m for m in plan.adapters[0].modules if m.hf_name == "lm_head")
    assert head.serving == "lm-head", head
    tensors = load_file(str(adir / "adapter_model.safetensors"))
    a = tensors["base_model.model.lm_head.lora_A.weight"].double()
    b = tensors["base_model.model.lm_head.lora_B.weight"].double()
    assert torch.allclose(slot_delta(model.lm_head, 1), head.scaling * (b @ a), atol=1e-6)
