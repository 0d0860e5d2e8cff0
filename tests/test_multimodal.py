"""Multimodal adapters: projector and vision-tower LoRA folded (one adapter per layer), LM head per request.

LMDeploy's LoRA kernel maps rows to requests through the text step context, which vision-tower and
projector rows do not follow. The plugin folds such a layer's delta into its base weight when exactly
one adapter (or several identical ones) changes it, warns once that every request sees it, and refuses
adapters that disagree there. Everything is checked against PEFT's merge, loaded natively by LMDeploy.
"""

from __future__ import annotations

import logging

import pytest
import torch

from lmdeploy_regex_lora.errors import AdapterError
from lmdeploy_regex_lora.testing.build import build_lmdeploy_model
from lmdeploy_regex_lora.testing.compare import compare, load_models
from tests.support.peft_fixtures import make_peft_adapter, merge_adapter_checkpoint

INTERNVL = "internvl2_internlm2"
LLM_ONLY = dict(target_modules=["wqkv", "w2"], r=8, lora_alpha=16)

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


def _folded(plan) -> set[str]:
    return {f.lmdeploy_module for f in plan.folds}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_swift_multimodal_defaults(case, tiny_model, tmp_path, plugin_installed, caplog):
    from lmdeploy.pytorch.models import patch

    base_dir = tiny_model(INTERNVL)
    a0 = make_peft_adapter(base_dir, tmp_path / "a0", seed=31, **CASES[case])
    a1 = make_peft_adapter(base_dir, tmp_path / "a1", seed=32, **LLM_ONLY)
    merged = {1: merge_adapter_checkpoint(base_dir, a0, tmp_path / "m0"),
              2: merge_adapter_checkpoint(base_dir, a1, tmp_path / "m1")}
    base, merged_models = load_models(base_dir, merged)
    served = build_lmdeploy_model(base_dir)
    with caplog.at_level(logging.WARNING, logger="lmdeploy.regex_lora"):
        plan = patch.add_adapters(served, {"a0": str(a0), "a1": str(a1)}, dtype=torch.float32,
                                  device=torch.device("cpu"))
    folded = _folded(plan)
    assert folded, "this adapter changes the projector or the vision tower"
    assert all(f.adapter == "a0" for f in plan.folds)
    stats = compare(served, base, merged_models, folded=folded)
    assert stats["folded"] == len(folded)  # adapter a0 sees exactly its merged weights there
    assert stats["folded_shared"] == len(folded)  # ... and so does a1: the documented cost, counted
    assert stats["targeted"] > 0
    warnings = [r for r in caplog.records if "folded into the base weights" in r.getMessage()]
    assert len(warnings) == 1 and "a0" in warnings[0].getMessage()
    assert "folded into the base weight" in plan.render()


@pytest.mark.slow
def test_conflicting_projector_deltas_are_refused(tiny_model, tmp_path, plugin_installed):
    from lmdeploy.pytorch.models import patch

    base_dir = tiny_model(INTERNVL)
    spec = CASES["swift-2.2.4"]
    a0 = make_peft_adapter(base_dir, tmp_path / "a0", seed=41, **spec)
    a1 = make_peft_adapter(base_dir, tmp_path / "a1", seed=42, **spec)
    served = build_lmdeploy_model(base_dir)
    before = {k: v.clone() for k, v in served.state_dict().items()}
    with pytest.raises(AdapterError) as err:
        patch.add_adapters(served, {"first": str(a0), "second": str(a1)}, dtype=torch.float32,
                           device=torch.device("cpu"))
    msg = str(err.value)
    assert "'first'" in msg and "'second'" in msg and "mlp1." in msg and "Fix:" in msg
    after = served.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(len(m.lora_adapters) == 0 for m in served.modules() if hasattr(m, "lora_adapters"))


@pytest.mark.slow
def test_identical_projector_deltas_fold_once(tiny_model, tmp_path, plugin_installed):
    """The same adapter under two names agrees with itself: folded once, both names exact."""
    from lmdeploy.pytorch.models import patch

    base_dir = tiny_model(INTERNVL)
    a0 = make_peft_adapter(base_dir, tmp_path / "a0", seed=43, **CASES["swift-2.2.4"])
    merged = merge_adapter_checkpoint(base_dir, a0, tmp_path / "m0")
    base, merged_models = load_models(base_dir, {1: merged, 2: merged})
    served = build_lmdeploy_model(base_dir)
    plan = patch.add_adapters(served, {"x": str(a0), "y": str(a0)}, dtype=torch.float32, device=torch.device("cpu"))
    stats = compare(served, base, merged_models, folded=_folded(plan))
    assert stats["folded"] == 2 * len(plan.folds) and stats["folded_shared"] == 0


QWEN_LEAVES = "v_proj|gate_proj|o_proj|down_proj|q_proj|k_proj|up_proj"

# (arch, naming the trainer's transformers used, regex as ms-swift writes it), swift-adapters.md §1.
VLM_CASES = {
    "qwen2_vl-tf<4.52": ("qwen2_vl", "checkpoint", rf"^(model.*\.({QWEN_LEAVES}))$"),
    "qwen2_vl-tf>=4.52-swift4": ("qwen2_vl", "tf452", rf"^(model\.language_model(?=\.).*\.({QWEN_LEAVES}))$"),
    # swift v3.0.3 with freeze_vit=False: the whole ViT except the merger, plus the LLM
    "qwen2_vl-swift3.0-vit": ("qwen2_vl", "checkpoint",
                              r"(?!^(visual.merger))^(model|visual)(?!.*(lora_A|lora_B|base_layer|emb|wte|shared"
                              r"|lm_head|output|score|v_head|classifier)).*"),
    "qwen2_5_vl-tf<4.52": ("qwen2_5_vl", "checkpoint", rf"^(model.*\.({QWEN_LEAVES}))$"),
    # swift >= 3.4 with --freeze_vit false --freeze_aligner false under transformers >= 4.52
    "qwen2_5_vl-tf>=4.52-unfrozen": ("qwen2_5_vl", "tf452",
                                     rf"^(model.language_model.*\.({QWEN_LEAVES})|(?!(model.visual.merger))"
                                     r"model.visual.*\.(down_proj|attn.proj|mlp.2|up_proj|mlp.0|qkv|gate_proj)"
                                     r"|model.visual.merger.*\.(2|0))$"),
    "llava-tf<4.52": ("llava", "checkpoint", rf"^(language_model.*\.({QWEN_LEAVES}))$"),
    "llava-tf>=4.52-projector": ("llava", "tf452", rf"^(model\.language_model(?=\.).*\.({QWEN_LEAVES})"
                                                   r"|model\.multi_modal_projector.*\.(linear_1|linear_2))$"),
    # transformers 5.x names LLaVA's CLIP tower model.vision_tower.encoder.* (no vision_model level)
    # transformers' own InternVL (InternVL3-hf), everything unfrozen: LLM, InternViT (q/k/v packed by LMDeploy
    # into qkv_proj) and the projector
    "internvl_hf-tf>=4.52-unfrozen": ("internvl_hf", "tf452",
                                      rf"^(model\.language_model(?=\.).*\.({QWEN_LEAVES})|model\.vision_tower.*\."
                                      r"(q_proj|k_proj|v_proj|projection_layer|fc1|fc2)"
                                      r"|model\.multi_modal_projector.*\.(linear_1|linear_2))$", ["o_proj"]),
    # (the second adapter must then leave CLIP's q_proj alone, or the two would conflict there: o_proj only)
    "llava-tf5-vit": ("llava", "tf5", rf"^(model\.language_model(?=\.).*\.({QWEN_LEAVES})"
                                      r"|model\.vision_tower.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2))$",
                      ["o_proj"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(VLM_CASES))
def test_vlm_adapters_in_both_namings(case, tiny_model, tmp_path, plugin_installed):
    from lmdeploy.pytorch.models import patch

    arch, naming, regex, *rest = VLM_CASES[case]
    second_targets = rest[0] if rest else ["q_proj", "o_proj"]
    base_dir = tiny_model(arch)
    a0 = make_peft_adapter(base_dir, tmp_path / "a0", seed=51, naming=naming, target_modules=regex, r=24,
                           lora_alpha=32)
    a1 = make_peft_adapter(base_dir, tmp_path / "a1", seed=52, naming=naming, target_modules=second_targets,
                           r=8, lora_alpha=8, use_rslora=True)
    merged = {1: merge_adapter_checkpoint(base_dir, a0, tmp_path / "m0"),
              2: merge_adapter_checkpoint(base_dir, a1, tmp_path / "m1")}
    base, merged_models = load_models(base_dir, merged)
    served = build_lmdeploy_model(base_dir)
    plan = patch.add_adapters(served, {"a0": str(a0), "a1": str(a1)}, dtype=torch.float32,
                              device=torch.device("cpu"))
    assert all(a.naming.startswith("transformers>=") == (naming != "checkpoint") for a in plan.adapters), \
        [a.naming for a in plan.adapters]
    stats = compare(served, base, merged_models, folded=_folded(plan))
    assert stats["targeted"] > 0
    # Folds exactly where PEFT put LoRA outside the LLM (a list target such as q_proj also hits LLaVA's CLIP).
    from safetensors import safe_open

    def tower_modules(adapter_dir):
        with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
            return {k.split(".lora_")[0] for k in f.keys() if any(t in k for t in ("visual", "vision", "projector"))}

    expected = tower_modules(a0) | tower_modules(a1)
    assert len(plan.folds) == len(expected), ([f.hf_name for f in plan.folds], sorted(expected))
