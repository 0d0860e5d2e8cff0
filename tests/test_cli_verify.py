"""``verify``: the plugin's served weights against merged checkpoints, as a user runs it.

``--against`` with PEFT's own merge (tests/support/peft_fixtures.py) gives an independent reference: it must
pass, and the same merge with one weight nudged must fail naming that module.
"""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from tests.support.cli_run import describe, json_out, run_cli
from tests.support.peft_fixtures import make_peft_adapter, merge_adapter_checkpoint

pytestmark = pytest.mark.slow

QWEN_LEAVES = "v_proj|up_proj|o_proj|k_proj|down_proj|gate_proj|q_proj"
INTERNLM2_LEAVES = "w2|w3|w1|wo|wqkv"


@pytest.fixture(scope="module")
def qwen(tiny_model, tmp_path_factory):
    base = tiny_model("qwen2")
    tmp = tmp_path_factory.mktemp("verify")
    regex = make_peft_adapter(base, tmp / "regex", target_modules=rf"^(model.*\.({QWEN_LEAVES}))$", r=24,
                              lora_alpha=48, seed=21)
    heads = make_peft_adapter(base, tmp / "heads", target_modules=["q_proj", "v_proj", "lm_head"], r=8,
                              lora_alpha=16, use_rslora=True, seed=22)
    return base, regex, heads


def test_two_adapters_through_merge(qwen):
    base, regex, heads = qwen
    proc = run_cli("verify", base, regex, heads, "--json")
    assert proc.returncode == 0, describe(proc)
    report = json_out(proc)
    assert report["ok"] and report["plugin_active"] and report["error"] is None
    # Ids follow LMDeploy: sorted names from 1.
    assert [(a["name"], a["adapter_id"]) for a in report["adapters"]] == [("heads", 1), ("regex", 2)]
    rows = {(a["name"], r["module"]): r for a in report["adapters"] for r in a["rows"]}
    assert rows["heads", "lm_head"]["kind"] == "lora" and rows["regex", "lm_head"]["kind"] == "untouched"
    assert rows["heads", "model.layers.0.mlp.down_proj"]["kind"] == "untouched"
    for r in rows.values():
        assert r["ok"]
        if r["kind"] == "untouched":
            assert r["max_err"] == 0.0
        else:
            assert 0.0 < r["max_err"] <= r["allowed"] < 1e-5
    assert report["slots"] == 15  # 14 LLM layers (q/k/v/o/gate/up/down x 2) + the LM head


def test_peft_merge_passes_and_a_nudged_one_fails(qwen, tmp_path):
    base, regex, heads = qwen
    good = merge_adapter_checkpoint(base, heads, tmp_path / "heads-peft")
    bad = merge_adapter_checkpoint(base, regex, tmp_path / "regex-peft")
    weights = load_file(str(bad / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] += 1e-3
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    proc = run_cli("verify", base, regex, heads, "--against", f"heads={good}", "--against", f"regex={bad}", "--json")
    assert proc.returncode == 1, describe(proc)
    report = json_out(proc)
    entries = {a["name"]: a for a in report["adapters"]}
    assert entries["heads"]["ok"] and entries["heads"]["merged"] == str(good)
    assert not entries["regex"]["ok"]
    failing = [r for r in entries["regex"]["rows"] if not r["ok"]]
    assert [r["module"] for r in failing] == ["model.layers.1.mlp.down_proj"]
    assert failing[0]["max_err"] == pytest.approx(1e-3, rel=1e-2)

    table = run_cli("verify", base, regex, "--against", f"regex={bad}")
    assert table.returncode == 1, describe(table)
    assert "MISMATCH" in table.stdout and "model.layers.1.mlp.down_proj" in table.stdout


def test_vision_per_request_and_lm_head(tiny_model, tmp_path):
    base = tiny_model("internvl2_internlm2")
    lm = make_peft_adapter(base, tmp_path / "lm", seed=31, r=24, lora_alpha=16,
                           target_modules=rf"^(language_model.*\.(output|{INTERNLM2_LEAVES}))$")
    vision = make_peft_adapter(base, tmp_path / "vision", seed=32, r=8, lora_alpha=16,
                               target_modules=r"^(vision_model.*\.(fc1|fc2)|mlp1\.\d+|language_model.*\.wo)$")
    proc = run_cli("verify", base, lm, vision)
    assert proc.returncode == 0, describe(proc)
    out = proc.stdout
    assert "OK: the plugin serves exactly the merged weights for every adapter" in out
    # The vision adapter's layers are checked per adapter id like any other slot: 'lora' for it, untouched for lm.
    assert "folded" not in out
    kinds = {line.split()[2] for line in out.splitlines() if line.strip().startswith(("mlp1", "vision_model"))}
    assert kinds == {"lora", "untouched"}, out
    assert "language_model.output" in out
    assert all(not line.rstrip().endswith("MISMATCH") for line in out.splitlines())


def test_bad_input_exits_2(qwen, tmp_path):
    base, regex, _ = qwen
    proc = run_cli("verify", base, tmp_path / "missing")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr, describe(proc)
    proc = run_cli("verify", base, regex, "--against", f"other={tmp_path}")
    assert proc.returncode == 2 and "'other'" in proc.stderr, describe(proc)
