"""Import costs the package promises, checked in fresh interpreters rather than promised in docstrings.

* The ``.pth`` target (``lmdeploy_regex_lora_boot``) runs in every Python process of the environment: it
  imports nothing beyond ``sys`` and ``os`` and, imported, registers nothing until ``boot()`` is called.
* ``cli/`` (so ``--help`` is instant) and ``merge/`` (which streams checkpoints in a small process) never
  import torch or LMDeploy when their modules are imported; neither do ``errors`` and ``safetensors_io``.
* Importing any module of the package changes no import machinery (``sys.meta_path``).
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import lmdeploy_regex_lora

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lmdeploy", "transformers", "numpy")


def _run(code: str, *flags: str) -> dict:
    proc = subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _modules(*subpackages: str) -> list[str]:
    names = []
    for sub in subpackages:
        package = f"lmdeploy_regex_lora.{sub}" if sub else "lmdeploy_regex_lora"
        path = [str(Path(lmdeploy_regex_lora.__file__).parent / sub)] if sub else lmdeploy_regex_lora.__path__
        names.append(package)
        names += [f"{package}.{m.name}" for m in pkgutil.iter_modules(path) if m.name != "__main__"]
    return names


def test_boot_module_imports_only_sys_and_os_and_registers_nothing():
    # -S: no site, so no .pth has run and the only modules loaded are the interpreter's own.
    code = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "finders = list(sys.meta_path)\n"
        "import lmdeploy_regex_lora_boot as boot\n"
        "new = sorted(set(sys.modules) - before - {'lmdeploy_regex_lora_boot'})\n"
        "quiet = sys.meta_path == finders\n"
        "boot.boot()\n"
        "print(json.dumps({'new': new, 'quiet': quiet, 'booted': sys.meta_path[0] is boot}))\n"
    )
    out = _run(f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + code, "-S")
    assert set(out["new"]) <= {"os", "posix", "stat", "_stat", "posixpath", "genericpath", "_collections_abc",
                               "os.path"}, out["new"]
    assert out["quiet"], "importing the boot module must not register the finder"
    assert out["booted"], "boot() registers the finder"


def test_cli_and_merge_import_neither_torch_nor_lmdeploy():
    modules = _modules("", "cli", "merge")
    modules = [m for m in modules if not m.startswith(("lmdeploy_regex_lora.serve", "lmdeploy_regex_lora.testing"))]
    assert "lmdeploy_regex_lora.cli.verify" in modules and "lmdeploy_regex_lora.merge.writer" in modules
    code = (
        "import importlib, json, sys\n"
        f"loaded = {{}}\nfor name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"    loaded[name] = [h for h in {HEAVY[:2]!r} if h in sys.modules]\n"
        "print(json.dumps(loaded))\n"
    )
    loaded = _run(code)
    assert loaded.keys() == set(modules)
    assert {name: heavy for name, heavy in loaded.items() if heavy} == {}


def test_no_module_changes_the_import_machinery():
    modules = _modules("", "serve", "merge", "cli", "testing")
    # What the libraries the package uses do to sys.meta_path on their own happens first.
    code = (
        "import importlib, json, sys\n"
        "import numpy, regex, safetensors, torch, transformers, wrapt\n"
        "import lmdeploy.pytorch.models.patch, lmdeploy.pytorch.nn.linear\n"
        "before = [type(f).__name__ for f in sys.meta_path]\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps({'before': before, 'after': [type(f).__name__ for f in sys.meta_path]}))\n"
    )
    out = _run(code)
    assert out["after"] == out["before"], out
