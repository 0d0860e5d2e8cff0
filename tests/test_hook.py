"""Activation of the plugin: the ``.pth`` start-up hook (real wheel, real subprocesses) and the
in-process ``install``/``uninstall`` life cycle.

The subprocess tests use an overlay venv holding only our freshly built wheel, so they see what a
user gets from ``pip install``: no test code imports our package before LMDeploy is imported.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.venv_overlay import PTH_NAME, ROOT, build_wheel, make_overlay_venv, site_packages

pytestmark = pytest.mark.slow

PATCH = "lmdeploy.pytorch.models.patch"
AGENT = "lmdeploy.pytorch.engine.model_agent.agent"
LOG_TAG = "lmdeploy-regex-lora"

# Imported by the subprocesses (from a temp dir on sys.path, never from our package): reports
# what LMDeploy's two ``add_adapters`` names hold in the process that imports them.
PROBE = '''
import inspect, json, os, sys


def describe(fn):
    inner = getattr(fn, "__wrapped__", None)
    raw = inspect.unwrap(inner) if inner is not None else None
    ours = lambda obj: getattr(type(obj), "_lmdeploy_regex_lora_wrapper", False) is True
    patch = sys.modules["lmdeploy.pytorch.models.patch"]
    return {
        "ours": ours(fn),
        "type": type(fn).__module__ + "." + type(fn).__qualname__,
        "inner_is_ours": ours(inner),
        "inner_qualname": getattr(inner, "__qualname__", None),
        # the undecorated function was defined by executing LMDeploy's patch.py
        "inner_from_patch": raw is not None and getattr(raw, "__globals__", None) is vars(patch),
        "inner_file": getattr(getattr(raw, "__code__", None), "co_filename", None),
    }


def report():
    preloaded = sorted(m for m in sys.modules if m.startswith("lmdeploy_regex_lora"))
    import lmdeploy.pytorch.models.patch as patch
    import lmdeploy.pytorch.engine.model_agent.agent as agent
    return {
        "pid": os.getpid(),
        "preloaded": preloaded,
        "package_file": getattr(sys.modules.get("lmdeploy_regex_lora"), "__file__", None),
        "patch": describe(patch.add_adapters),
        "agent": describe(agent.add_adapters),
        "same_object": patch.add_adapters is agent.add_adapters,
        "patch_loader": type(patch.__loader__).__name__,
        "patch_spec_loader": type(patch.__spec__.loader).__name__,
    }


if __name__ == "__main__":
    print("PROBE " + json.dumps(report()))
'''


# --------------------------------------------------------------------------- helpers / fixtures


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our wheel, built once per session from a copy of the working tree."""
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def overlay_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Python of a venv that has the dev venv's packages plus our installed wheel."""
    return make_overlay_venv(tmp_path_factory.mktemp("overlay"), wheel)


@pytest.fixture(scope="session")
def probe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding ``probe.py``; also the subprocesses' cwd, so the repo is not on sys.path."""
    directory = tmp_path_factory.mktemp("probe")
    (directory / "probe.py").write_text(PROBE)
    return directory


def clean_env(**extra: str) -> dict[str, str]:
    """Environment without anything that could put the source tree or a stale switch in play."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LMDEPLOY_REGEX_LORA_DISABLE")}
    env.update(extra)
    return env


def run_python(python: Path, code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code``; fail the test with its output when it does not exit 0."""
    proc = subprocess.run(
        [str(python), "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def probe_results(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """Every ``PROBE {...}`` line the process (or its children) printed."""
    found = [json.loads(line[len("PROBE ") :]) for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert found, f"no probe output\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return found


def log_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """Our log lines, wherever LMDeploy's logging config sent them (its handler writes to stdout)."""
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if LOG_TAG in line and not line.startswith("PROBE ")]


def assert_wrapped(result: dict[str, Any], overlay: Path) -> None:
    """Both LMDeploy names hold one wrapper of ours around LMDeploy's own add_adapters."""
    for name in ("patch", "agent"):
        info = result[name]
        assert info["ours"], f"{name}.add_adapters is {info['type']}, not our wrapper"
        assert info["type"] == "lmdeploy_regex_lora.serve.hook.PluginWrapper"
        assert not info["inner_is_ours"], f"{name}.add_adapters is wrapped twice"
        assert info["inner_qualname"] == "add_adapters"
        assert info["inner_from_patch"], f"{name}: __wrapped__ is not LMDeploy's function: {info}"
        assert info["inner_file"].endswith(os.path.join("lmdeploy", "pytorch", "models", "patch.py"))
    assert result["same_object"], "agent bound a different object than patch holds"
    # the hook must hand the real loader back: nothing downstream may see our loader proxy
    assert result["patch_loader"] == result["patch_spec_loader"] == "SourceFileLoader"
    # the package came from the installed wheel, and user code never imported it
    assert result["package_file"].startswith(str(overlay.parent.parent)), result["package_file"]
    assert result["preloaded"] == ["lmdeploy_regex_lora_boot"]


# --------------------------------------------------------------------------- the wheel itself


def test_wheel_ships_pth_at_root_and_entry_point(wheel: Path) -> None:
    """The .pth must sit at the wheel root (site-packages root once installed), next to the package."""
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert PTH_NAME in names
        assert zf.read(PTH_NAME).decode() == (ROOT / PTH_NAME).read_text()
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        record = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/RECORD"))
    # the start-up module sits at the root, outside the package
    assert "lmdeploy_regex_lora_boot.py" in names and "lmdeploy_regex_lora/serve/hook.py" in names
    assert "[lmdeploy.plugins]" in entry_points
    assert "regex_lora = lmdeploy_regex_lora:install" in entry_points
    assert any(line.startswith(PTH_NAME + ",") for line in record.splitlines())  # uninstall removes it


# --------------------------------------------------------------------------- start-up via .pth


def test_pth_startup_is_cheap(overlay_python: Path, wheel: Path, probe_dir: Path, tmp_path: Path) -> None:
    """Start-up adds only our one tiny top-level module: no package, __future__, torch, lmdeploy, logging, typing."""
    baseline = make_overlay_venv(tmp_path, wheel)  # same overlay, then take our files back out
    own = site_packages(baseline)
    (own / PTH_NAME).unlink()
    code = "import sys; print('MODS ' + ' '.join(sorted(sys.modules))); print('FINDERS', sys.meta_path)"

    def modules(python: Path) -> tuple[set[str], str]:
        out = run_python(python, code, probe_dir).stdout
        line = next(x for x in out.splitlines() if x.startswith("MODS "))
        return set(line.split()[1:]), out

    with_plugin, out = modules(overlay_python)
    without, _ = modules(baseline)
    assert with_plugin - without == {"lmdeploy_regex_lora_boot"}
    for heavy in ("torch", "lmdeploy", "wrapt", "packaging", "logging", "typing", "importlib.metadata"):
        assert heavy not in with_plugin, f"{heavy} imported at start-up"
    assert "FINDERS [<module 'lmdeploy_regex_lora_boot'" in out  # the boot module itself is the finder, first


@pytest.mark.parametrize(("value", "disabled"), [
    ("1", True), ("true", True), ("YES", True), (" on ", True),
    ("0", False), ("", False), ("no", False), ("off", False),
])
def test_disable_switch_values(overlay_python: Path, probe_dir: Path, value: str, disabled: bool) -> None:
    """Only 1/true/yes/on (any case) disable; read when LMDeploy's first patch point loads, not at start-up."""
    code = """
        import sys
        from lmdeploy_regex_lora.serve.import_hook import env_disabled
        assert sys.meta_path[0] is sys.modules["lmdeploy_regex_lora_boot"]  # the hook is registered either way
        print("DISABLED", env_disabled())
    """
    out = run_python(overlay_python, code, probe_dir, LMDEPLOY_REGEX_LORA_DISABLE=value).stdout
    assert f"DISABLED {disabled}" in out


def test_plain_python_wraps_both_names(overlay_python: Path, probe_dir: Path) -> None:
    """A bare ``python -c`` importing LMDeploy gets the wrapper in patch and agent."""
    proc = run_python(overlay_python, "import json, probe; print('PROBE ' + json.dumps(probe.report()))", probe_dir)
    (result,) = probe_results(proc)
    assert_wrapped(result, overlay_python)
    assert log_lines(proc) == [], "a supported setup must not log warnings"


def test_spawn_child_is_wrapped(overlay_python: Path, probe_dir: Path) -> None:
    """A multiprocessing ``spawn`` child (LMDeploy's mp engine/executor) gets it too."""
    code = """
        import json, multiprocessing as mp, os, sys
        import probe
        ctx = mp.get_context("spawn")
        with ctx.Pool(1) as pool:
            result = pool.apply(probe.report)
        assert result["pid"] != os.getpid()
        assert "lmdeploy" not in sys.modules, "the parent must not have imported LMDeploy"
        print("PROBE " + json.dumps(result))
    """
    (result,) = probe_results(run_python(overlay_python, code, probe_dir))
    assert_wrapped(result, overlay_python)


def test_subprocess_child_is_wrapped(overlay_python: Path, probe_dir: Path) -> None:
    """A plain ``subprocess`` started from that python gets it as well."""
    code = """
        import subprocess, sys
        out = subprocess.run([sys.executable, "probe.py"], capture_output=True, text=True, check=True)
        sys.stdout.write(out.stdout)
    """
    (result,) = probe_results(run_python(overlay_python, code, probe_dir))
    assert_wrapped(result, overlay_python)


def test_pth_hooked_uninstall_restores_originals(overlay_python: Path, probe_dir: Path) -> None:
    """After the .pth wrapped patch first (agent then bound the wrapper by name), uninstall puts
    LMDeploy's own function back under both names, and install wraps them again, once."""
    code = """
        import lmdeploy.pytorch.models.patch as patch
        import lmdeploy.pytorch.engine.model_agent.agent as agent
        import lmdeploy_regex_lora as plugin
        from lmdeploy_regex_lora.serve import hook
        wrapper = patch.add_adapters
        original = wrapper.__wrapped__
        assert hook.is_wrapper(wrapper) and agent.add_adapters is wrapper and plugin.is_installed()
        plugin.uninstall()
        assert patch.add_adapters is original and agent.add_adapters is original
        assert not plugin.is_installed()
        assert __import__("lmdeploy_regex_lora_boot") not in __import__("sys").meta_path
        assert plugin.install() is True and plugin.install() is True
        again = patch.add_adapters
        assert hook.is_wrapper(again) and agent.add_adapters is again and again.__wrapped__ is original
        print("OK")
    """
    assert "OK" in run_python(overlay_python, code, probe_dir).stdout


def test_disabled_leaves_lmdeploy_untouched_and_logs_once(overlay_python: Path, probe_dir: Path) -> None:
    code = """
        import importlib, sys
        import lmdeploy.pytorch.models.patch as patch
        import lmdeploy.pytorch.engine.model_agent.agent as agent
        importlib.reload(patch)  # a third trigger: still only one log line
        assert type(agent.add_adapters).__name__ == "function", type(agent.add_adapters)
        assert type(patch.add_adapters).__name__ == "function", type(patch.add_adapters)
        assert "lmdeploy_regex_lora.serve.hook" not in sys.modules, "disabled must not even load the hook"
        print("OK")
    """
    proc = run_python(overlay_python, code, probe_dir, LMDEPLOY_REGEX_LORA_DISABLE="1")
    assert "OK" in proc.stdout
    lines = log_lines(proc)
    assert len(lines) == 1, lines
    assert "disabled by LMDEPLOY_REGEX_LORA_DISABLE" in lines[0]


def test_unsupported_version_stands_aside_with_one_warning(wheel: Path, probe_dir: Path, tmp_path: Path) -> None:
    """A fake ``lmdeploy-0.10.0.dist-info`` ahead of the real one: nothing wrapped, one warning line."""
    python = make_overlay_venv(tmp_path, wheel)  # own overlay: the fake must not leak into others
    fake = site_packages(python) / "lmdeploy-0.10.0.dist-info"
    fake.mkdir()
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: lmdeploy\nVersion: 0.10.0\n")
    code = """
        import importlib.metadata, sys
        assert importlib.metadata.version("lmdeploy") == "0.10.0"
        import lmdeploy.pytorch.models.patch as patch
        import lmdeploy.pytorch.engine.model_agent.agent as agent
        assert type(patch.add_adapters).__name__ == "function", type(patch.add_adapters)
        assert agent.add_adapters is patch.add_adapters
        assert sys.modules["lmdeploy_regex_lora_boot"] not in sys.meta_path, sys.meta_path
        import lmdeploy_regex_lora as plugin
        assert plugin.install() is False and not plugin.is_installed()
        print("OK")
    """
    proc = run_python(python, code, probe_dir)
    assert "OK" in proc.stdout
    lines = log_lines(proc)
    assert len(lines) == 1, lines
    from lmdeploy_regex_lora.serve.hook import SUPPORTED

    assert "0.10.0" in lines[0] and all(str(spec) in lines[0] for spec in SUPPORTED)
    assert "WARNING" in lines[0]


def test_pth_with_missing_package_leaves_python_working(probe_dir: Path, tmp_path: Path) -> None:
    """A leftover .pth whose boot module is gone (pip removes both; this is a manual deletion): site reports
    the line once, names the file, and the interpreter goes on. The .pth line has no try/except because
    compiling one costs every Python start about 1 % more (docs/performance.md)."""
    (tmp_path / PTH_NAME).write_text((ROOT / PTH_NAME).read_text())
    code = f"import site; site.addsitedir({str(tmp_path)!r}); print('OK')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc
    assert PTH_NAME in proc.stderr and "lmdeploy_regex_lora_boot" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- in-process life cycle


@pytest.fixture
def lmdeploy_modules(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any, Any]]:
    """(patch, agent, hook) in a known state: plugin uninstalled before and after the test."""
    monkeypatch.delenv("LMDEPLOY_REGEX_LORA_DISABLE", raising=False)
    from lmdeploy_regex_lora.serve import hook, import_hook

    monkeypatch.setattr(import_hook, "_warned", set())  # each test gets its own log-once budget
    hook.uninstall()
    patch = importlib.import_module(PATCH)
    agent = importlib.import_module(AGENT)
    yield patch, agent, hook
    hook.uninstall()


def test_install_twice_uninstall_restores_identity(lmdeploy_modules: tuple[Any, Any, Any]) -> None:
    patch, agent, hook = lmdeploy_modules
    original_patch, original_agent = patch.add_adapters, agent.add_adapters
    assert not hook.is_wrapper(original_patch) and not hook.is_installed()

    assert hook.install() is True
    wrapper = patch.add_adapters
    assert hook.is_wrapper(wrapper) and wrapper.__wrapped__ is original_patch
    assert agent.add_adapters is wrapper  # one wrapper per original function
    assert hook.install() is True  # idempotent: no second layer
    assert patch.add_adapters is wrapper and agent.add_adapters is wrapper
    assert not hook.is_wrapper(wrapper.__wrapped__)
    assert hook.is_installed()

    hook.uninstall()
    assert patch.add_adapters is original_patch and agent.add_adapters is original_agent
    assert not hook.is_installed()
    hook.uninstall()  # idempotent
    assert patch.add_adapters is original_patch

    assert hook.install() is True
    assert hook.is_wrapper(patch.add_adapters) and agent.add_adapters is patch.add_adapters
    assert patch.add_adapters.__wrapped__ is original_patch


def test_uninstall_restores_agent_that_bound_the_wrapper(lmdeploy_modules: tuple[Any, Any, Any]) -> None:
    """The .pth order: patch wrapped first, agent then imports the wrapper by name."""
    patch, agent, hook = lmdeploy_modules
    original = patch.add_adapters
    assert hook.install() is True
    wrapper = patch.add_adapters
    hook.uninstall()
    patch.add_adapters = wrapper  # simulate: only patch was wrapped when agent ran its import
    agent.add_adapters = wrapper
    try:
        hook.wrap_module(patch)
        hook.wrap_module(agent)
        assert agent.add_adapters is wrapper and patch.add_adapters is wrapper
        hook.uninstall()
        assert patch.add_adapters is original and agent.add_adapters is original
    finally:
        patch.add_adapters = agent.add_adapters = original


def test_wrapper_calls_our_loader_with_lmdeploys_signature(
    lmdeploy_modules: tuple[Any, Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Positional/keyword calls are bound to ``(model, adapters, dtype=torch.float16, device=None)``,
    run under inference mode like LMDeploy's own, and our return value passes through."""
    import torch

    from lmdeploy_regex_lora.serve import loader

    patch, agent, hook = lmdeploy_modules
    calls: list[tuple[Any, ...]] = []

    def fake_loader(model: Any, adapters: Any, dtype: Any = None, device: Any = None) -> str:
        calls.append((model, adapters, dtype, device, torch.is_inference_mode_enabled()))
        return "result"

    monkeypatch.setattr(loader, "add_adapters", fake_loader)
    assert hook.install() is True
    adapters = {"a": "/adapters/a"}
    assert patch.add_adapters("model", adapters) == "result"
    assert agent.add_adapters("model", adapters, dtype=torch.bfloat16, device="cpu") == "result"
    assert patch.add_adapters(model="m", adapters={}, device=torch.device("cpu")) == "result"
    assert calls == [
        ("model", adapters, torch.float16, None, True),
        ("model", adapters, torch.bfloat16, "cpu", True),
        ("m", {}, torch.float16, torch.device("cpu"), True),
    ]
    with pytest.raises(TypeError):
        patch.add_adapters("model")  # same contract as LMDeploy's function
    assert len(calls) == 3


def test_broken_loader_falls_back_to_lmdeploy(
    lmdeploy_modules: tuple[Any, Any, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """If our loader cannot even be imported, LMDeploy's own function runs (with one warning)."""
    patch, _agent, hook = lmdeploy_modules
    assert hook.install() is True
    monkeypatch.setitem(sys.modules, "lmdeploy_regex_lora.serve.loader", None)  # import now raises
    with caplog.at_level(logging.WARNING, logger="lmdeploy.regex_lora"):
        assert patch.add_adapters(object(), {}) is None  # LMDeploy returns None for no adapters
        assert patch.add_adapters(object(), {}) is None
    assert [r.getMessage() for r in caplog.records].count(
        "lmdeploy-regex-lora: loader failed to import; using LMDeploy's add_adapters"
    ) == 1


@pytest.mark.parametrize("reason", ["version", "disabled"])
def test_in_process_stand_aside(
    lmdeploy_modules: tuple[Any, Any, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    reason: str,
) -> None:
    patch, agent, hook = lmdeploy_modules
    original = patch.add_adapters
    if reason == "version":
        monkeypatch.setattr(hook, "lmdeploy_version", lambda: "0.19.0")
    else:
        monkeypatch.setenv("LMDEPLOY_REGEX_LORA_DISABLE", "true")
    with caplog.at_level(logging.WARNING, logger="lmdeploy.regex_lora"):
        assert hook.install() is False
        assert hook.install() is False
    assert patch.add_adapters is original and agent.add_adapters is original
    assert not hook.is_installed()
    assert len(caplog.records) == 1, caplog.records
    assert ("0.19.0" in caplog.text and "<0.19" in caplog.text) if reason == "version" else "disabled" in caplog.text


def test_finder_runs_callback_after_module_executes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The finder fires only once the module has fully run, hides its proxy, and swallows errors."""
    import lmdeploy_regex_lora_boot as boot
    from lmdeploy_regex_lora.serve import hook, import_hook

    (tmp_path / "fake_lmdeploy_target.py").write_text("add_adapters = 'defined'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(boot, "TARGET_MODULES", frozenset({"fake_lmdeploy_target"}))
    monkeypatch.setattr(import_hook, "_warned", set())
    seen: list[Any] = []

    def boom(module: Any) -> None:
        seen.append(module.add_adapters)
        raise RuntimeError("hook bug")

    monkeypatch.setattr(hook, "on_module_loaded", boom)
    monkeypatch.setattr(sys, "meta_path", [boot, *(f for f in sys.meta_path if f is not boot)])
    monkeypatch.delitem(sys.modules, "fake_lmdeploy_target", raising=False)
    with caplog.at_level(logging.WARNING, logger="lmdeploy.regex_lora"):
        module = importlib.import_module("fake_lmdeploy_target")
    monkeypatch.delitem(sys.modules, "fake_lmdeploy_target")
    assert seen == ["defined"]
    assert type(module.__loader__).__name__ == "SourceFileLoader"
    assert module.__spec__.loader is module.__loader__
    assert "could not wrap add_adapters" in caplog.text
