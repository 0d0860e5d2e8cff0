"""The plugin is active in every process LMDeploy builds the model in, from an installed wheel alone.

Where ``add_adapters`` runs (docs/lmdeploy-lora-internals.md §1): ``serve api_server`` builds the engine
in a ``spawn`` child (``ZMQMPEngine``, ``mp_engine_proc``); tp>1 builds one model per rank in ``spawn``
workers (``MPExecutor``, ``ExecutorProc-<rank>``) or in Ray actors (the default on CUDA). A monkeypatch
in the parent reaches none of them; the ``.pth`` start-up hook must.

``tests/scripts/topology.py`` starts each kind of process with LMDeploy's own process-start code where it
runs on CPU (``ZMQMPEngine._start_mp_proc``, ``ExecutorProc.start``, ``init_ray_cluster`` with Ray's
actor options as ``RayExecutor`` sets them); only the process targets, which would start a CUDA engine,
are replaced by a probe (its docstring lists exactly what). The script runs with the python of a venv
holding our wheel and never imports our package. Each probe builds the tiny model with LMDeploy's own
functions and calls ``add_adapters`` through the name the model agent bound, with an ms-swift regex
adapter that LMDeploy's own function cannot load, so "active" means our loader really served it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.peft_fixtures import make_peft_adapter
from tests.support.venv_overlay import build_wheel, make_overlay_venv, site_packages

pytestmark = pytest.mark.slow
SCRIPTS = Path(__file__).parent / "scripts"
STARTUP_ONLY = ["lmdeploy_regex_lora_boot"]  # the .pth imports this module alone, no package


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("topologies")
    python = make_overlay_venv(tmp, build_wheel(tmp / "wheel"))
    base = tiny_model("qwen2")
    # swift 3.x default form: LMDeploy's add_adapters fails on it (KeyError ...lora_adapters...)
    adapter = make_peft_adapter(base, tmp / "swift", seed=9, r=8, lora_alpha=16,
                                target_modules=r"^(model.*\.(q_proj|k_proj|v_proj|o_proj|down_proj))$")
    return python, base, adapter


def run_topology(setup, topology: str, tmp_path: Path) -> tuple[dict, list[dict]]:
    python, base, adapter = setup
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LMDEPLOY_REGEX_LORA_DISABLE")}
    proc = subprocess.run([str(python), str(SCRIPTS / "topology.py"), topology, str(base), str(adapter),
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    parent = next(json.loads(line[len("PARENT "):]) for line in proc.stdout.splitlines()
                  if line.startswith("PARENT "))
    reports = [json.loads(p.read_text()) for p in sorted(tmp_path.glob(f"{topology}*.json"))]
    assert reports, f"no process reported\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return parent, reports


def check_report(info: dict, setup, parent: dict) -> None:
    python, _, _ = setup
    assert info["pid"] != parent["pid"]
    assert info["executable"] == str(python)
    # before LMDeploy was imported there, only the .pth's two tiny modules were loaded
    assert info["at_start"] == STARTUP_ONLY, info
    assert info["agent_wrapped"] and info["same_as_patch"], info
    assert info["package_file"].startswith(str(site_packages(python))), info["package_file"]
    assert info["add_adapters"] == "LoadPlan", info["add_adapters"]  # our loader's return value
    assert info["lora_slots"] > 0


def test_mp_engine_process(setup, tmp_path):
    parent, reports = run_topology(setup, "mp_engine", tmp_path)
    assert parent["at_start"] == STARTUP_ONLY and parent["exitcodes"] == [0]
    (info,) = reports
    assert info["process_name"] == "mp_engine_proc"
    check_report(info, setup, parent)


def test_mp_executor_workers(setup, tmp_path):
    parent, reports = run_topology(setup, "mp_executor", tmp_path)
    assert parent["exitcodes"] == [0, 0]
    assert [r["process_name"] for r in reports] == ["ExecutorProc-0", "ExecutorProc-1"]
    assert len({r["pid"] for r in reports}) == 2
    for info in reports:
        check_report(info, setup, parent)


def test_ray_actors(setup, tmp_path):
    """A local Ray instance on CPU (1 CPU, 2 logical GPUs so LMDeploy's placement group can form)."""
    parent, reports = run_topology(setup, "ray", tmp_path)
    assert [r["where"] for r in reports] == ["ray actor rank 0", "ray actor rank 1"]
    assert len({r["pid"] for r in reports}) == 2
    for info in reports:
        check_report(info, setup, parent)
