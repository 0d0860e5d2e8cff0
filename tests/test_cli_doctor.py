"""``doctor``: is the hook active in a fresh interpreter, and why not, in the installs users really have.

Our wheel in an overlay venv (tests/support/venv_overlay.py) is what ``pip install`` gives; an editable install
and the bare source tree are the two ways people end up without the start-up ``.pth``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli_run import ROOT, describe, json_out, run_cli
from tests.support.venv_overlay import build_wheel, make_overlay_venv, site_packages

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def overlay(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("doctor")
    return make_overlay_venv(tmp, build_wheel(tmp / "wheel"))


def test_active_in_a_wheel_install(overlay, tmp_path):
    proc = run_cli("doctor", "--json", python=overlay, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    report = json_out(proc)
    assert report["active"] and report["reasons"] == []
    assert report["probe"]["pth_ran"] and report["probe"]["wrapped"] and report["probe"]["is_installed"]
    assert report["install"]["installed"] and not report["install"]["editable"]
    assert report["install"]["pth_files"] == [str(site_packages(overlay) / "lmdeploy_regex_lora.pth")]
    assert report["lmdeploy_in_range"] and report["versions"]["lmdeploy"] == _version("lmdeploy")
    for name in ("torch", "peft", "transformers", "triton"):
        assert report["versions"][name] == _version(name)


def test_disabled_by_environment(overlay, tmp_path):
    proc = run_cli("doctor", python=overlay, cwd=tmp_path, env={"LMDEPLOY_REGEX_LORA_DISABLE": "1"})
    assert proc.returncode == 1, describe(proc)
    assert "NOT ACTIVE" in proc.stdout
    assert "why: disabled by LMDEPLOY_REGEX_LORA_DISABLE='1'" in proc.stdout


def test_lmdeploy_out_of_range(overlay, tmp_path):
    fake = site_packages(overlay) / "lmdeploy-0.99.0.dist-info"  # ahead of the real one on sys.path
    fake.mkdir()
    try:
        (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: lmdeploy\nVersion: 0.99.0\n")
        proc = run_cli("doctor", "--json", python=overlay, cwd=tmp_path)
    finally:
        shutil.rmtree(fake)
    assert proc.returncode == 1, describe(proc)
    report = json_out(proc)
    assert not report["active"] and not report["lmdeploy_in_range"]
    assert any("0.99.0 is outside the supported range" in r for r in report["reasons"]), report["reasons"]


def _bare_venv(folder: Path) -> Path:
    """A venv that sees the dev venv's packages (torch, LMDeploy) but holds nothing of ours."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    deps = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (site_packages(python) / "_deps.pth").write_text(f"import site; site.addsitedir({deps!r})\n")
    return python


def test_editable_install_has_no_startup_file(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "tests", "build", "*.egg-info", "__pycache__"))
    python = _bare_venv(tmp_path / "venv")
    pip = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-e", str(src)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    proc = run_cli("doctor", "--json", python=python, cwd=tmp_path)
    assert proc.returncode == 1, describe(proc)
    report = json_out(proc)
    assert report["install"]["editable"] and report["install"]["pth_files"] == []
    assert not report["probe"]["pth_ran"]
    assert any("editable mode" in r for r in report["reasons"]), report["reasons"]


def test_source_tree_without_install(tmp_path):
    # Run from the checkout (python -m finds the package there), in a venv where nothing of ours is installed.
    python = _bare_venv(tmp_path / "venv")
    proc = run_cli("doctor", python=python, cwd=ROOT)
    assert proc.returncode == 1, describe(proc)
    assert "NOT ACTIVE" in proc.stdout and "why: the package is not installed in this interpreter" in proc.stdout
    assert "cannot import it at all" in proc.stdout


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)
