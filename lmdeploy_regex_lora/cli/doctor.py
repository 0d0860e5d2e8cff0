"""``lmdeploy-regex-lora doctor``: is the plugin active where LMDeploy will run, and if not, why.

The plugin activates through ``lmdeploy_regex_lora.pth`` at interpreter start, so the only honest
test is a fresh interpreter: the same Python, the same environment, started in an empty folder (as a
server started from its console script would be, without the current folder on ``sys.path``), that
imports LMDeploy's ``patch`` module and asks :func:`lmdeploy_regex_lora.serve.hook.is_installed`. This
process only collects versions and reads files; it never imports torch or LMDeploy itself, and reading
the supported range imports the hook module without side effects (the boot module registers nothing
until its ``boot()`` is called).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import site
import subprocess
import sys
import tempfile

from . import common as cc

DESCRIPTION = """\
Report the versions that matter (LMDeploy, torch, peft, transformers, triton, safetensors), the
LMDeploy range this plugin supports, and whether the plugin's hook is active in a fresh interpreter
of this Python (same environment variables), with the reason when it is not: disabled by
LMDEPLOY_REGEX_LORA_DISABLE, an LMDeploy outside the supported range, or the start-up .pth file
missing (e.g. an editable install).

Exit status: 0 the hook is active; 1 it is not.
"""

PTH_NAME = "lmdeploy_regex_lora.pth"
DIST_NAME = "lmdeploy-regex-lora"
PACKAGES = ("lmdeploy", "torch", "peft", "transformers", "triton", "safetensors", "wrapt")
PROBE_TIMEOUT_S = 300

# Runs in the fresh interpreter. Reads sys.modules first: the .pth must have run before anything here.
PROBE = r'''
import json, sys
boot = sys.modules.get("lmdeploy_regex_lora_boot")
out = {"pth_ran": boot is not None and boot in sys.meta_path, "lmdeploy_error": None}
try:
    import lmdeploy.pytorch.models.patch as patch
except Exception as exc:
    patch = None
    out["lmdeploy_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
hook = sys.modules.get("lmdeploy_regex_lora.serve.hook")
out["hook_loaded"] = hook is not None
out["is_installed"] = bool(hook is not None and hook.is_installed())
out["stand_aside"] = hook.stand_aside_reason() if hook is not None else None
fn = getattr(patch, "add_adapters", None)
out["wrapped"] = getattr(type(fn), "_lmdeploy_regex_lora_wrapper", False) is True
try:
    import lmdeploy_regex_lora
    out["package_file"] = lmdeploy_regex_lora.__file__
except Exception:
    out["package_file"] = None
print("DOCTOR-PROBE " + json.dumps(out))
'''


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _install_kind() -> dict:
    """How this package is installed: a wheel (with the .pth), editable, or not at all (source on sys.path)."""
    info = {"installed": False, "editable": False, "pth_files": [], "site_dirs": []}
    try:
        dist = importlib.metadata.distribution(DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        info["installed"] = True
        direct = dist.read_text("direct_url.json")
        if direct:
            try:
                info["editable"] = bool(json.loads(direct).get("dir_info", {}).get("editable", False))
            except ValueError:
                pass
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    info["site_dirs"] = dirs
    info["pth_files"] = [os.path.join(d, PTH_NAME) for d in dirs if os.path.isfile(os.path.join(d, PTH_NAME))]
    return info


def probe(timeout: float = PROBE_TIMEOUT_S) -> dict:
    """Run :data:`PROBE` in a fresh interpreter of this Python, started in an empty folder."""
    with tempfile.TemporaryDirectory(prefix="lmdeploy-regex-lora-doctor-") as cwd:
        try:
            proc = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"the fresh interpreter did not finish in {timeout:g} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("DOCTOR-PROBE "):
            return json.loads(line[len("DOCTOR-PROBE "):])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"error": f"the fresh interpreter failed (exit {proc.returncode}): {tail}"}


def diagnose() -> dict:
    """Everything ``doctor`` prints (its ``--json`` output)."""
    from lmdeploy_regex_lora_boot import ENV_DISABLE

    from .. import __version__
    from ..serve.hook import SUPPORTED as supported  # importing hook imports neither torch nor LMDeploy
    from ..serve.hook import in_supported_range
    from ..serve.import_hook import env_disabled

    versions = {name: _version(name) for name in PACKAGES}
    lmdeploy = versions["lmdeploy"]
    in_range = in_supported_range(lmdeploy)
    install = _install_kind()
    result = probe()
    report = {
        "plugin_version": __version__, "python": sys.version.split()[0], "executable": sys.executable,
        "platform": platform.platform(), "versions": versions, "supported_lmdeploy": str(supported),
        "lmdeploy_in_range": in_range, ENV_DISABLE: os.environ.get(ENV_DISABLE), "install": install,
        "probe": result, "active": bool(result.get("is_installed")) and not result.get("error"), "reasons": [],
    }
    reasons = report["reasons"]
    if result.get("error"):
        reasons.append(result["error"])
    if lmdeploy is None or result.get("lmdeploy_error"):
        reasons.append("LMDeploy cannot be imported here"
                       + (f" ({result['lmdeploy_error']})" if result.get("lmdeploy_error") else "")
                       + "; install lmdeploy in this environment")
    if env_disabled():
        reasons.append(f"disabled by {ENV_DISABLE}={os.environ.get(ENV_DISABLE)!r}; unset it to activate the plugin")
    if lmdeploy is not None and not in_range:
        reasons.append(f"LMDeploy {lmdeploy} is outside the supported range lmdeploy{supported}; the plugin stands "
                       "aside and LMDeploy's own loader runs")
    if not result.get("error") and not result.get("pth_ran"):
        reasons.append(_why_no_pth(install, result))
    if result.get("pth_ran") and not result.get("lmdeploy_error") and not report["active"] and not reasons:
        reasons.append(result.get("stand_aside") or "the hook ran but LMDeploy's add_adapters is not wrapped "
                       "(its signature changed?); see the warning LMDeploy's log prints at start-up")
    return report


def _why_no_pth(install: dict, result: dict) -> str:
    if install["editable"]:
        return (f"the start-up file {PTH_NAME} did not run: the package is installed in editable mode (pip install "
                "-e), which does not put that file into site-packages; install it normally (pip install .) or call "
                "lmdeploy_regex_lora.install() in your code before LMDeploy builds the engine")
    if not install["installed"]:
        found = result.get("package_file")
        how = (f"a fresh interpreter imports it from {os.path.dirname(os.path.dirname(found))} (PYTHONPATH?)" if found
               else "a fresh interpreter outside the current folder cannot import it at all (this command runs "
                    "from a source checkout)")
        return (f"the package is not installed in this interpreter ({how}), so no {PTH_NAME} activates it; install "
                "the wheel (pip install lmdeploy-regex-lora, or pip install . in the checkout)")
    if not install["pth_files"]:
        return (f"{PTH_NAME} is missing from site-packages ({', '.join(install['site_dirs'])}); reinstall the "
                "package (pip install --force-reinstall lmdeploy-regex-lora)")
    return (f"{', '.join(install['pth_files'])} exists but did not run: the interpreter skips site-packages .pth "
            "files when started with -S or -I, or the file is in a folder site does not process")


def render(report: dict) -> str:
    rows = [["lmdeploy-regex-lora", report["plugin_version"]], ["python", f"{report['python']} "
                                                                          f"({report['executable']})"]]
    rows += [[name, v or "not installed"] for name, v in report["versions"].items()]
    install = report["install"]
    kind = "editable" if install["editable"] else "installed" if install["installed"] else "not installed"
    rows += [
        ["supported LMDeploy", f"lmdeploy{report['supported_lmdeploy']} "
                               f"({'this one is in range' if report['lmdeploy_in_range'] else 'OUT OF RANGE'})"],
        ["package", kind + (f", start-up file {install['pth_files'][0]}" if install["pth_files"] else
                            f", no {PTH_NAME} in site-packages")],
        ["LMDEPLOY_REGEX_LORA_DISABLE", report["LMDEPLOY_REGEX_LORA_DISABLE"] or "(unset)"],
        ["hook in a fresh interpreter", "ACTIVE" if report["active"] else "NOT ACTIVE"],
    ]
    lines = [cc.table(["", ""], rows, indent="").split("\n", 1)[1]]
    for reason in report["reasons"]:
        lines.append(f"  why: {reason}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = diagnose()
    cc.show(report, render, args.json)
    return cc.OK if report["active"] else cc.FAILED
