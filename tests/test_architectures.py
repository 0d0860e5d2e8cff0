"""Issue 11's architectures: ms-swift's default regex for each family, served exactly as PEFT merges it.

Each case writes two real PEFT adapters on the tiny checkpoint of one architecture (``testing/tiny_archs.py``:
the Hub's layout and names), swift's default regex for that family first (the form swift 4.x writes, computed
from transformers 5.24's module tree), then loads them through LMDeploy's (hooked) ``add_adapters`` on
LMDeploy's own CPU build and compares every LoRA-carrying layer, for every adapter id, with PEFT's
``merge_and_unload`` checkpoints as LMDeploy loads them (``testing.compare``: untargeted layers exactly equal,
adapter id 0 exactly zero). DeepSeek-V2/V3 are built under test-only CPU stand-ins for two GPU questions
LMDeploy asks at build time (``tests/support/cpu_standins.py``); nothing else is replaced.

``naming``: ``tf5`` trains on the module tree of transformers 5 (routed experts fused, routers not
``nn.Linear``, VLM names such as ``model.language_model.*``); ``checkpoint`` on the checkpoint's names with one
``nn.Linear`` per expert and an ``nn.Linear`` router, as transformers 4.x had them.
"""

from __future__ import annotations

import re

import pytest
import torch

from lmdeploy_regex_lora.testing.compare import compare
from tests.support.peft_fixtures import make_peft_adapter, merge_adapter_checkpoint

pytestmark = pytest.mark.slow

L7 = "down_proj|gate_proj|k_proj|o_proj|q_proj|up_proj|v_proj"
ATTN = "k_proj|o_proj|q_proj|v_proj"
QWEN35 = "down_proj|gate_proj|in_proj_a|in_proj_b|in_proj_qkv|in_proj_z|k_proj|o_proj|out_proj|q_proj|up_proj|v_proj"
GLM = "down_proj|gate_up_proj|k_proj|o_proj|q_proj|v_proj"
DSV2 = "down_proj|gate_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|q_proj|up_proj"
DSV3 = "down_proj|gate_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|q_a_proj|q_b_proj|up_proj"


def swift(prefix: str, leaves: str) -> str:
    """ms-swift 4.x's default LoRA regex: ``^(<escaped prefix>(?=\\.).*\\.(<leaves>))$``."""
    return rf"^({re.escape(prefix)}(?=\.).*\.({leaves}))$"


def without(leaves: str, *drop: str) -> str:
    return "|".join(x for x in leaves.split("|") if x not in drop)


def a(targets, naming: str = "tf5", r: int = 24, alpha: int = 48, **kw) -> dict:
    return dict(target_modules=targets, naming=naming, r=r, lora_alpha=alpha, **kw)


def b(targets, naming: str = "tf5") -> dict:
    return dict(target_modules=targets, naming=naming, r=8, lora_alpha=16, use_rslora=True)


#: case -> (arch, [adapter specs]); the first adapter carries swift's default regex for the family.
CASES = {
    "qwen3": ("qwen3", [a(swift("model", L7)), b(["q_proj", "v_proj"])]),
    # transformers 5 fuses the experts and the router is no nn.Linear: swift targets attention only. The second
    # adapter (transformers 4.x tree) puts LoRA on the router, a LoRA-capable linear in LMDeploy.
    "qwen3_moe": ("qwen3_moe", [a(swift("model", ATTN)), b(["gate", "o_proj"], "checkpoint")]),
    "mistral": ("mistral", [a(swift("model", L7)), b(["k_proj", "down_proj"])]),
    "mixtral": ("mixtral", [a(swift("model", ATTN)), b(["gate", "q_proj"], "checkpoint")]),
    "llama3": ("llama3", [a(swift("model", L7)), b(["o_proj", "up_proj"])]),
    "gemma2": ("gemma2", [a(swift("model", L7)), b(["q_proj"])]),
    "gemma3_text": ("gemma3_text", [a(swift("model", L7)), b(["v_proj", "down_proj"])]),
    "glm4": ("glm4", [a(swift("model", GLM)), b(["gate_up_proj"])]),
    # dense first layer and shared experts (gate/up packed), attention; routed experts fused in transformers 5
    "glm4_moe": ("glm4_moe", [a(swift("model", L7)), b(["q_proj", "down_proj"])]),
    # swift's default also targets kv_b_proj, which LMDeploy absorbs (test_deepseek_kv_b_proj_is_refused)
    "deepseek_v2": ("deepseek_v2", [a(swift("model", without(DSV2, "kv_b_proj"))), b(["kv_a_proj_with_mqa"])]),
    "deepseek_v3": ("deepseek_v3", [a(swift("model", without(DSV3, "kv_b_proj"))), b(["q_a_proj", "q_b_proj"])]),
    "qwen3_vl": ("qwen3_vl", [a(swift("model.language_model", L7)), b(["q_proj", "k_proj"])]),
    "qwen3_vl_moe": ("qwen3_vl_moe", [a(swift("model.language_model", ATTN)), b(["gate", "v_proj"], "checkpoint")]),
    "qwen3_5": ("qwen3_5", [a(swift("model.language_model", QWEN35)), b(["in_proj_b", "in_proj_a"])]),
    # swift's default also targets shared_expert_gate, a plain nn.Linear in LMDeploy (test_unservable_kinds)
    "qwen3_5_moe": ("qwen3_5_moe", [a(swift("model.language_model", without(QWEN35, "shared_expert_gate"))),
                                    b(["in_proj_qkv", "out_proj"])]),
    "glm4_1v": ("glm4_1v", [a(swift("model.language_model", GLM)), b(["gate_up_proj", "o_proj"])]),
    "gemma3_vl": ("gemma3_vl", [a(swift("model.language_model", L7)), b(["o_proj", "up_proj"])]),
    "llama4": ("llama4", [a(swift("language_model", L7)), b(["router", "gate_proj"], "checkpoint")]),
    "internvl_qwen3": ("internvl_qwen3", [a(swift("language_model", L7)), b(["down_proj"])]),
    "internvl_phi3": ("internvl_phi3", [a(swift("language_model", "down_proj|gate_up_proj|o_proj|qkv_proj")),
                                        b(["qkv_proj"])]),
    "internvl3_hf_qwen3": ("internvl3_hf_qwen3", [a(swift("model.language_model", L7)), b(["gate_proj", "up_proj"])]),
    "interns1": ("interns1", [a(swift("model.language_model", L7)), b(["o_proj"])]),
    "minicpmv26": ("minicpmv26", [a(swift("llm", L7)), b(["o_proj", "gate_proj"])]),
}


def serve(base_dir, specs, tmp_path) -> tuple:
    """(served model, plan, base model, {id: merged model}): the adapters of ``specs`` (ids 1, 2, ...) written by
    PEFT, loaded through LMDeploy's hooked ``add_adapters``, and PEFT's merges as LMDeploy loads them."""
    from lmdeploy.pytorch.models import patch

    from lmdeploy_regex_lora.testing.build import build_lmdeploy_model
    from lmdeploy_regex_lora.testing.compare import load_models

    adapters, merged_dirs = {}, {}
    for i, spec in enumerate(specs):
        spec = dict(spec)
        naming = spec.pop("naming")
        adir = make_peft_adapter(base_dir, tmp_path / f"a{i}", seed=71 + i, naming=naming, **spec)
        adapters[f"a{i}"] = str(adir)
        merged_dirs[i + 1] = merge_adapter_checkpoint(base_dir, adir, tmp_path / f"a{i}-merged", naming=naming)
    base, merged = load_models(base_dir, merged_dirs)
    served = build_lmdeploy_model(base_dir)
    plan = patch.add_adapters(served, adapters, dtype=torch.float32, device=torch.device("cpu"))
    return served, plan, base, merged


def serve_and_compare(base_dir, specs, tmp_path, folded=frozenset()) -> dict:
    served, _, base, merged = serve(base_dir, specs, tmp_path)
    stats = compare(served, base, merged, folded=folded)
    assert stats["targeted"] >= 2 and stats["slots"] > 0, stats
    return stats


@pytest.mark.parametrize("case", sorted(CASES))
def test_swift_default_is_served_exactly(case, tiny_arch, tmp_path, plugin_installed):
    arch, specs = CASES[case]
    serve_and_compare(tiny_arch(arch), specs, tmp_path)


#: case -> (arch, swift version whose form adapter a takes, LLM prefix and leaves, adapter b's targets (vision and
#: projector layers, the plain nn.Linear ones among them), {LMDeploy module: expected wrapper} plain linears).
#: swift 3.x (3.4.1 - 3.12.5) wrote the prefixes bare, 4.x escaped with ``(?=\.)`` (tests/support/swift_regex.py).
UNFROZEN = {
    "qwen3_vl-swift4": ("qwen3_vl", 4, "model.language_model", L7, ["qkv", "linear_fc1"], ()),
    "qwen3_vl_moe-swift3": ("qwen3_vl_moe", 3, "model.language_model", ATTN, ["attn.proj", "linear_fc2"], ()),
    "qwen3_5-swift4": ("qwen3_5", 4, "model.language_model", QWEN35, ["qkv", "linear_fc2"], ()),
    "qwen3_5_moe-swift4": ("qwen3_5_moe", 4, "model.language_model", QWEN35, ["attn.proj"], ()),
    "glm4_1v-swift3": ("glm4_1v", 3, "model.language_model", GLM, ["merger.proj", "up_proj", "qkv"],
                       ("visual.merger.proj",)),
    # merger gate/up: packed into LMDeploy's gate_up_proj
    "glm4_1v-swift4": ("glm4_1v", 4, "model.language_model", GLM, ["merger.gate_proj", "merger.up_proj"], ()),
    "gemma3_vl-swift4": ("gemma3_vl", 4, "model.language_model", L7, ["out_proj", "fc2"], ()),
    "llama4-swift3": ("llama4", 3, "language_model", L7, ["patch_embedding.linear", "linear_1", "fc2"],
                      ("vision_model.patch_embedding.linear", "multi_modal_projector.linear_1")),
    "llama4-swift4": ("llama4", 4, "language_model", L7, ["vision_adapter.mlp.fc1"],
                      ("vision_model.patch_embedding.linear", "multi_modal_projector.linear_1")),
}


@pytest.mark.parametrize("case", sorted(UNFROZEN))
def test_swift_unfrozen_vlm_is_served_per_image(case, tiny_arch, tmp_path, plugin_installed):
    """ms-swift's form with --freeze_vit false --freeze_aligner false on issue 11's VLMs, and a second adapter on
    other vision / projector layers: both load together, each adapter id's effective weights equal its merged
    model's and id 0 the base, module by module; every vision and projector layer gets an image-row slot (plain
    nn.Linear layers a wrapper sharing their Parameters). tests/test_vision.py runs the image rows themselves."""
    from lmdeploy_regex_lora.serve.model_map import IMAGE_ROWS
    from lmdeploy_regex_lora.serve.vision import LoRALinear
    from tests.support.swift_regex import swift_unfrozen

    arch, version, llm, leaves, second, plain = UNFROZEN[case]
    specs = [a(swift_unfrozen(arch, llm, leaves, version)), b(second)]
    served, plan, base, merged = serve(tiny_arch(arch), specs, tmp_path)
    stats = compare(served, base, merged)
    assert stats["targeted"] >= 2 and not plan.folds, stats
    assert all(any(m.serving == IMAGE_ROWS for m in ap.modules) for ap in plan.adapters)  # both train the tower
    tower = [s for s in plan.slots if s.serving == IMAGE_ROWS]
    assert {i for s in tower for i, r in enumerate(s.ranks) if r} == {1, 2}, [s.ranks for s in tower]
    wrapped = {n for n, m in served.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == set(plain) and all(m in stats["per_module"] for m in plain), (wrapped, plain)


def test_all_linear_is_every_linear_but_the_output_layer(tiny_arch, tmp_path, plugin_installed):
    """``target_modules: "all-linear"`` (any case, as PEFT compares it) on the real Qwen3ForCausalLM: PEFT 0.14 wraps
    every nn.Linear but the LM head; the plugin serves the same modules exactly."""
    import json

    from lmdeploy.pytorch.models import patch

    from lmdeploy_regex_lora.testing.build import build_lmdeploy_model
    from lmdeploy_regex_lora.testing.compare import load_models

    base = tiny_arch("qwen3")
    adir = make_peft_adapter(base, tmp_path / "a", seed=3, naming="tf5", target_modules="all-linear", r=8,
                             lora_alpha=16)
    cfg_file = adir / "adapter_config.json"
    saved = json.loads(cfg_file.read_text())
    assert sorted(saved["target_modules"]) == sorted(L7.split("|"))  # PEFT saved the expanded leaf names
    cfg_file.write_text(json.dumps(saved | {"target_modules": "ALL-Linear"}))
    merged = merge_adapter_checkpoint(base, adir, tmp_path / "m", naming="tf5")
    base_model, merged_models = load_models(base, {1: merged})
    served = build_lmdeploy_model(base)
    plan = patch.add_adapters(served, {"a": str(adir)}, dtype=torch.float32, device=torch.device("cpu"))
    assert len(plan.adapters[0].modules) == 14 and not any("lm_head" in m.hf_name for m in plan.adapters[0].modules)
    assert all(m.reason == "target_modules 'all-linear'" for m in plan.adapters[0].modules)
    compare(served, base_model, merged_models)


def test_all_linear_matches_peft_on_vlm_trees():
    """PEFT 0.14 (tuners_utils._maybe_include_all_linear_layers) turns all-linear into the leaf names of every
    nn.Linear minus the output layer's *full* name: a top-level lm_head is left out, a nested one is not. The
    plugin's matcher selects what PEFT selects, on transformers' Qwen3-VL (top-level lm_head) and on a tree whose
    head is language_model.lm_head."""
    import transformers
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
    from torch import nn

    from lmdeploy_regex_lora.serve.config import AdapterConfig
    from lmdeploy_regex_lora.serve.matching import TargetMatcher, all_linear_leaves
    from lmdeploy_regex_lora.testing import tiny_arch_configs as c

    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in c.qwen3_vl_cfg(1, False).items() if k != "torch_dtype"})
    with torch.device("meta"):
        model = transformers.Qwen3VLForConditionalGeneration(cfg)
    for output in ("lm_head", "model.language_model.lm_head"):
        if output != "lm_head":  # move the head under the LLM, as pre-4.52 wrappers had it
            model.model.language_model.lm_head = model.lm_head
            model.lm_head = None
            model.get_output_embeddings = lambda m=model: m.model.language_model.lm_head
        peft_cfg = _maybe_include_all_linear_layers(LoraConfig(target_modules="all-linear"), model)
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        want = {n for n in linears if check_target_module_exists(peft_cfg, n)}
        ours = AdapterConfig(name="x", path="p", config_file="f", target_modules="all-linear")
        matcher = TargetMatcher(ours, all_linear_leaves=all_linear_leaves(linears, output))
        assert {n for n in linears if matcher.match(n).targeted} == want, output
        assert (output in want) == (output != "lm_head")
