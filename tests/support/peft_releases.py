"""PEFT's own matching code from every release 0.10 .. 0.21, as test oracles next to the installed 0.14.

Only PEFT 0.14 is installed (LMDeploy pins it), but adapters come from every release. The wheels of
the other releases are fetched with pip (``pip download --no-deps``) into a cache outside the repo,
and three pieces of each release's source are compiled in an isolated namespace, without importing
that release's ``peft`` package (whose imports would clash with the installed one):

* ``check_target_module_exists`` (``tuners/tuners_utils.py``) with its helpers ``_ExcludedModule`` and
  ``match_target_against_key``: does PEFT wrap module ``key``?
* the statements of ``LoraModel._create_and_replace`` (``tuners/lora/model.py``) that compute ``r``
  and ``alpha`` from ``rank_pattern`` / ``alpha_pattern``, with ``get_pattern_key`` (``utils/other.py``)
  where the release has it.

Nothing is copied into this repository: the code is read from the release's wheel at test time.
"""

from __future__ import annotations
import __future__

import ast
import itertools
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

#: One release per rule era (plus the neighbours of each change).
RELEASES: tuple[str, ...] = ("0.10.0", "0.11.1", "0.12.0", "0.13.2", "0.14.0", "0.15.2", "0.16.0", "0.17.1",
                             "0.18.1", "0.19.1", "0.20.0", "0.21.2")

CACHE = pathlib.Path(os.environ.get("LMDEPLOY_REGEX_LORA_PEFT_WHEELS",
                                    pathlib.Path.home() / ".cache" / "lmdeploy-regex-lora" / "peft-wheels"))


def wheel(version: str) -> pathlib.Path | str:
    """The release's wheel (downloaded once), or a string saying why it cannot be had."""
    CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(CACHE.glob(f"peft-{version}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", f"peft=={version}", "-d", str(CACHE)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"pip download peft=={version} failed: {exc}"
    found = sorted(CACHE.glob(f"peft-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        return f"pip download peft=={version} failed: {proc.stderr.strip()[-300:]}"
    return found[0]


def _defs(source: str) -> dict[str, ast.AST]:
    """Top-level functions and classes of a module, by name."""
    return {n.name: n for n in ast.parse(source).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def _rank_alpha_source(model_source: str) -> str:
    """The statements of ``LoraModel._create_and_replace`` from the rank/alpha lookup up to ``alpha = ...``."""
    lora_model = _defs(model_source)["LoraModel"]
    method = next(n for n in lora_model.body if isinstance(n, ast.FunctionDef) and n.name == "_create_and_replace")
    body = method.body
    first = next(i for i, s in enumerate(body) if "rank_pattern" in ast.unparse(s))
    last = next(i for i, s in enumerate(body) if isinstance(s, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "alpha" for t in s.targets))
    lines = "\n".join(ast.unparse(s) for s in body[first:last + 1])
    return "def rank_alpha(lora_config, current_key):\n" + textwrap.indent(lines, "    ") + "\n    return r, alpha\n"


@dataclass
class Oracle:
    """One PEFT release's matching functions."""

    version: str
    check_target_module_exists: Callable[[Any, str], Any]
    rank_alpha: Callable[[Any, str], tuple[int, float]]
    rank_alpha_source: str

    def targets(self, config: dict[str, Any], key: str) -> bool:
        return bool(self.check_target_module_exists(peft_config(config), key))

    def r_alpha(self, config: dict[str, Any], key: str) -> tuple[int, float]:
        return self.rank_alpha(peft_config(config), key)


def peft_config(config: dict[str, Any]) -> SimpleNamespace:
    """A stand-in for ``LoraConfig`` after its ``__post_init__``: lists become sets, as PEFT stores them."""
    ns = SimpleNamespace(target_modules=None, exclude_modules=None, layers_to_transform=None, layers_pattern=None,
                         modules_to_save=None, target_parameters=None, rank_pattern={}, alpha_pattern={}, r=8,
                         lora_alpha=8)
    for key, value in config.items():
        if key in ("target_modules", "exclude_modules") and isinstance(value, list):
            value = set(value)
        setattr(ns, key, value)
    return ns


def load_oracle(version: str) -> Oracle | str:
    """The release's functions, or a string saying why they cannot be had."""
    whl = wheel(version)
    if isinstance(whl, str):
        return whl
    with zipfile.ZipFile(whl) as zf:
        tuners_utils = zf.read("peft/tuners/tuners_utils.py").decode()
        other = zf.read("peft/utils/other.py").decode()
        lora_model = zf.read("peft/tuners/lora/model.py").decode()
    ns: dict[str, Any] = {"re": re, "chain": itertools.chain, "__name__": f"peft_{version.replace('.', '_')}"}
    tu, ot = _defs(tuners_utils), _defs(other)
    pieces = [ot[name] for name in ("match_target_against_key", "get_pattern_key") if name in ot]
    pieces += [tu[name] for name in ("_ExcludedModule", "check_target_module_exists") if name in tu]
    module = ast.Module(body=pieces, type_ignores=[])
    # Annotations stay unevaluated (their typing names are not in the namespace).
    flags = __future__.annotations.compiler_flag
    exec(compile(module, f"<peft {version} matching>", "exec", flags=flags), ns)  # PEFT's own code, from its wheel
    rank_alpha_src = _rank_alpha_source(lora_model)
    exec(compile(rank_alpha_src, f"<peft {version} rank/alpha>", "exec", flags=flags), ns)
    return Oracle(version, ns["check_target_module_exists"], ns["rank_alpha"], rank_alpha_src)
