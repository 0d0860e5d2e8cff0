"""``inspect``: the plan from configs and safetensors headers, run as a user runs it, on real PEFT adapters.

Expected values come from the adapter specs given to PEFT and from the safetensors files read here,
never from the plugin's own output. Also checked: LMDeploy's model built on the ``meta`` device has the
same module map as its real CPU build, for every tiny architecture (that is what ``--model`` relies on).
"""

from __future__ import annotations

import json
import math

import pytest
from safetensors import safe_open

from lmdeploy_regex_lora.cli.inspect import inspect_adapters
from lmdeploy_regex_lora.errors import AdapterError
from lmdeploy_regex_lora.serve.weights import read_adapter_tensors
from tests.support.cli_run import describe, json_out, run_cli
from tests.support.peft_fixtures import make_peft_adapter

pytestmark = pytest.mark.slow

QWEN_LEAVES = "v_proj|up_proj|o_proj|k_proj|down_proj|gate_proj|q_proj"
INTERNLM2_LEAVES = "w2|w3|w1|wo|wqkv"


def _lora_modules(adapter_dir) -> dict[str, int]:
    """Module -> rank, read from the adapter's safetensors file."""
    out = {}
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as fh:
        for key in fh.keys():
            if ".lora_A." in key:
                module = key[len("base_model.model."):].split(".lora_A.")[0]
                out[module] = fh.get_slice(key).get_shape()[0]
    return out


@pytest.fixture(scope="module")
def qwen_adapter(tiny_model, tmp_path_factory):
    base = tiny_model("qwen2")
    folder = make_peft_adapter(base, tmp_path_factory.mktemp("a") / "swift-regex", seed=3,
                               target_modules=rf"^(model.*\.({QWEN_LEAVES}))$", r=24, lora_alpha=48,
                               rank_pattern={"down_proj": 8}, alpha_pattern={"o_proj": 12})
    return base, folder


def test_without_model_lists_modules_ranks_and_scalings(qwen_adapter):
    _, folder = qwen_adapter
    proc = run_cli("inspect", folder, "--json")
    assert proc.returncode == 0, describe(proc)
    report = json_out(proc)
    (entry,) = report["adapters"]
    assert entry["status"] == "ok" and entry["name"] == "swift-regex" and report["model"] is None
    trained = _lora_modules(folder)
    got = {m["name"]: m for m in entry["modules"]}
    assert got.keys() == trained.keys() and len(trained) == 14
    for name, rank in trained.items():
        leaf = name.rsplit(".", 1)[-1]
        alpha = 12 if leaf == "o_proj" else 48
        assert got[name]["rank"] == rank == (8 if leaf == "down_proj" else 24)
        assert got[name]["alpha"] == alpha
        assert math.isclose(got[name]["scaling"], alpha / rank, rel_tol=1e-12)

    table = run_cli("inspect", folder)
    assert table.returncode == 0, describe(table)
    # Grouped by layer: one row per leaf, with count, rank, alpha, scaling.
    row = next(line.split() for line in table.stdout.splitlines() if "mlp.down_proj" in line)
    assert row == ["model.layers.{0..1}.mlp.down_proj", "2", "8", "48", "6"]
    row = next(line.split() for line in table.stdout.splitlines() if "self_attn.o_proj" in line)
    assert row == ["model.layers.{0..1}.self_attn.o_proj", "2", "24", "12", "0.5"]
    assert "OK: target_modules selects all 14 trained modules" in table.stdout


def test_reads_headers_only(qwen_adapter, tmp_path):
    """Every tensor value replaced by NaN: loading refuses the file, inspect (headers only) does not notice."""
    _, folder = qwen_adapter
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    (poisoned / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    data = bytearray((folder / "adapter_model.safetensors").read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:] = b"\xff" * (len(data) - start)  # 0xffffffff is a float32 NaN
    (poisoned / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="NaN"):
        read_adapter_tensors("poisoned", poisoned)
    clean = inspect_adapters({"poisoned": str(folder)}, None)["adapters"][0]["modules"]
    proc = run_cli("inspect", poisoned, "--json")
    assert proc.returncode == 0, describe(proc)
    assert json_out(proc)["adapters"][0]["modules"] == clean


def test_with_model_shows_how_each_module_is_served(tiny_model, tmp_path):
    base = tiny_model("internvl2_internlm2")
    lm = make_peft_adapter(base, tmp_path / "lm", seed=5, r=8, lora_alpha=32,
                           target_modules=rf"^(language_model.*\.(output|{INTERNLM2_LEAVES}))$")
    vision = make_peft_adapter(base, tmp_path / "vision", seed=6, r=8, lora_alpha=16,
                               target_modules=r"^(vision_model.*\.(fc1|fc2)|mlp1\.\d+|language_model.*\.wo)$")
    proc = run_cli("inspect", f"lm={lm}", f"vis={vision}", "--model", base, "--json")
    assert proc.returncode == 0, describe(proc)
    report = json_out(proc)
    by_name = {a["name"]: a for a in report["adapters"]}
    assert [by_name["lm"]["adapter_id"], by_name["vis"]["adapter_id"]] == [1, 2]  # sorted names, like LMDeploy
    for name, folder in (("lm", lm), ("vis", vision)):
        entry = by_name[name]
        assert entry["status"] == "ok"
        modules = {m["name"]: m for m in entry["modules"]}
        assert modules.keys() == _lora_modules(folder).keys()
        for module, m in modules.items():
            if module == "language_model.output":
                assert m["serving"] == "lm-head"
            elif module.startswith(("vision_model.", "mlp1.")):
                assert m["serving"] == "per-request-image"
            else:
                assert m["serving"] == "per-request"
                assert m["lmdeploy_module"].startswith("language_model.model.layers.")
        w1 = "language_model.model.layers.0.feed_forward.w1"
        if w1 in modules:  # LMDeploy packs w1/w3 into gate_up_proj
            assert modules[w1]["lmdeploy_module"].endswith("feed_forward.gate_up_proj")
    image_rows = {(m["lmdeploy_module"], m["slot"]) for m in by_name["vis"]["modules"]
                  if m["serving"] == "per-request-image"}
    assert len(image_rows) == 6 and report["folds"] is None  # fc1, fc2 x 2 layers, mlp1.1/.3: nothing folded
    # One LoRA slot per served layer, the vision tower's and projector's included.
    sites = {(m["lmdeploy_module"], m["slot"]) for a in report["adapters"] for m in a["modules"]}
    assert {(s["lmdeploy_module"], s["slot"]) for s in report["slots"]} == sites
    assert {(s["lmdeploy_module"], s["slot"]) for s in report["slots"] if s["serving"] == "per-request-image"} \
        == image_rows

    table = run_cli("inspect", f"lm={lm}", f"vis={vision}", "--model", base)
    assert table.returncode == 0, describe(table)
    assert "LM head, per request" in table.stdout and "per request, image rows" in table.stdout
    assert "folded" not in table.stdout

    folding = run_cli("inspect", f"vis={vision}", "--model", base, env={"LMDEPLOY_REGEX_LORA_FOLD_VISION": "1"})
    assert folding.returncode == 0, describe(folding)
    assert "folded into base weight (all requests)" in folding.stdout
    assert "language_model.model.layers.{0..1}.feed_forward.gate_up_proj[w1]" in table.stdout


def test_refusals_exit_1_with_the_reason(qwen_adapter, tiny_model, tmp_path):
    base, folder = qwen_adapter
    # The config no longer targets v_proj, but the weights still hold it: what was trained is unknown.
    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["target_modules"] = cfg["target_modules"].replace("v_proj|", "")
    (edited / "adapter_config.json").write_text(json.dumps(cfg))
    proc = run_cli("inspect", edited)
    assert proc.returncode == 1, describe(proc)
    assert "REFUSED" in proc.stdout and "does not target" in proc.stdout and "v_proj" in proc.stdout

    # A Qwen2 adapter on InternLM2: no module of the adapter exists there.
    other = run_cli("inspect", folder, "--model", tiny_model("internlm2"), "--json")
    assert other.returncode == 1, describe(other)
    entry = json_out(other)["adapters"][0]
    assert entry["status"] == "refused" and "this model does not have" in entry["error"]


def test_bad_input_exits_2_without_traceback(qwen_adapter, tiny_model, tmp_path):
    base, folder = qwen_adapter
    missing = run_cli("inspect", tmp_path / "nope")
    assert missing.returncode == 2, describe(missing)
    assert "[lmdeploy-regex-lora]" in missing.stderr and "Traceback" not in missing.stderr
    assert "does not exist" in missing.stderr

    pickled = make_peft_adapter(base, tmp_path / "pickled", target_modules=["q_proj"], safe_serialization=False)
    assert (pickled / "adapter_model.bin").is_file()
    proc = run_cli("inspect", pickled)
    assert proc.returncode == 2, describe(proc)
    assert "adapter_model.safetensors" in proc.stderr and "Traceback" not in proc.stderr

    no_model = run_cli("inspect", folder, "--model", tmp_path)
    assert no_model.returncode == 2, describe(no_model)
    assert "no config.json" in no_model.stderr and "Traceback" not in no_model.stderr


def test_meta_build_has_the_served_module_map(tiny_model):
    """``--model`` and ``merge`` plan on LMDeploy's model built on ``meta``: it must map like the real build."""
    from lmdeploy_regex_lora.serve.model_map import ModelMap
    from lmdeploy_regex_lora.testing.build import build_lmdeploy_model
    from lmdeploy_regex_lora.testing.tiny_models import ARCHS

    for arch in ARCHS:
        folder = tiny_model(arch)
        meta = build_lmdeploy_model(folder, "meta")
        assert all(p.is_meta for p in meta.parameters()), arch
        real = ModelMap(build_lmdeploy_model(folder))
        assert ModelMap(meta).sites == real.sites, arch
        assert real.sites, arch
