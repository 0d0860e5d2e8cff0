"""The plugin against several LMDeploy releases, each a real PyPI release in its own overlay venv.

Each release is installed with ``pip install --no-deps --target`` into an overlay venv (tests/support/venv_overlay.py)
that also holds our wheel and sees the dev venv's torch / transformers / triton behind them, so the older
``lmdeploy`` is imported ahead of the dev venv's 0.18.0 (the runner checks which file it imported). pip
caches the downloads; a failed download fails the test.

For every release in the supported range (``hook.SUPPORTED``), tests/scripts/version.py checks, with the plugin
activated by its ``.pth`` alone: LMDeploy's ``add_adapters`` and the CLI commands that choose an engine are
wrapped; two adapters (a swift regex and a list, ranks 24 and 8) on Qwen2 and on InternVL2 (InternLM2, where
LMDeploy's own InternVL LoRA path fails) give exactly PEFT's merged weights, as that release loads them; a few
LoRA linears run that release's Triton kernel (interpreted on CPU) on a batch mixing adapters; and rank 3
of TP=4 (KV heads replicated) matches LMDeploy's own sharding of the merged checkpoint.

For a release outside the range, the plugin must stand aside with one warning and LMDeploy must do
exactly what it does with the plugin disabled: same errors, bit-identical LoRA tensors.

``LMDEPLOY_REGEX_LORA_TEST_VERSIONS`` (space-separated) replaces the default releases (scripts/
version_matrix.py runs every release that way); ``LMDEPLOY_REGEX_LORA_VERSION_REPORT`` names a JSON file
that receives all results.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from packaging.version import Version

from lmdeploy_regex_lora.serve.hook import SUPPORTED
from tests.support.peft_fixtures import make_peft_adapter, merge_adapter_checkpoint
from tests.support.venv_overlay import build_wheel, make_overlay_venv, site_packages

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).parent / "scripts"
INSTALLED = importlib.metadata.version("lmdeploy")  # the dev venv's release (0.18.0)
# 0.14.0: before 0.15.0, where LMDeploy's own InternVL LoRA fallback was broken.
DEFAULT_VERSIONS = ("0.12.1", "0.14.0", "0.17.0")
OUT_OF_RANGE = "0.12.0"  # imports with transformers 5 but cannot build Qwen2 there; the plugin stands aside
STARTUP_ONLY = ["lmdeploy_regex_lora_boot"]  # the .pth imports this module alone, no package
KERNEL_TOL = 2e-5
QWEN_LEAVES = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"


def versions() -> list[str]:
    chosen = os.environ.get("LMDEPLOY_REGEX_LORA_TEST_VERSIONS", "").split() or list(DEFAULT_VERSIONS)
    return [v for v in chosen if v != INSTALLED] + [INSTALLED]


def overlay_for(version: str, root: Path, wheel: Path) -> Path:
    """An overlay venv whose ``lmdeploy`` is ``version`` from PyPI (the dev venv's own for INSTALLED)."""
    python = make_overlay_venv(root / version, wheel)
    if version != INSTALLED:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--disable-pip-version-check",
             "-q", "--target", str(site_packages(python)), f"lmdeploy=={version}"],
            capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"pip could not install lmdeploy=={version}:\n{proc.stdout}\n{proc.stderr}"
    return python


def run(python: Path, spec: dict, workdir: Path, disabled: bool = False) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    spec_file = workdir / "spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LMDEPLOY_REGEX_LORA_DISABLE")}
    env["TRITON_INTERPRET"] = "1"
    if disabled:
        env["LMDEPLOY_REGEX_LORA_DISABLE"] = "1"
    proc = subprocess.run([str(python), str(SCRIPTS / "version.py"), str(spec_file)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"failed": f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"}
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def results(tiny_model, tmp_path_factory) -> dict:
    """Every release's results, run two at a time (each run is one CPU-bound process)."""
    root = tmp_path_factory.mktemp("versions")
    wheel = build_wheel(root / "wheel")
    cases = {}
    for arch, specs in {
        "qwen2": [dict(target_modules=rf"^(model.*\.({QWEN_LEAVES}))$", r=24, lora_alpha=48),
                  dict(target_modules=["q_proj", "v_proj", "down_proj"], r=8, lora_alpha=16, use_rslora=True)],
        "internvl2_internlm2": [
            dict(target_modules=r"^(language_model(?=\.).*\.(wqkv|wo|w1|w2|w3))$", r=24, lora_alpha=16),
            dict(target_modules=["wqkv", "w2"], r=8, lora_alpha=8)],
    }.items():
        base = tiny_model(arch)
        adapters, merged = {}, {}
        for i, spec in enumerate(specs):
            adir = make_peft_adapter(base, root / f"{arch}-a{i}", seed=31 + i, **spec)
            adapters[f"a{i}"] = str(adir)
            merged[i + 1] = str(merge_adapter_checkpoint(base, adir, root / f"{arch}-a{i}-merged"))
        cases[arch] = {"base": str(base), "adapters": adapters, "merged": merged}
    plugin_spec = {"cases": cases, "mode": "plugin", "kernel_arch": "qwen2", "tp_arch": "qwen2", "tp": [4, 3]}
    # Outside the range: what LMDeploy does alone. A list adapter it loads, a swift regex it cannot.
    internlm2 = tiny_model("internlm2")
    observe_spec = {"mode": "observe", "cases": {
        "internlm2-list": {"base": str(internlm2), "merged": {}, "adapters": {"a": str(make_peft_adapter(
            internlm2, root / "il-list", seed=41, target_modules=["wqkv", "w2"], r=8, lora_alpha=16))}},
        "internlm2-regex": {"base": str(internlm2), "merged": {}, "adapters": {"a": str(make_peft_adapter(
            internlm2, root / "il-regex", seed=42, target_modules=r"^(model.*\.(wqkv|w2))$", r=8))}},
    }}

    jobs = {(v, "plugin"): (v, plugin_spec, False) for v in versions()}
    jobs[(OUT_OF_RANGE, "observe")] = (OUT_OF_RANGE, observe_spec, False)
    jobs[(OUT_OF_RANGE, "observe-disabled")] = (OUT_OF_RANGE, observe_spec, True)
    pythons = {v: overlay_for(v, root / "venvs", wheel) for v in {job[0] for job in jobs.values()}}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(run, pythons[v], spec, root / "runs" / "-".join(key), disabled)
                   for key, (v, spec, disabled) in jobs.items()}
        out = {key: f.result() for key, f in futures.items()}
    report = os.environ.get("LMDEPLOY_REGEX_LORA_VERSION_REPORT")
    if report:
        Path(report).write_text(json.dumps({"/".join(k): v for k, v in out.items()}, indent=1))
    out["pythons"] = pythons
    return out


@pytest.mark.parametrize("version", versions())
def test_supported_release_serves_exactly_peft(results, version):
    r = results[(version, "plugin")]
    assert "failed" not in r, r.get("failed")
    assert SUPPORTED.contains(Version(version)), f"{version} passes: widen hook.SUPPORTED"
    assert r["lmdeploy"] == version
    if version != INSTALLED:  # the overlay's release, not the dev venv's
        assert r["lmdeploy_file"].startswith(str(site_packages(results["pythons"][version]))), r["lmdeploy_file"]
    assert r["at_start"] == STARTUP_ONLY
    assert r["agent_wrapped"] and r["patch_wrapped"], r
    assert r["cli_wrapped"] == {"serve": True, "chat": True}
    assert not [line for line in r["our_log"] if line.startswith("WARNING")], r["our_log"]
    for arch, case in r["cases"].items():
        assert case.get("returned") == "LoadPlan", (arch, case)
        assert case["compare"]["targeted"] > 0 and case["compare"]["slots"] > 0, (arch, case)
    kernel = r["cases"]["qwen2"]["kernel"]
    assert len(kernel["modules"]) == 3 and kernel["max_err"] <= KERNEL_TOL, kernel
    tp = r["cases"]["qwen2"]["tp"]
    assert tp["tp"] == 4 and tp["targeted"] > 0, tp


def test_release_outside_range_is_left_alone(results):
    assert not SUPPORTED.contains(Version(OUT_OF_RANGE))
    normal, disabled = results[(OUT_OF_RANGE, "observe")], results[(OUT_OF_RANGE, "observe-disabled")]
    assert "failed" not in normal and "failed" not in disabled, (normal.get("failed"), disabled.get("failed"))
    assert normal["lmdeploy"] == OUT_OF_RANGE
    assert not normal["agent_wrapped"] and not normal["patch_wrapped"]
    assert normal["cli_wrapped"] == {"serve": False, "chat": False}
    (line,) = normal["our_log"]
    assert line.startswith("WARNING") and OUT_OF_RANGE in line and all(str(s) in line for s in SUPPORTED), line
    assert disabled["our_log"] == [
        "WARNING: lmdeploy-regex-lora is disabled by LMDEPLOY_REGEX_LORA_DISABLE; LMDeploy's own add_adapters "
        "stays in place"]
    # LMDeploy behaves exactly as without the plugin: same results, same LoRA tensors bit for bit
    assert normal["cases"] == disabled["cases"]
    assert "error" not in normal["cases"]["internlm2-list"] and normal["cases"]["internlm2-list"]["lora"]
    assert normal["cases"]["internlm2-regex"]["error"].startswith("KeyError"), normal["cases"]["internlm2-regex"]


def test_package_requirement_is_the_supported_range():
    """pip must not replace a supported LMDeploy (or install an unchecked one) when installing the plugin."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    requires = [line.strip() for line in cfg["options"]["install_requires"].splitlines() if line.strip()]
    (lmdeploy,) = [r for r in requires if r.startswith("lmdeploy")]
    from packaging.requirements import Requirement

    assert Requirement(lmdeploy).specifier == SUPPORTED
