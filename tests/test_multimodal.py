"""Multimodal adapters: vision-tower and projector LoRA served per request, several such adapters together.

Every vision/projector layer an adapter trains gets an image-row LoRA slot (plain ``nn.Linear`` layers a
wrapper with the same Parameters), so adapters that differ there load side by side; each adapter id's
effective weights must equal its PEFT-merged model's and id 0 the base, module by module
(``testing.compare``, which reads those slots like any other). The row mapping itself runs in
tests/test_vision.py. Folding stays available as an explicit choice (``LMDEPLOY_REGEX_LORA_FOLD_VISION=1``),
with its old rules: one delta per layer, every request sees it. Also: refusals (a VLM whose image rows are
not verified, InternVL flash mode), and that a failed load and ``uninstall()`` put wrapped layers back.
"""

from __future__ import annotations

import logging

import pytest
import torch

from lmdeploy_regex_lora.errors import AdapterError
from lmdeploy_regex_lora.serve.model_map import IMAGE_ROWS
from lmdeploy_regex_lora.serve.vision_policy import ENV_FOLD_VISION
from lmdeploy_regex_lora.testing.build import build_lmdeploy_model
from lmdeploy_regex_lora.testing.compare import compare, load_models
from tests.support.bad_inputs import ModelState, load
from tests.support.peft_fixtures import make_peft_adapter, merge_adapter_checkpoint

pytestmark = pytest.mark.slow

INTERNVL = "internvl2_internlm2"
QWEN_LEAVES = "v_proj|gate_proj|o_proj|down_proj|q_proj|k_proj|up_proj"

# InternVL2-8B adapters as each ms-swift default writes them (swift-adapters.md §1).
CASES = {
    # v2.2.4-v2.2.5: per-LLM regex with the projector
    "swift-2.2.4": dict(target_modules=r".*(wqkv|wo|w[123]|mlp1\.(1|3))$", r=8, lora_alpha=32),
    # v2.3-v2.6: prefix + negative look-ahead over language_model and mlp1 (norms match too: not linear)
    "swift-2.6": dict(target_modules=r"^(language_model|mlp1)(?!.*(lm_head|output|emb|wte|shared)).*", r=16,
                      lora_alpha=16),
    # v3.4.1+ with --freeze_vit false --freeze_aligner false: LLM incl. LM head, ViT and projector
    "swift-3.x-unfrozen": dict(target_modules=r"^(language_model.*\.(output|w2|w3|w1|wo|wqkv)|vision_model.*\."
                                              r"(fc1|fc2|proj|qkv)|mlp1.*\.(1|3))$", r=24, lora_alpha=48),
    # v3.x with --freeze_llm true --freeze_vit false: the vision tower only
    "swift-3.x-vit-only": dict(target_modules=r"^(vision_model.*\.(fc1|fc2|proj|qkv))$", r=8, lora_alpha=8,
                               use_rslora=True),
}


def _tower(plan) -> dict[str, list[int]]:
    """LMDeploy module[slot] -> ranks per adapter id, for the image-row slots."""
    return {f"{s.lmdeploy_module}[{s.slot}]": s.ranks for s in plan.slots if s.serving == IMAGE_ROWS}


def _load_pair(tiny_model, tmp_path, arch, spec_a, spec_b, naming="checkpoint"):
    """Two adapters (ids 1, 2), their PEFT merges and the served model; returns (plan, served, base, merged)."""
    base_dir = tiny_model(arch)
    adapters, merged = {}, {}
    for i, spec in enumerate((spec_a, spec_b)):
        folder = make_peft_adapter(base_dir, tmp_path / f"a{i}", seed=31 + i, naming=naming, **spec)
        adapters[f"a{i}"] = str(folder)
        merged[i + 1] = merge_adapter_checkpoint(base_dir, folder, tmp_path / f"m{i}")
    base, merged_models = load_models(base_dir, merged)
    served = build_lmdeploy_model(base_dir)
    plan = load(served, adapters)
    return plan, served, base, merged_models


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_swift_default_adapters_load_together(case, tiny_model, tmp_path, plugin_installed, caplog):
    """The issue's reproduction: two task adapters of one ms-swift default form on one InternVL2 model."""
    spec_b = dict(CASES[case], r=12, lora_alpha=24)
    with caplog.at_level(logging.WARNING, logger="lmdeploy.regex_lora"):
        plan, served, base, merged = _load_pair(tiny_model, tmp_path, INTERNVL, CASES[case], spec_b)
    tower = _tower(plan)
    assert tower and not plan.folds, "this form trains the projector or the vision tower"
    assert all(ranks[1] == CASES[case]["r"] and ranks[2] == 12 and ranks[0] == 0 for ranks in tower.values())
    stats = compare(served, base, merged)  # per adapter id, the image-row slots included; id 0 exactly zero
    assert stats["folded"] == stats["folded_shared"] == 0 and stats["targeted"] >= 2 * len(tower)
    assert all(m in stats["per_module"] for m in (k.split("[")[0] for k in tower))
    assert not any("folded" in r.getMessage() for r in caplog.records)
    assert "vision/projector slots serve per request" in plan.render()


QWEN2_VL_UNFROZEN = (rf"^(model.*\.({QWEN_LEAVES})|(?!(visual.merger))visual.*\.(fc1|attn.proj|mlp.2|fc2|mlp.0|qkv)"
                     r"|visual.merger.*\.(2|0))$")
# (arch, naming the trainer's transformers used, regex as ms-swift writes it, second adapter's targets or
# None for the same form), swift-adapters.md §1. "unfrozen": --freeze_vit false --freeze_aligner false.
VLM_CASES = {
    "qwen2_vl-tf<4.52": ("qwen2_vl", "checkpoint", rf"^(model.*\.({QWEN_LEAVES}))$", ["q_proj", "o_proj"]),
    "qwen2_vl-tf>=4.52-swift4": ("qwen2_vl", "tf452", rf"^(model\.language_model(?=\.).*\.({QWEN_LEAVES}))$",
                                 ["q_proj", "o_proj"]),
    # swift v3.0.3 with freeze_vit=False: the whole ViT except the merger, plus the LLM
    "qwen2_vl-swift3.0-vit": ("qwen2_vl", "checkpoint",
                              r"(?!^(visual.merger))^(model|visual)(?!.*(lora_A|lora_B|base_layer|emb|wte|shared"
                              r"|lm_head|output|score|v_head|classifier)).*", ["q_proj", "o_proj"]),
    "qwen2_vl-tf<4.52-unfrozen": ("qwen2_vl", "checkpoint", QWEN2_VL_UNFROZEN, None),
    "qwen2_5_vl-tf<4.52": ("qwen2_5_vl", "checkpoint", rf"^(model.*\.({QWEN_LEAVES}))$", ["q_proj", "o_proj"]),
    "qwen2_5_vl-tf>=4.52-unfrozen": ("qwen2_5_vl", "tf452",
                                     rf"^(model.language_model.*\.({QWEN_LEAVES})|(?!(model.visual.merger))"
                                     r"model.visual.*\.(down_proj|attn.proj|mlp.2|up_proj|mlp.0|qkv|gate_proj)"
                                     r"|model.visual.merger.*\.(2|0))$", None),
    "llava-tf<4.52": ("llava", "checkpoint", rf"^(language_model.*\.({QWEN_LEAVES}))$", ["q_proj", "o_proj"]),
    "llava-tf<4.52-unfrozen": ("llava", "checkpoint",
                               rf"^(language_model.*\.({QWEN_LEAVES})|vision_tower.*\.(q_proj|k_proj|v_proj|out_proj"
                               r"|fc1|fc2)|multi_modal_projector.*\.(linear_1|linear_2))$", None),
    "llava-tf>=4.52-projector": ("llava", "tf452", rf"^(model\.language_model(?=\.).*\.({QWEN_LEAVES})"
                                                   r"|model\.multi_modal_projector.*\.(linear_1|linear_2))$",
                                 ["q_proj", "o_proj"]),
    # transformers' own InternVL (InternVL3-hf), everything unfrozen: LLM, InternViT (q/k/v packed by LMDeploy
    # into qkv_proj) and the projector
    "internvl_hf-tf>=4.52-unfrozen": ("internvl_hf", "tf452",
                                      rf"^(model\.language_model(?=\.).*\.({QWEN_LEAVES})|model\.vision_tower.*\."
                                      r"(q_proj|k_proj|v_proj|projection_layer|fc1|fc2)"
                                      r"|model\.multi_modal_projector.*\.(linear_1|linear_2))$", None),
    # transformers 5.x names LLaVA's CLIP tower model.vision_tower.encoder.* (no vision_model level)
    "llava-tf5-vit": ("llava", "tf5", rf"^(model\.language_model(?=\.).*\.({QWEN_LEAVES})"
                                      r"|model\.vision_tower.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2))$",
                      ["q_proj", "o_proj"]),
}


@pytest.mark.parametrize("case", sorted(VLM_CASES))
def test_vlm_adapters_in_both_namings(case, tiny_model, tmp_path, plugin_installed):
    arch, naming, regex, second = VLM_CASES[case]
    spec_a = dict(target_modules=regex, r=24, lora_alpha=32)
    spec_b = dict(target_modules=second or regex, r=8, lora_alpha=8, use_rslora=True)
    plan, served, base, merged = _load_pair(tiny_model, tmp_path, arch, spec_a, spec_b, naming)
    assert all(a.naming.startswith("transformers>=") == (naming != "checkpoint") for a in plan.adapters), \
        [a.naming for a in plan.adapters]
    stats = compare(served, base, merged)
    assert stats["targeted"] > 0 and not plan.folds
    # Image-row slots exactly where PEFT put LoRA outside the LLM (a list target such as q_proj also hits
    # LLaVA's CLIP), each holding the rank of every adapter that trains it.
    from safetensors import safe_open

    def tower_modules(adapter_dir):
        with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
            return {k.split(".lora_")[0] for k in f.keys() if any(t in k for t in ("visual", "vision", "projector"))}

    expected = tower_modules(tmp_path / "a0") | tower_modules(tmp_path / "a1")
    image_sites = {s.hf_name for s in plan.slots if s.serving == IMAGE_ROWS}
    assert len(image_sites) == len(expected), (sorted(image_sites), sorted(expected))
    if second is None:  # the same unfrozen form twice: every tower slot holds both adapters
        assert image_sites and all(s.ranks[1:] == [24, 8] for s in plan.slots if s.serving == IMAGE_ROWS)


# -- folding, chosen explicitly --------------------------------------------------------------------------

def test_fold_mode_folds_one_adapter_for_every_request(tiny_model, tmp_path, plugin_installed, caplog, monkeypatch):
    monkeypatch.setenv(ENV_FOLD_VISION, "1")
    llm_only = dict(target_modules=["wqkv", "w2"], r=8, lora_alpha=16)
    with caplog.at_level(logging.WARNING, logger="lmdeploy.regex_lora"):
        plan, served, base, merged = _load_pair(tiny_model, tmp_path, INTERNVL, CASES["swift-3.x-unfrozen"],
                                                llm_only)
    folded = {f.lmdeploy_module for f in plan.folds}
    assert folded and all(f.adapter == "a0" for f in plan.folds) and not _tower(plan)
    stats = compare(served, base, merged, folded=folded)
    assert stats["folded"] == len(folded)  # adapter a0 sees exactly its merged weights there
    assert stats["folded_shared"] == len(folded)  # ... and so does a1: the cost of folding, counted
    warnings = [r.getMessage() for r in caplog.records if "folded into the base weights" in r.getMessage()]
    assert len(warnings) == 1 and "a0" in warnings[0] and ENV_FOLD_VISION in warnings[0]
    assert f"as {ENV_FOLD_VISION}=1 asks" in plan.render()


def test_fold_mode_refuses_conflicting_deltas(tiny_model, tmp_path, plugin_installed, monkeypatch):
    monkeypatch.setenv(ENV_FOLD_VISION, "1")
    base_dir = tiny_model(INTERNVL)
    a0 = make_peft_adapter(base_dir, tmp_path / "a0", seed=41, **CASES["swift-2.2.4"])
    a1 = make_peft_adapter(base_dir, tmp_path / "a1", seed=42, **CASES["swift-2.2.4"])
    served = build_lmdeploy_model(base_dir)
    state = ModelState(served)
    with pytest.raises(AdapterError) as err:
        load(served, {"first": str(a0), "second": str(a1)})
    msg = str(err.value)
    assert "'first'" in msg and "'second'" in msg and "mlp1." in msg and f"Fix: unset {ENV_FOLD_VISION}" in msg
    assert state.differences() == []
    monkeypatch.setenv(ENV_FOLD_VISION, "0")
    assert _tower(load(served, {"first": str(a0), "second": str(a1)}))  # per request: they load together


def test_fold_mode_folds_identical_deltas_once(tiny_model, tmp_path, plugin_installed, monkeypatch):
    """The same adapter under two names agrees with itself: folded once, both names exact."""
    monkeypatch.setenv(ENV_FOLD_VISION, "yes")
    base_dir = tiny_model(INTERNVL)
    a0 = make_peft_adapter(base_dir, tmp_path / "a0", seed=43, **CASES["swift-2.2.4"])
    merged = merge_adapter_checkpoint(base_dir, a0, tmp_path / "m0")
    base, merged_models = load_models(base_dir, {1: merged, 2: merged})
    served = build_lmdeploy_model(base_dir)
    plan = load(served, {"x": str(a0), "y": str(a0)})
    stats = compare(served, base, merged_models, folded={f.lmdeploy_module for f in plan.folds})
    assert stats["folded"] == 2 * len(plan.folds) and stats["folded_shared"] == 0


# -- refusals ----------------------------------------------------------------------------------------------

def test_unverified_vlm_is_refused_with_the_reason_and_the_fold_as_fix(tiny_model, tmp_path, plugin_installed,
                                                                     monkeypatch):
    """A VLM class without a verified image-row rule (LLaVA taken out of the table stands for one): refused at
    load with the reason and the explicit fold as the fix, the model untouched; with the fold chosen it loads."""
    from lmdeploy_regex_lora.serve import vision_policy

    monkeypatch.delitem(vision_policy.VISION_MODELS, "lmdeploy.pytorch.models.llava.LlavaForConditionalGeneration")
    base_dir = tiny_model("llava")
    adapter = make_peft_adapter(base_dir, tmp_path / "a", seed=7, r=8,
                                target_modules=r"^(multi_modal_projector.*\.(linear_1|linear_2))$")
    served = build_lmdeploy_model(base_dir)
    state = ModelState(served)
    with pytest.raises(AdapterError) as err:
        load(served, {"proj": str(adapter)})
    msg = str(err.value)
    assert "and LlavaForConditionalGeneration is not a model whose image rows are verified" in msg, msg
    assert "multi_modal_projector.linear_1" in msg and f"Fix: set {ENV_FOLD_VISION}=1" in msg, msg
    assert state.differences() == []
    monkeypatch.setenv(ENV_FOLD_VISION, "on")
    assert len(load(served, {"proj": str(adapter)}).folds) == 2


def test_fold_switch_must_be_a_boolean(tiny_model, tmp_path, plugin_installed, monkeypatch):
    """A typo stops the load, even where a bad adapter would only be skipped."""
    monkeypatch.setenv(ENV_FOLD_VISION, "perhaps")
    monkeypatch.setenv("LMDEPLOY_REGEX_LORA_ON_ERROR", "skip")
    base_dir = tiny_model(INTERNVL)
    adapter = make_peft_adapter(base_dir, tmp_path / "a", seed=8, **CASES["swift-2.2.4"])
    with pytest.raises(AdapterError, match=f"field '{ENV_FOLD_VISION}'.*neither on"):
        load(build_lmdeploy_model(base_dir), {"a": str(adapter)})


def test_flash_mode_internvl_is_refused_for_every_adapter(tiny_model, tmp_path, plugin_installed):
    """InternVL flash mode rebuilds the step inside forward (tests/test_vision.py shows what that breaks)."""
    import json
    import shutil

    base_dir = tiny_model(INTERNVL)
    flash = tmp_path / "flash"
    shutil.copytree(base_dir, flash)
    cfg = json.loads((flash / "config.json").read_text())
    cfg.update(flash_mode=True, flash_relative_threshold=0.8, flash_absolute_threshold=1.0)
    (flash / "config.json").write_text(json.dumps(cfg))
    adapter = make_peft_adapter(base_dir, tmp_path / "llm", seed=9, target_modules=["wqkv", "w2"], r=8)
    served = build_lmdeploy_model(flash, "meta")
    assert served.flash_mode
    with pytest.raises(AdapterError) as err:
        load(served, {"llm": str(adapter)})
    msg = str(err.value)
    assert "flash mode" in msg and "q_start_loc" in msg and "Fix: merge the adapter" in msg, msg


# -- wrapped plain nn.Linear layers go back --------------------------------------------------------------

def test_failed_load_and_uninstall_put_plain_linears_back(tiny_model, tmp_path, plugin_installed, monkeypatch):
    import lmdeploy_regex_lora
    from lmdeploy_regex_lora.serve.loader import resolve
    from lmdeploy_regex_lora.serve.vision import LoRALinear

    base_dir = tiny_model(INTERNVL)
    adapter = str(make_peft_adapter(base_dir, tmp_path / "a", seed=10, **CASES["swift-3.x-unfrozen"]))
    served = build_lmdeploy_model(base_dir)
    state = ModelState(served)
    plan = resolve(served, {"a": adapter}).plan
    assert [s.hf_name for s in plan.slots][-1].startswith("vision_model.")  # attached after mlp1.1 / mlp1.3
    attach = torch.nn.ModuleDict.__setitem__
    calls = {"n": 0}

    def fail_last(self, key, value):
        calls["n"] += 1
        if calls["n"] == len(plan.slots):
            raise RuntimeError("injected fault")
        attach(self, key, value)

    monkeypatch.setattr(torch.nn.ModuleDict, "__setitem__", fail_last)
    with pytest.raises(AdapterError, match="injected fault"):
        load(served, {"a": adapter})
    monkeypatch.undo()
    assert state.differences() == [], state.differences()

    mlp1 = [served.mlp1[1], served.mlp1[3]]
    load(served, {"a": adapter})
    assert all(isinstance(served.mlp1[i], LoRALinear) for i in (1, 3))
    assert served.mlp1[1].weight is mlp1[0].weight and "mlp1.1.weight" in dict(served.named_parameters())
    lmdeploy_regex_lora.uninstall()
    assert [served.mlp1[1], served.mlp1[3]] == mlp1  # the very objects, not copies
    x = torch.randn(3, mlp1[0].in_features)
    assert torch.equal(served.mlp1[1](x), torch.nn.functional.linear(x, mlp1[0].weight, mlp1[0].bias))
    # InternViT's image-row slots (LMDeploy's own linears) stay, and refuse to run without the plugin's record.
    from lmdeploy_regex_lora.testing import vision_check as vc

    with pytest.raises(RuntimeError, match="plugin was uninstalled"):
        vc.VisionRunner(served, base_dir).embeddings(vc.make_requests(served))


def test_vision_linear_in_dp_tp_mode_is_refused(tiny_model, tmp_path, plugin_installed):
    """LMDeploy's DP_TP layers may gather input rows from other data-parallel ranks, so their rows are not this
    step's images. No CPU build runs DP attention: the attributes LMDeploy sets then are put on one layer here."""
    from lmdeploy.pytorch.config import TPMode

    from lmdeploy_regex_lora.serve.loader import resolve

    base_dir = tiny_model(INTERNVL)
    adapter = make_peft_adapter(base_dir, tmp_path / "a", seed=11, **CASES["swift-3.x-vit-only"])
    served = build_lmdeploy_model(base_dir, "meta")
    fc1 = served.get_submodule("vision_model.encoder.layers.0.mlp.fc1")
    fc1.tp, fc1.tp_mode = 2, TPMode.DP_TP
    with pytest.raises(AdapterError, match="data-parallel attention"):
        resolve(served, {"a": str(adapter)})
