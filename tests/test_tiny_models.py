"""The tiny models load in LMDeploy exactly as their checkpoints say, and PEFT merges of them do too.

Everything else in the suite trusts these fixtures, so this checks them against LMDeploy's real
build on CPU: every LMDeploy linear (packed ``qkv_proj`` / ``gate_up_proj``, InternLM2's
de-interleaved ``wqkv``) holds the checkpoint's weights, and a PEFT-merged folder changes exactly
the targeted rows, by exactly ``scale * B @ A``.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lmdeploy_regex_lora.testing.build import build_lmdeploy_model, release_inference_tensors
from lmdeploy_regex_lora.testing.tiny_models import (
    ARCHS,
    EMBEDDING_LEAVES,
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    VIT_HIDDEN,
    checkpoint_linear_names,
    make_tiny_model,
)
from tests.support.hand_tables import deinterleave_qkv_rows
from tests.support.peft_fixtures import (
    NAMINGS,
    build_hf_module_tree,
    hf_name,
    make_peft_adapter,
    merge_adapter_checkpoint,
)

LMDEPLOY_CLASSES = {
    "qwen2": "qwen2.Qwen2ForCausalLM",
    "llama": "llama.LlamaForCausalLM",
    "internlm2": "internlm2.InternLM2ForCausalLM",
    "internvl2_internlm2": "internvl.InternVLChatModel",
    "internvl_qwen2": "internvl.InternVLChatModel",
    "internvl_hf": "internvl3_hf.InternVLForConditionalGeneration",
    "qwen2_vl": "qwen2_vl.Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "qwen2_5_vl.Qwen2_5_VLForConditionalGeneration",
    "llava": "llava.LlavaForConditionalGeneration",
}
QWEN_LEAVES = "v_proj|up_proj|o_proj|k_proj|down_proj|gate_proj|q_proj"
VLMS = ("qwen2_vl", "qwen2_5_vl", "llava")


def _lmdeploy_linears(model: nn.Module) -> dict[str, nn.Module]:
    """LMDeploy's LinearBase modules plus the plain nn.Linear ones (InternVL's mlp1)."""
    from lmdeploy.pytorch.nn.linear.base import LinearBase

    return {n: m for n, m in model.named_modules() if isinstance(m, (LinearBase, nn.Linear))}


def _constituents(name: str, ckpt: dict[str, torch.Tensor]) -> list[str]:
    """Checkpoint modules an LMDeploy linear is made of, in row order."""
    parent, _, leaf = name.rpartition(".")
    if leaf == "qkv_proj":
        return [f"{parent}.{x}" for x in ("q_proj", "k_proj", "v_proj")]
    if leaf == "gate_up_proj":
        subs = ("w1", "w3") if f"{parent}.w1.weight" in ckpt else ("gate_proj", "up_proj")
        return [f"{parent}.{x}" for x in subs]
    return [name]


def _expected(name: str, param: str, ckpt: dict[str, torch.Tensor]) -> torch.Tensor:
    """What LMDeploy's linear ``name`` should hold for ``param`` ('weight' / 'bias')."""
    parts = [ckpt[f"{m}.{param}"] for m in _constituents(name, ckpt)]
    if name.endswith("attention.wqkv"):  # InternLM2: HF rows (kv_head, group+2, d) -> [Q; K; V]
        return deinterleave_qkv_rows(parts[0], KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
    return torch.cat(parts, dim=0)


def _assert_matches_checkpoint(model: nn.Module, ckpt: dict[str, torch.Tensor]) -> set[str]:
    """Every linear and every other same-named parameter equals the checkpoint; returns covered modules."""
    covered: set[str] = set()
    for name, mod in _lmdeploy_linears(model).items():
        assert torch.equal(mod.weight, _expected(name, "weight", ckpt)), name
        bias = getattr(mod, "bias", None)
        if bias is not None:
            assert torch.equal(bias, _expected(name, "bias", ckpt)), name
        covered.update(_constituents(name, ckpt))
    linear_params = {f"{n}.{p}" for n in covered for p in ("weight", "bias")}
    params = dict(model.named_parameters())
    for key, tensor in ckpt.items():
        if key not in linear_params:
            assert key in params, f"checkpoint tensor {key} has no LMDeploy parameter"
            assert torch.equal(params[key], tensor), key
    return covered


def test_deterministic(tmp_path):
    a = load_file(str(make_tiny_model("internvl2_internlm2", tmp_path / "a", seed=3) / "model.safetensors"))
    b = load_file(str(make_tiny_model("internvl2_internlm2", tmp_path / "b", seed=3) / "model.safetensors"))
    c = load_file(str(make_tiny_model("internvl2_internlm2", tmp_path / "c", seed=4) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["language_model.output.weight"], c["language_model.output.weight"])
    assert all(t.dtype == torch.float32 for t in a.values())
    assert 0.01 < a["language_model.output.weight"].std() < 0.03
    assert abs(a["vision_model.encoder.layers.0.norm1.weight"].mean() - 1) < 0.01


@pytest.mark.parametrize("arch", ARCHS)
def test_lmdeploy_loads_checkpoint(arch, tiny_model):
    folder = tiny_model(arch)
    model = build_lmdeploy_model(folder)
    cls = type(model)
    assert f"{cls.__module__}.{cls.__name__}" == f"lmdeploy.pytorch.models.{LMDEPLOY_CLASSES[arch]}"
    ckpt = load_file(str(folder / "model.safetensors"))
    covered = _assert_matches_checkpoint(model, ckpt)
    assert covered == set(checkpoint_linear_names(folder))
    # LMDeploy builds under inference_mode: its parameters are inference tensors.
    assert all(p.is_inference() for p in model.parameters())


# What LMDeploy 0.18 builds for the VLMs (read in lmdeploy/pytorch/models/{qwen2_vl,qwen2_5_vl,llava}.py):
# the owner of ``packed_modules_mapping``, the LM head, the plain nn.Linear layers (no LoRA slots), and
# the vision linears that load_weights packs although no packed_modules_mapping above them names them.
VLM_LAYOUT = {
    "qwen2_vl": dict(
        mapping_owner="", lm_head="lm_head", plain={"visual.merger.mlp.0", "visual.merger.mlp.2"},
        unmapped_packed={"visual.blocks.0.attn.qkv": ["visual.blocks.0.attn.qkv"]}),
    "qwen2_5_vl": dict(
        mapping_owner="", lm_head="lm_head", plain={"visual.merger.mlp.0", "visual.merger.mlp.2"},
        unmapped_packed={"visual.blocks.0.attn.qkv": ["visual.blocks.0.attn.qkv"]}),
    "llava": dict(
        mapping_owner="language_model", lm_head="language_model.lm_head",
        plain={"multi_modal_projector.linear_1", "multi_modal_projector.linear_2"},
        unmapped_packed={"vision_tower.vision_model.encoder.layers.0.self_attn.qkv_proj": [
            f"vision_tower.vision_model.encoder.layers.0.self_attn.{x}_proj" for x in "qkv"]}),
}


def _mapping_owners(model: nn.Module) -> dict[str, dict]:
    return {n: m.packed_modules_mapping for n, m in model.named_modules()
            if isinstance(getattr(m, "packed_modules_mapping", None), dict) and m.packed_modules_mapping}


@pytest.mark.parametrize("arch", VLMS)
def test_vlm_lmdeploy_layout(arch, tiny_model):
    """Facts the loader's model map relies on, pinned so an LMDeploy upgrade that changes them shows here."""
    from lmdeploy.pytorch.nn.linear.base import LinearBase

    layout = VLM_LAYOUT[arch]
    folder = tiny_model(arch, num_layers=1)
    model = build_lmdeploy_model(folder)
    owners = _mapping_owners(model)
    assert list(owners) == [layout["mapping_owner"]]
    assert owners[layout["mapping_owner"]] == {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                               "gate_up_proj": ["gate_proj", "up_proj"]}
    modules = dict(model.named_modules())
    plain = {n for n, m in modules.items() if isinstance(m, nn.Linear) and not isinstance(m, LinearBase)}
    assert plain == layout["plain"]
    lora_capable = {n for n, m in modules.items() if isinstance(m, LinearBase)}
    assert all(hasattr(modules[n], "lora_adapters") for n in lora_capable)
    assert layout["lm_head"] in lora_capable
    ckpt = load_file(str(folder / "model.safetensors"))
    for name, parts in layout["unmapped_packed"].items():
        qkv = modules[name]
        assert type(qkv).__name__ == "QKVBaseLinear" and list(qkv.all_out_features) == [VIT_HIDDEN] * 3
        # the vision tower is not under the mapping's owner (llava), or its leaf is not a mapping key (qwen)
        owner = layout["mapping_owner"]
        assert not name.startswith(owner) or name.rsplit(".", 1)[-1] not in owners[owner]
        # rows are plain [Q; K; V]: the fused HF qkv as is, or HF's q_proj, k_proj, v_proj stacked
        want = torch.cat([ckpt[f"{p}.weight"] for p in parts])
        assert torch.equal(qkv.weight, want)
        assert torch.equal(torch.cat(qkv.weight_spliter(want)), want)
    if arch == "qwen2_5_vl":  # the vision MLP is gated and packed by the model-level mapping, like the LLM's
        assert list(modules["visual.blocks.0.mlp.gate_up_proj"].all_out_features) == [64, 64]


def test_release_inference_tensors(tiny_model):
    model = release_inference_tensors(build_lmdeploy_model(tiny_model("internlm2")))
    wqkv = model.model.layers[0].attention.wqkv
    assert not wqkv.weight.is_inference() and hasattr(wqkv.weight, "weight_loader")
    wqkv.weight.zero_()  # allowed outside inference_mode now


@pytest.mark.parametrize("arch", ARCHS)
def test_remote_code_configs(arch, tiny_model):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(tiny_model(arch)), trust_remote_code=True)
    if arch in ("internvl2_internlm2", "internvl_qwen2"):
        assert type(cfg).__name__ == "InternVLChatConfig"
        assert type(cfg.vision_config).__name__ == "InternVisionConfig"
        want = "InternLM2Config" if arch == "internvl2_internlm2" else "Qwen2Config"
        assert type(cfg.llm_config).__name__ == want
        assert (cfg.llm_config.bos_token_id, cfg.llm_config.eos_token_id) == (1, 2)
    elif arch == "internlm2":
        assert type(cfg).__name__ == "InternLM2Config" and cfg.pad_token_id == 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("naming", NAMINGS)
def test_hf_tree_names(arch, naming, tiny_model):
    folder = tiny_model(arch)
    tree = build_hf_module_tree(folder, naming)
    linears = {n: (m.out_features, m.in_features) for n, m in tree.named_modules() if isinstance(m, nn.Linear)}
    want = {hf_name(arch, n, naming): s for n, s in checkpoint_linear_names(folder).items()}
    assert linears == want
    embeddings = {n for n, m in tree.named_modules() if isinstance(m, nn.Embedding)}
    ckpt_embeddings = {k.rsplit(".", 1)[0] for k in load_file(str(folder / "model.safetensors"))
                       if k.endswith(".weight") and k.split(".")[-2] in EMBEDDING_LEAVES}
    assert embeddings == {hf_name(arch, n, naming) for n in ckpt_embeddings}
    assert len(embeddings) == (2 if arch == "llava" else 1)  # CLIP's position table is an Embedding too
    new_names = naming != "checkpoint"
    if arch == "internvl_hf":
        prefix = "model.language_model." if new_names else "language_model.model."
        assert f"{prefix}layers.0.self_attn.q_proj" in linears
        assert ("lm_head" in linears) == new_names
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        llm, vis = ("model.language_model.", "model.visual.") if new_names else ("model.", "visual.")
        assert {f"{llm}layers.0.self_attn.q_proj", f"{vis}blocks.0.attn.qkv", f"{vis}merger.mlp.2", "lm_head"} <= set(
            linears)
    if arch == "llava":
        tower = {"checkpoint": "vision_tower.vision_model.", "tf452": "model.vision_tower.vision_model.",
                 "tf5": "model.vision_tower."}[naming]
        llm, head, proj = (("model.language_model.", "lm_head", "model.multi_modal_projector.") if new_names else
                           ("language_model.model.", "language_model.lm_head", "multi_modal_projector."))
        assert {f"{tower}encoder.layers.0.self_attn.q_proj", f"{llm}layers.0.mlp.down_proj", head,
                f"{proj}linear_1"} <= set(linears)


@pytest.mark.parametrize("arch", VLMS)
def test_vlm_tree_is_what_transformers_loads(arch, tiny_model):
    """The checkpoint is in Hub names: transformers 5's own loader (with its key conversions) takes every
    key, and gives exactly the ``tf5`` tree, so the renaming table agrees with transformers'."""
    import transformers

    from tests.support.peft_fixtures import _VLM_CLASSES

    folder = tiny_model(arch)
    cls = getattr(transformers, _VLM_CLASSES[arch])
    model, info = cls.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    ours = build_hf_module_tree(folder, "tf5").state_dict()
    theirs = model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _targeted(adapter_dir, arch: str, naming: str, folder) -> set[str]:
    """Checkpoint module names that carry LoRA in the adapter."""
    back = {hf_name(arch, m, naming): m for m in checkpoint_linear_names(folder)}
    keys = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {back[k[len("base_model.model."):-len(".lora_A.weight")]] for k in keys if k.endswith(".lora_A.weight")}


SWIFT_V26 = r"^(language_model|mlp1)(?!.*(lm_head|output|emb|wte|shared)).*"
CASES = {
    "qwen2-list": ("qwen2", "checkpoint", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "internvl2-swift-v3.4": ("internvl2_internlm2", "checkpoint",
                             dict(target_modules=r"^(language_model.*\.(output|w2|w3|w1|wo|wqkv))$")),
    "internvl2-swift-v2.6": ("internvl2_internlm2", "checkpoint", dict(target_modules=SWIFT_V26, r=4)),
    "internvl-qwen2-swift-v3.4": ("internvl_qwen2", "checkpoint",
                                  dict(target_modules=rf"^(language_model.*\.({QWEN_LEAVES}))$", use_rslora=True)),
    "internvl-hf-tf452": ("internvl_hf", "tf452",
                          dict(target_modules=rf"^(model\.language_model(?=\.).*\.({QWEN_LEAVES}))$")),
    # VLMs: the vision towers' fused (qkv) and separate (q/k/v_proj) attention, gated MLPs, the plain
    # nn.Linear projectors and the LM head, under each naming an adapter may carry.
    "qwen2-vl-list": ("qwen2_vl", "checkpoint",
                      dict(target_modules=["q_proj", "o_proj", "gate_proj", "attn.qkv", "fc2", "mlp.0", "lm_head"])),
    "qwen2-vl-tf452": ("qwen2_vl", "tf452", dict(
        target_modules=rf"^model\.(language_model|visual)\..*\.({QWEN_LEAVES}|attn\.qkv|attn\.proj|fc1)$")),
    "qwen2.5-vl-swift-all": ("qwen2_5_vl", "tf5",
                             dict(target_modules=r"^(model\.visual|model\.language_model)(?!.*(lm_head|emb)).*")),
    "qwen2.5-vl-checkpoint": ("qwen2_5_vl", "checkpoint",
                              dict(target_modules=r"^visual\.blocks\.\d+\.(attn\.qkv|mlp\.up_proj|mlp\.down_proj)$")),
    "llava-swift-v2.6": ("llava", "checkpoint", dict(
        target_modules=r"^(language_model|multi_modal_projector)(?!.*(lm_head|output|emb|wte|shared)).*", r=4)),
    "llava-tf452": ("llava", "tf452", dict(
        target_modules=r"^(lm_head|model\.vision_tower\.vision_model\..*\.(q_proj|v_proj|fc1)"
                       r"|model\.language_model\..*\.(k_proj|up_proj))$")),
    "llava-tf5": ("llava", "tf5", dict(
        target_modules=r"^model\.(vision_tower\.encoder\..*\.(k_proj|out_proj|fc2)|multi_modal_projector\.linear_2)$")),
}


def _expected_targets(arch: str, naming: str, target, folder) -> set[str]:
    """Linear checkpoint modules PEFT's rules select (fullmatch for a str, suffix match for a list)."""
    names = checkpoint_linear_names(folder)
    if isinstance(target, str):
        return {m for m in names if re.fullmatch(target, hf_name(arch, m, naming))}
    return {m for m in names if any(m == t or m.endswith("." + t) for t in target)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_and_merge(case, tiny_model, tmp_path):
    arch, naming, spec = CASES[case]
    folder = tiny_model(arch)
    adapter = make_peft_adapter(folder, tmp_path / "adapter", seed=7, naming=naming, **spec)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["target_modules"] == spec["target_modules"] or sorted(saved["target_modules"]) == sorted(
        spec["target_modules"])
    targeted = _targeted(adapter, arch, naming, folder)
    assert targeted == _expected_targets(arch, naming, spec["target_modules"], folder) and targeted
    if case == "internvl2-swift-v2.6":  # the connector is a default target of swift 2.2.4-2.6
        assert {"mlp1.1", "mlp1.3"} <= targeted and "language_model.output" not in targeted
    if case == "llava-swift-v2.6":
        assert {"multi_modal_projector.linear_1", "multi_modal_projector.linear_2"} <= targeted
        assert "language_model.lm_head" not in targeted and not any(m.startswith("vision_tower") for m in targeted)
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    if arch in VLMS and naming != "checkpoint":  # the adapter really carries the newer names
        assert all(k.startswith(("base_model.model.model.", "base_model.model.lm_head.")) for k in lora)
    head = {"llava": "language_model.lm_head"}.get(arch, "lm_head")
    if arch in VLMS and head in targeted:  # PEFT also saves the base LM head when it is a target
        base_head = lora.pop(f"base_model.model.{hf_name(arch, head, naming)}.base_layer.weight")
        assert torch.equal(base_head, load_file(str(folder / "model.safetensors"))[f"{head}.weight"])
    assert all(".lora_" in k for k in lora)

    merged_dir = merge_adapter_checkpoint(folder, adapter, tmp_path / "merged")
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in merged_dir.iterdir())
    base_ckpt = load_file(str(folder / "model.safetensors"))
    merged_ckpt = load_file(str(merged_dir / "model.safetensors"))
    r, alpha = spec.get("r", 8), 16
    scale = alpha / math.sqrt(r) if spec.get("use_rslora") else alpha / r
    for key, base in base_ckpt.items():
        module = key.rsplit(".", 1)[0]
        if module in targeted and key.endswith(".weight"):
            pre = f"base_model.model.{hf_name(arch, module, naming)}"
            delta = scale * lora[f"{pre}.lora_B.weight"] @ lora[f"{pre}.lora_A.weight"]
            assert delta.abs().max() > 1e-3
            torch.testing.assert_close(merged_ckpt[key] - base, delta, rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(merged_ckpt[key], base), key

    # LMDeploy loads the merged folder natively; rows differ exactly where a targeted module sits.
    base_model, merged_model = build_lmdeploy_model(folder), build_lmdeploy_model(merged_dir)
    _assert_matches_checkpoint(merged_model, merged_ckpt)
    merged_linears = _lmdeploy_linears(merged_model)
    for name, mod in _lmdeploy_linears(base_model).items():
        parts = _constituents(name, base_ckpt)
        rows = [base_ckpt[f"{m}.weight"].shape[0] for m in parts]
        for m, a, b in zip(parts, mod.weight.split(rows), merged_linears[name].weight.split(rows), strict=True):
            assert (not torch.equal(a, b)) == (m in targeted), (name, m)


def test_vanilla_peft_rejects_old_swift_regex(tiny_model, tmp_path):
    """Why the emulation exists: PEFT itself refuses the v2.6 regex (it fullmatches containers and norms)."""
    with pytest.raises(ValueError, match="is not supported"):
        make_peft_adapter(tiny_model("internvl2_internlm2"), tmp_path / "a", target_modules=SWIFT_V26,
                          swift_style=False)


def test_bin_adapter_and_extra_config(tiny_model, tmp_path):
    folder = tiny_model("internlm2")
    adapter = make_peft_adapter(folder, tmp_path / "a", target_modules=["wo"], safe_serialization=False,
                                extra_config={"modules_to_save": None, "swift_version": "3.5.3"})
    assert (adapter / "adapter_model.bin").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["swift_version"] == "3.5.3"
    merged = load_file(str(merge_adapter_checkpoint(folder, adapter, tmp_path / "m") / "model.safetensors"))
    base = load_file(str(folder / "model.safetensors"))
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed == {f"model.layers.{i}.attention.wo.weight" for i in range(2)}
