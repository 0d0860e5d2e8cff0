"""Never a silent base model: ``--adapters`` never ends up on TurboMind, which ignores adapters.

LMDeploy's ``lmdeploy serve api_server`` and ``lmdeploy chat`` treat every ``--backend`` except
``pytorch`` (their default is ``turbomind``) as "choose for me" and call ``autoget_backend``, which
picks TurboMind for most models; adapters then vanish without a word (LMDeploy issues #4105, #2297).
Decision: with adapters given, the plugin uses the PyTorch engine (the only one that serves LoRA)
and logs one warning saying so; without adapters, or with ``--backend pytorch``, LMDeploy's choice
is untouched. ``pipeline()`` needs no guard: adapters only exist on ``PytorchEngineConfig``, which
LMDeploy's own ``autoget_backend_config`` always maps to PyTorch.

The commands run in a venv holding our installed wheel (activated by its ``.pth`` alone), through
LMDeploy's own argparse parsers and command functions; ``tests/scripts/backend_choice.py`` says which two
GPU-only parts stand in (TurboMind's CUDA extension, the engine start).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from lmdeploy_regex_lora.serve.cli_guard import BACKEND_SWITCH
from tests.support.peft_fixtures import make_peft_adapter
from tests.support.venv_overlay import build_wheel, make_overlay_venv

pytestmark = pytest.mark.slow
SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture(scope="module")
def results(tiny_model, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("backend-choice")
    python = make_overlay_venv(tmp, build_wheel(tmp / "wheel"))
    base = tiny_model("qwen2")
    adapter = make_peft_adapter(base, tmp / "adapter", seed=3, target_modules=r"^(model.*\.(q_proj|v_proj))$", r=8)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LMDEPLOY_REGEX_LORA_DISABLE")}
    proc = subprocess.run([str(python), str(SCRIPTS / "backend_choice.py"), str(base), str(adapter)],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    out: dict = {"runs": {}}
    for line in proc.stdout.splitlines():
        tag, _, payload = line.partition(" ")
        if tag == "RESULT":
            record = json.loads(payload)
            out["runs"][record["label"]] = record
        elif tag in ("STATE", "PIPELINE", "RESTORED"):
            out[tag.lower()] = json.loads(payload)
    out["adapter"] = str(adapter)
    return out


def ours(record: dict) -> list[str]:
    return [line for line in record["logs"] if "lmdeploy.regex_lora" in line]


def test_active_from_the_wheel_alone(results):
    assert results["state"] == {"preloaded": ["lmdeploy_regex_lora_boot"],
                                "serve_wrapped": True, "chat_wrapped": True, "installed": True}


@pytest.mark.parametrize("command", ["serve", "chat"])
@pytest.mark.parametrize("how", ["auto", "explicit-turbomind"])
def test_adapters_switch_turbomind_to_pytorch_with_one_warning(results, command, how):
    """LMDeploy's real autoget_backend says TurboMind (is_supported(model) is True); we switch."""
    record = results["runs"][f"{command}/adapters/{how}/tm"]
    assert record["backend"] == "pytorch"
    if command == "serve":
        assert record["config"] == {"type": "PytorchEngineConfig", "has_adapters_field": True,
                                    "adapters": {"mine": results["adapter"]}}
    else:
        assert record["adapters_kwarg"] == [f"mine={results['adapter']}"]
    (line,) = ours(record)
    assert line.startswith("WARNING") and BACKEND_SWITCH in line and results["adapter"] in line
    assert record["logs"] == [line], "LMDeploy must not choose (and log) a second time"


@pytest.mark.parametrize("command", ["serve", "chat"])
def test_without_adapters_lmdeploy_keeps_turbomind(results, command):
    record = results["runs"][f"{command}/none/auto/tm"]
    assert record["backend"] == "turbomind" and record["logs"] == []
    if command == "serve":
        assert record["config"]["type"] == "TurbomindEngineConfig"


@pytest.mark.parametrize("command", ["serve", "chat"])
def test_explicit_pytorch_and_no_turbomind_are_untouched(results, command):
    explicit = results["runs"][f"{command}/adapters/pytorch/tm"]
    assert explicit["backend"] == "pytorch" and explicit["logs"] == []
    # CPU machine as it is (TurboMind not built): LMDeploy's own fallback, logged once, nothing from us
    fallback = results["runs"][f"{command}/adapters/auto/no-tm"]
    assert fallback["backend"] == "pytorch"
    assert fallback["logs"] == ["WARNING lmdeploy: Fallback to pytorch engine because turbomind is not built."]


def test_pipeline_cannot_put_adapters_on_turbomind(results):
    pipe = results["pipeline"]
    assert pipe["pytorch_config"] == "pytorch"  # LMDeploy's autoget_backend_config, TurboMind available
    assert pipe["no_config"] == "turbomind"  # no config: no adapters either
    assert pipe["turbomind_config_fields"]["has_adapters_field"] is False


@pytest.mark.parametrize("command", ["serve", "chat"])
def test_uninstall_restores_lmdeploys_choice(results, command):
    """After uninstall the commands are LMDeploy's objects again, and LMDeploy's silent TurboMind choice
    (the behaviour this guard exists for) is back, even through a parser built while we were installed."""
    assert results["restored"] == {"serve": True, "chat": True, "serve_unwrapped": True, "chat_unwrapped": True}
    record = results["runs"][f"{command}/adapters/auto/tm/after-uninstall"]
    assert record["backend"] == "turbomind" and ours(record) == []
    if command == "serve":
        assert record["config"] == {"type": "TurbomindEngineConfig", "has_adapters_field": False, "adapters": None}
