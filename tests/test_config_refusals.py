"""Every adapter_config.json field that changes the computation beyond additive LoRA is refused, through
LMDeploy's (hooked) ``add_adapters``, with a message naming the adapter, the file, the field and the fix,
and the model is bit-identical afterwards. Fields that do not change the computation are accepted, and
the adapter is served exactly as PEFT merges it.

Adapters are written by real PEFT 0.14 where it supports the field (DoRA, modules_to_save, bias,
lora_bias, embedding LoRA, PiSSA and its conversion); fields of later releases are written into the
saved adapter_config.json, as those releases would write them.
"""

from __future__ import annotations

import ast
import json
import logging
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lmdeploy_regex_lora.errors import AdapterError
from lmdeploy_regex_lora.serve.config import (
    HARMLESS_FIELDS,
    PARSED_FIELDS,
    REFUSED_FIELDS,
    parse_adapter_config,
    read_adapter_config,
)
from lmdeploy_regex_lora.testing.build import build_lmdeploy_model
from tests.support.peft_fixtures import build_hf_module_tree, make_peft_adapter, merge_adapter_checkpoint
from tests.support.peft_releases import RELEASES, wheel


def patch_config(folder: Path, **fields) -> Path:
    """Write ``fields`` into a saved adapter_config.json (as another PEFT release or a person would)."""
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields, indent=2, sort_keys=True))
    return folder


def snapshot(model: torch.nn.Module) -> tuple[dict, dict]:
    """Every parameter and buffer (cloned) and every linear's LoRA slots."""
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    slots = {n: sorted(m.lora_adapters.keys()) for n, m in model.named_modules() if hasattr(m, "lora_adapters")}
    return state, slots


def assert_unchanged(model: torch.nn.Module, before: tuple[dict, dict]) -> None:
    state, slots = snapshot(model)
    assert state.keys() == before[0].keys()
    for k, v in state.items():
        assert v.dtype == before[0][k].dtype and torch.equal(v, before[0][k]), k
    assert slots == before[1]


@pytest.fixture(scope="module")
def qwen2(tiny_model):
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def good_adapter(qwen2, tmp_path_factory):
    """A plain adapter loaded next to each bad one: it is resolved first (names sort), so its slots would be
    built before the refusal if the loader were not atomic."""
    return make_peft_adapter(qwen2, tmp_path_factory.mktemp("good"), target_modules=["q_proj", "down_proj"], r=8)


def _plain(base, out, **kw):
    return make_peft_adapter(base, out, target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16, **kw)


# (case id, builder(base, out) -> folder, field the error names (None: the tensors are refused), text)
REFUSALS = [
    ("use_dora", lambda b, o: _plain(b, o, extra_config={"use_dora": True}), "use_dora", "DoRA"),
    ("modules_to_save", lambda b, o: _plain(b, o, extra_config={"modules_to_save": ["lm_head"]}),
     "modules_to_save", "full replacement weights"),
    ("trainable_token_indices", lambda b, o: patch_config(_plain(b, o), trainable_token_indices=[3, 5]),
     "trainable_token_indices", "embedding matrix"),
    ("target_parameters", lambda b, o: patch_config(_plain(b, o), target_parameters=["mlp.experts.gate_up_proj"]),
     "target_parameters", "raw parameters"),
    ("layer_replication", lambda b, o: patch_config(_plain(b, o), layer_replication=[[0, 2], [1, 2]]),
     "layer_replication", "duplicates decoder layers"),
    ("use_qalora", lambda b, o: patch_config(_plain(b, o), use_qalora=True), "use_qalora", "QALoRA"),
    ("alora_invocation_tokens", lambda b, o: patch_config(_plain(b, o), alora_invocation_tokens=[5, 7]),
     "alora_invocation_tokens", "Activated LoRA"),
    ("arrow_config", lambda b, o: patch_config(_plain(b, o), arrow_config={"top_k": 2}), "arrow_config", "Arrow"),
    ("use_bdlora", lambda b, o: patch_config(_plain(b, o), use_bdlora={"nblocks": 2}), "use_bdlora", "BD-LoRA"),
    ("monteclora_config", lambda b, o: patch_config(_plain(b, o), monteclora_config={}), "monteclora_config",
     "MonteCLoRA"),
    ("kasa_config", lambda b, o: patch_config(_plain(b, o), kasa_config={}), "kasa_config", "KaSA"),
    ("lora_bias", lambda b, o: _plain(b, o, extra_config={"lora_bias": True}), "lora_bias", "lora_B bias"),
    ("bias-all-with-bias-tensors", lambda b, o: _plain(b, o, extra_config={"bias": "all"}), "bias",
     "base-layer bias tensor"),
    ("bias-invalid", lambda b, o: patch_config(_plain(b, o), bias="some"), "bias", "'none', 'all' or 'lora_only'"),
    ("peft_type", lambda b, o: patch_config(_plain(b, o), peft_type="ADALORA"), "peft_type", "only plain LoRA"),
    *[(f"init_lora_weights-{init}", lambda b, o, init=init: patch_config(_plain(b, o), init_lora_weights=init),
       "init_lora_weights", "converted/default")
      for init in ("pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga")],
    ("embedding-lora", lambda b, o: make_peft_adapter(b, o, target_modules=["embed_tokens", "q_proj"], r=8), None,
     "embed_tokens"),
    ("regex-with-layers_to_transform", lambda b, o: patch_config(_plain(b, o), target_modules=r".*\.q_proj",
                                                                 layers_to_transform=[0]),
     "layers_to_transform", "regex string"),
]


@pytest.mark.parametrize("case", range(len(REFUSALS)), ids=[c[0] for c in REFUSALS])
def test_refused_and_model_unchanged(case, qwen2, good_adapter, tmp_path, plugin_installed):
    from lmdeploy.pytorch.models import patch

    _, build, field, text = REFUSALS[case]
    bad = build(qwen2, tmp_path / "bad")
    model = build_lmdeploy_model(qwen2)
    before = snapshot(model)
    with pytest.raises(AdapterError) as info:
        patch.add_adapters(model, {"a-good": str(good_adapter), "b-bad": str(bad)}, dtype=torch.float32,
                           device=torch.device("cpu"))
    err, msg = info.value, str(info.value)
    assert err.adapter == "b-bad" and "'b-bad'" in msg
    assert err.file and err.file.startswith(str(bad)) and err.file in msg
    assert err.field == field and (field is None or f"field {field!r}" in msg)
    assert text in msg and err.fix and "Fix: " in msg
    assert_unchanged(model, before)


def test_refusal_is_clean_after_a_good_load(qwen2, good_adapter, tmp_path, plugin_installed):
    """A model already serving an adapter keeps it, bit for bit, when a later load is refused."""
    from lmdeploy.pytorch.models import patch

    model = build_lmdeploy_model(qwen2)
    patch.add_adapters(model, {"a-good": str(good_adapter)}, dtype=torch.float32, device=torch.device("cpu"))
    before = snapshot(model)
    assert any(before[1].values())
    bad = _plain(qwen2, tmp_path / "bad", extra_config={"use_dora": True})
    with pytest.raises(AdapterError, match="use_dora"):
        patch.add_adapters(model, {"b-bad": str(bad)}, dtype=torch.float32, device=torch.device("cpu"))
    assert_unchanged(model, before)


# -- fields that do not change the computation ------------------------------------------------------------

def _served_equals_merged(base: Path, adapters: dict[int, tuple[Path, Path]]) -> dict:
    """adapters: id -> (adapter folder, merged folder). Loads through the hooked add_adapters; compares."""
    from lmdeploy.pytorch.models import patch

    from lmdeploy_regex_lora.testing.compare import compare, load_models

    base_model, merged = load_models(base, {aid: m for aid, (_, m) in adapters.items()})
    served = build_lmdeploy_model(base)
    names = {f"a{aid}": str(a) for aid, (a, _) in adapters.items()}
    patch.add_adapters(served, names, dtype=torch.float32, device=torch.device("cpu"))
    stats = compare(served, base_model, merged)
    assert stats["targeted"] >= 2, stats
    return stats


ACCEPTED = [
    # PEFT saves no bias tensors when the layers have none (llama) ...
    ("llama", "bias-all-no-bias-tensors", lambda b, o: _plain(b, o, extra_config={"bias": "all"})),
    # ... and never for bias='lora_only' (it looks for '<module>.bias', the layer's is '<module>.base_layer.bias'),
    # so PEFT loads them onto the original biases too.
    ("qwen2", "bias-lora_only", lambda b, o: _plain(b, o, extra_config={"bias": "lora_only"})),
    # PEFT warns and resets fan_in_fan_out to False for nn.Linear; LoRA's forward never reads it.
    ("qwen2", "fan_in_fan_out", lambda b, o: patch_config(_plain(b, o), fan_in_fan_out=True)),
    # An initialisation whose result is in the tensors; VeLoRA's config (it changes only the backward pass).
    ("qwen2", "init-gaussian-velora", lambda b, o: patch_config(_plain(b, o), init_lora_weights="gaussian",
                                                                velora_config={"num_groups": 4})),
    # PEFT <= 0.13 saved a layers_pattern without layers_to_transform and ignored it (0.14 refuses to load
    # it, so the reference merge is made without it).
    ("qwen2", "layers_pattern-alone", lambda b, o: patch_config(_plain(b, o), layers_pattern="layers")),
    # Unknown keys (a future release, swift's own) are ignored.
    ("internlm2", "unknown-keys", lambda b, o: patch_config(
        make_peft_adapter(b, o, target_modules=["wqkv", "w2"], r=8), swift_version="3.5.3",
        some_future_field={"x": 1}, peft_version="0.23.0.dev0@abc")),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(ACCEPTED)), ids=[c[1] for c in ACCEPTED])
def test_harmless_fields_are_served_exactly(case, tiny_model, tmp_path, plugin_installed, caplog):
    arch, _, build = ACCEPTED[case]
    base = tiny_model(arch)
    adapter = build(base, tmp_path / "a")
    reference = adapter
    if ACCEPTED[case][1] == "layers_pattern-alone":
        reference = Path(shutil.copytree(adapter, tmp_path / "a-as-peft-0.13-reads-it"))
        patch_config(reference, layers_pattern=None)
    merged = merge_adapter_checkpoint(base, reference, tmp_path / "merged")
    with caplog.at_level(logging.DEBUG, logger="lmdeploy.regex_lora"):
        _served_equals_merged(base, {1: (adapter, merged)})
    if ACCEPTED[case][1] == "unknown-keys":
        assert "some_future_field" in caplog.text and "swift_version" in caplog.text


@pytest.mark.slow
def test_pissa_raw_refused_converted_served_as_trained(tiny_model, tmp_path, plugin_installed):
    """Real PiSSA with PEFT 0.14: training rewrote the base (residual); the raw checkpoint is refused, and the
    converted one (r x2, init_lora_weights=true) on the ORIGINAL base serves exactly the trained model."""
    from lmdeploy.pytorch.models import patch
    from peft import LoraConfig, get_peft_model

    from lmdeploy_regex_lora.testing.compare import compare, load_models

    base = tiny_model("qwen2")
    tree = build_hf_module_tree(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights="pissa",
                        rank_pattern={"down_proj": 6}, lora_dropout=0.0)
    model = get_peft_model(tree, config)
    model.save_pretrained(str(tmp_path / "initial"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # "training"
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(str(tmp_path / "raw"))
    model.save_pretrained(str(tmp_path / "converted"),
                          path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    converted = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert (converted["r"], converted["init_lora_weights"], converted["rank_pattern"]) == (8, True, {"down_proj": 12})
    # The trained model, merged on its residual base, written as a checkpoint LMDeploy loads.
    trained = tmp_path / "trained"
    trained.mkdir()
    state = model.merge_and_unload().state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(trained / "model.safetensors"))
    for item in Path(base).iterdir():
        if item.is_file() and not item.name.endswith(".safetensors"):
            shutil.copy2(item, trained / item.name)

    served = build_lmdeploy_model(base)
    before = snapshot(served)
    with pytest.raises(AdapterError) as info:
        patch.add_adapters(served, {"pissa": str(tmp_path / "raw")}, dtype=torch.float32, device=torch.device("cpu"))
    assert info.value.field == "init_lora_weights" and "converted/default" in str(info.value)
    assert_unchanged(served, before)
    patch.add_adapters(served, {"pissa": str(tmp_path / "converted")}, dtype=torch.float32,
                       device=torch.device("cpu"))
    base_model, merged = load_models(base, {1: trained})
    stats = compare(served, base_model, merged)
    assert stats["targeted"] == 4, stats


# -- configs as each PEFT release writes them --------------------------------------------------------------

def _release_fields(version: str) -> dict | None:
    """Every field a release's LoraConfig.to_dict writes, with its default, read from the release's source."""
    whl = wheel(version)
    if isinstance(whl, str):
        return None
    with zipfile.ZipFile(whl) as zf:
        sources = [zf.read("peft/config.py").decode(), zf.read("peft/tuners/lora/config.py").decode()]
    fields = {}
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if not (isinstance(node, ast.ClassDef) and node.name in ("PeftConfigMixin", "PeftConfig", "LoraConfig")):
                continue
            for stmt in node.body:
                if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                    continue
                value = None
                if isinstance(stmt.value, ast.Call):
                    for kw in stmt.value.keywords:
                        if kw.arg == "default":
                            try:
                                value = ast.literal_eval(kw.value)
                            except ValueError:
                                value = None
                        elif kw.arg == "default_factory":
                            value = {"dict": {}, "list": []}.get(ast.unparse(kw.value), {})
                fields[stmt.target.id] = value
    fields.pop("runtime_config", None)  # LoraConfig.to_dict drops it
    return fields


@pytest.fixture(scope="module")
def release_fields():
    out = {}
    for version in RELEASES:
        fields = _release_fields(version)
        if fields is None:
            pytest.skip(f"PEFT {version}'s wheel is not available here")
        out[version] = fields
    return out


def test_every_release_field_is_classified(release_fields):
    """Each field any PEFT release from 0.10 to 0.21 writes is read, known harmless, or refused: none is
    ignored by accident."""
    for version, fields in release_fields.items():
        unclassified = set(fields) - PARSED_FIELDS - HARMLESS_FIELDS - set(REFUSED_FIELDS)
        assert not unclassified, (version, unclassified)


@pytest.mark.parametrize("version", RELEASES)
def test_default_config_of_each_release_is_served(version, release_fields, tiny_model, tmp_path, plugin_installed):
    """A config carrying every field of the release at its default (as that release's save_pretrained writes
    it) is accepted and served as PEFT 0.14 merges the same adapter; each refused field, set, is refused."""
    fields = release_fields[version]
    base = tiny_model("qwen2")
    adapter = make_peft_adapter(base, tmp_path / "a", target_modules=["q_proj", "up_proj"], r=16, lora_alpha=32,
                                use_rslora=True)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    written = fields | {k: saved[k] for k in ("r", "lora_alpha", "target_modules", "use_rslora")}
    written |= {"peft_type": "LORA", "task_type": "CAUSAL_LM", "init_lora_weights": True}
    if "peft_version" in fields:
        written["peft_version"] = version
    (adapter / "adapter_config.json").write_text(json.dumps(written, indent=2, sort_keys=True))
    cfg = read_adapter_config("a", adapter)
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora, cfg.target_modules) == (16, 32.0, True, ("q_proj", "up_proj"))
    merged = merge_adapter_checkpoint(base, adapter, tmp_path / "merged")
    _served_equals_merged(base, {1: (adapter, merged)})
    for field in set(REFUSED_FIELDS) & set(fields):
        value = {"use_dora": True, "use_qalora": True}.get(field, [1] if field != "arrow_config" else {})
        with pytest.raises(AdapterError) as info:
            parse_adapter_config("a", adapter, written | {field: value})
        assert info.value.field == field


# -- parse-level refusals of malformed values ------------------------------------------------------------

@pytest.mark.parametrize("raw, field", [
    ({"r": 0}, "r"), ({"r": "8"}, "r"), ({"r": 8.5}, "r"), ({"r": True}, "r"), ({"r": None}, "r"),
    ({"lora_alpha": "16"}, "lora_alpha"), ({"lora_alpha": None}, "lora_alpha"),
    ({"target_modules": None}, "target_modules"), ({"target_modules": []}, "target_modules"),
    ({"target_modules": [1]}, "target_modules"), ({"exclude_modules": 3}, "exclude_modules"),
    ({"layers_to_transform": "0"}, "layers_to_transform"), ({"layers_to_transform": [True]}, "layers_to_transform"),
    ({"layers_to_transform": [0], "layers_pattern": 5}, "layers_pattern"),
    ({"target_modules": ".*q_proj", "layers_pattern": "layers"}, "layers_pattern"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"), ({"rank_pattern": {"q_proj": 4.5}}, "rank_pattern"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern"), ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern"),
    ({"alpha_pattern": {"q_proj": float("nan")}}, "alpha_pattern"),
    ({"use_rslora": "yes"}, "use_rslora"), ({"fan_in_fan_out": 1}, "fan_in_fan_out"),
])
def test_malformed_values_are_refused(raw, field):
    with pytest.raises(AdapterError) as info:
        parse_adapter_config("x", "/adapters/x", {"target_modules": ["q_proj"]} | raw)
    assert info.value.field == field and info.value.adapter == "x"
    assert info.value.file == "/adapters/x/adapter_config.json" and info.value.fix


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_initialisations_that_leave_the_base_alone_are_accepted(init):
    cfg = parse_adapter_config("x", "/adapters/x", {"target_modules": ["q_proj"], "init_lora_weights": init})
    assert cfg.target_modules == ("q_proj",)


@pytest.mark.parametrize("raw, expect", [
    ({}, (8, 8.0)),  # PEFT's defaults
    ({"r": 4}, (4, 8.0)),
    ({"lora_alpha": 0.5}, (8, 0.5)),
    ({"lora_alpha": -16}, (8, -16.0)),  # PEFT accepts any alpha
])
def test_r_and_alpha_defaults(raw, expect):
    cfg = parse_adapter_config("x", "/adapters/x", {"target_modules": ["q_proj"]} | raw)
    assert (cfg.r, cfg.lora_alpha) == expect
    assert cfg.scaling(cfg.r, cfg.lora_alpha) == expect[1] / expect[0]
