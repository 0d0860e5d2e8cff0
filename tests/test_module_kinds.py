"""What the right adapter on the right architecture cannot get per request, refused by module kind, and the
opt-in fold of routed MoE experts. Adapters are real PEFT ones on the tiny checkpoints of ``tiny_archs``;
DeepSeek is built under the test-only CPU stand-ins (``tests/support/cpu_standins.py``, conftest)."""

from __future__ import annotations

import logging

import pytest
import torch

from lmdeploy_regex_lora.errors import AdapterError
from lmdeploy_regex_lora.serve.plan import ENV_FOLD_EXPERTS
from lmdeploy_regex_lora.testing.build import build_lmdeploy_model
from lmdeploy_regex_lora.testing.compare import compare, load_models
from tests.support.peft_fixtures import make_peft_adapter, merge_adapter_checkpoint
from tests.test_architectures import DSV3, L7, QWEN35, swift

pytestmark = pytest.mark.slow


def _adapter(base, tmp_path, name: str, targets, naming: str = "tf5", seed: int = 81) -> str:
    return str(make_peft_adapter(base, tmp_path / name, seed=seed, naming=naming, target_modules=targets, r=8,
                                 lora_alpha=16))


def _refusal(base, adapters: dict[str, str]) -> tuple[str, dict]:
    from lmdeploy.pytorch.models import patch

    model = build_lmdeploy_model(base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(AdapterError) as err:
        patch.add_adapters(model, adapters, dtype=torch.float32, device=torch.device("cpu"))
    changed = [n for n, p in model.named_parameters() if n not in before or not torch.equal(p, before[n])]
    assert changed == [], changed  # the model is left as it was
    assert not any(len(getattr(m, "lora_adapters", {})) for m in model.modules())
    return str(err.value), before


#: case -> (arch, targets, naming, words the message must hold)
REFUSALS = {
    # LMDeploy copies kv_b_proj into its kc/vc BMM weights after loading and never runs kv_b_proj
    "deepseek-kv_b_proj": ("deepseek_v3", swift("model", DSV3), "tf5",
                           ["absorbs", "kv_b_proj", "kc", "never runs", "merge"]),
    # swift's default for Qwen3.5-MoE includes shared_expert_gate, a plain nn.Linear in LMDeploy's model
    "qwen3_5_moe-shared_expert_gate": ("qwen3_5_moe", swift("model.language_model", QWEN35 + "|shared_expert_gate"),
                                       "tf5", ["without a LoRA path", "shared_expert_gate", "torch.nn.Linear"]),
    # transformers 4.x per-expert linears: LMDeploy's fused MoE has no LoRA path
    "qwen3_moe-experts": ("qwen3_moe", swift("model", L7), "checkpoint",
                          ["MoE experts", "fused MoE", "no LoRA path", "merge", ENV_FOLD_EXPERTS]),
    "mixtral-experts": ("mixtral", r"^(model(?=\.).*\.(w1|w2|w3|q_proj))$", "checkpoint", ["MoE experts", "fused MoE"]),
    # DeepSeek's LM head is a ParallelLMHead (an embedding class) in LMDeploy
    "deepseek-lm_head": ("deepseek_v2", ["lm_head", "q_proj"], "checkpoint", ["ParallelLMHead", "no LoRA path"]),
    # MiniCPM-V 2.6's vision tower is not part of LMDeploy's PyTorch model
    "minicpmv-vision": ("minicpmv26", ["q_proj"], "checkpoint", ["does not load", "vpm.", "skips it"]),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_unservable_kinds_are_refused_by_name(case, tiny_arch, tmp_path, plugin_installed):
    arch, targets, naming, words = REFUSALS[case]
    base = tiny_arch(arch)
    msg, _ = _refusal(base, {"x": _adapter(base, tmp_path, "x", targets, naming)})
    assert "cannot serve LoRA on" in msg and " Fix: " in msg and "trained on" not in msg, msg
    for word in words:
        assert word in msg, (word, msg)


def _expert_params(model) -> dict[str, torch.Tensor]:
    from lmdeploy.pytorch.nn.moe.base import FusedMoEBase

    return {f"{n}.{p}": t.detach().double() for n, m in model.named_modules() if isinstance(m, FusedMoEBase)
            for p, t in m.named_parameters()}


@pytest.mark.parametrize("arch, targets", [("qwen3_moe", r"^(model(?=\.).*\.(down_proj|gate_proj|up_proj|q_proj))$"),
                                           ("mixtral", r"^(model(?=\.).*\.(w1|w2|w3))$")])
def test_expert_fold_opt_in(arch, targets, tiny_arch, tmp_path, plugin_installed, monkeypatch, caplog):
    """LMDEPLOY_REGEX_LORA_FOLD_EXPERTS=1: one adapter's expert deltas are folded into the fused expert weights
    (every request sees them, warned once); the adapter's other layers stay per request. Exact against PEFT's
    merge on the expert parameters LMDeploy loads, too."""
    from lmdeploy.pytorch.models import patch

    monkeypatch.setenv(ENV_FOLD_EXPERTS, "1")
    base = tiny_arch(arch)
    adir = _adapter(base, tmp_path, "e", targets, "checkpoint")
    merged_dir = merge_adapter_checkpoint(base, adir, tmp_path / "e-merged", naming="checkpoint")
    base_model, merged = load_models(base, {1: merged_dir})
    served = build_lmdeploy_model(base)
    with caplog.at_level(logging.WARNING, logger="lmdeploy.regex_lora"):
        plan = patch.add_adapters(served, {"e": adir}, dtype=torch.float32, device=torch.device("cpu"))
    warnings = [r.getMessage() for r in caplog.records if "routed MoE experts" in r.getMessage()]
    assert len(warnings) == 1 and ENV_FOLD_EXPERTS in warnings[0], warnings
    assert plan.folds and all(f.serving == "moe-experts" for f in plan.folds)
    assert ENV_FOLD_EXPERTS in plan.render()
    got, want, before = _expert_params(served), _expert_params(merged[1]), _expert_params(base_model)
    assert got.keys() == want.keys() and got
    for name in got:
        assert not torch.equal(want[name], before[name]) or name.endswith("bias"), name
        assert torch.allclose(got[name], want[name], rtol=0, atol=1e-6), name
    if "q_proj" in targets:
        compare(served, base_model, merged, folded=set())  # attention per request; experts checked above


def test_expert_fold_refuses_two_different_deltas(tiny_arch, tmp_path, plugin_installed, monkeypatch):
    monkeypatch.setenv(ENV_FOLD_EXPERTS, "1")
    base = tiny_arch("qwen3_moe")
    regex = r"^(model(?=\.).*\.(down_proj))$"
    adapters = {n: _adapter(base, tmp_path, n, regex, "checkpoint", seed=s) for n, s in (("a", 1), ("b", 2))}
    msg, _ = _refusal(base, adapters)
    assert "change the same MoE expert differently" in msg and ENV_FOLD_EXPERTS in msg, msg


def test_deepseek_mla_served_per_request_where_lmdeploy_runs_it(tiny_arch, tmp_path, plugin_installed):
    """q_a_proj, q_b_proj and kv_a_proj_with_mqa (rope rows permuted by LMDeploy's loader) per request, exact."""
    from tests.test_architectures import serve_and_compare

    stats = serve_and_compare(tiny_arch("deepseek_v3"), [dict(target_modules=["q_b_proj", "kv_a_proj_with_mqa"],
                                                              naming="tf5", r=8, lora_alpha=8)], tmp_path)
    assert stats["targeted"] == 4, stats  # 2 layers x 2 modules


def test_nested_glm4v_config_is_not_built_by_lmdeploy(tiny_arch, tmp_path):
    """LMDeploy 0.18's glm4_1v reads the text fields at the top level of config.json; the layout transformers
    5.24 writes nests them in text_config only, and LMDeploy cannot build that (docs/supported.md)."""
    import json
    import shutil

    folder = tmp_path / "glm4v-nested"
    shutil.copytree(tiny_arch("glm4_1v"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    nested = {k: v for k, v in cfg.items() if k not in cfg["text_config"] or k in ("model_type",)}
    (folder / "config.json").write_text(json.dumps(nested))
    with pytest.raises(AdapterError) as err:
        build_lmdeploy_model(folder)
    assert "LMDeploy cannot build this model" in str(err.value) and "pad_token_id" in str(err.value)
