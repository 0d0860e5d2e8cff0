"""The import hook behind the boot module: wrap LMDeploy's patch points once their modules have executed.

:func:`lmdeploy_regex_lora_boot.find_spec` sends the imports named in its patch table here, and only
those. :func:`find_target_spec` asks the other finders for the real spec and decorates its loader
(:class:`_LoaderProxy`), so editable installs, zip imports and other hooks keep working; once the
module has fully executed, :mod:`.hook` wraps it (or, when the plugin is disabled, one line says so).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import lmdeploy_regex_lora_boot as boot

_TRUTHY = frozenset({"1", "true", "yes", "on"})
_warned: set[str] = set()
_busy: set[str] = set()


def env_disabled() -> bool:
    """True when ``LMDEPLOY_REGEX_LORA_DISABLE`` asks the plugin to stand aside."""
    return os.environ.get(boot.ENV_DISABLE, "").strip().lower() in _TRUTHY


def warn_once(key: str, message: str, *, exc_info: bool = False) -> None:
    """Log a warning at most once per process per ``key``; logging failures are swallowed."""
    if key in _warned:
        return
    _warned.add(key)
    try:
        logging.getLogger(boot.LOGGER_NAME).warning(message, exc_info=exc_info)
    except Exception:  # a broken logging setup must not break LMDeploy
        pass


def installed() -> bool:
    """Whether the boot module is in ``sys.meta_path``."""
    return boot in sys.meta_path


def register() -> None:
    """Put the boot module first in ``sys.meta_path`` (idempotent)."""
    boot.boot()


def unregister() -> None:
    """Remove the boot module from ``sys.meta_path``."""
    while boot in sys.meta_path:
        sys.meta_path.remove(boot)


class _LoaderProxy:
    """Runs the real loader, then our callback; hands the real loader back to the module.

    Only ``exec_module`` is intercepted; anything else (``get_source``, resource readers, ...) is
    forwarded, and ``__loader__``/``__spec__.loader`` are reset so nothing downstream sees the proxy.
    """

    def __init__(self, loader: Any, callback: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._callback = callback

    def __getattr__(self, name: str) -> Any:
        if name in ("_loader", "_callback"):  # half-built proxy (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> ModuleType | None:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        loader = self._loader
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = loader
        loader.exec_module(module)
        self._callback(module)


def find_target_spec(fullname: str, path: Any = None, target: Any = None) -> Any:
    """The spec the other finders give ``fullname``, its loader wrapped so :func:`_on_loaded` runs after it."""
    if fullname in _busy:
        return None
    _busy.add(fullname)
    try:
        spec = None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is boot or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _LoaderProxy(spec.loader, _on_loaded)
        return spec
    except Exception:  # fall back to the normal import path
        warn_once("finder", "lmdeploy-regex-lora: import hook failed; standing aside", exc_info=True)
        return None
    finally:
        _busy.discard(fullname)


def _on_loaded(module: ModuleType) -> None:
    """Called once a target module has fully executed."""
    try:
        if env_disabled():
            warn_once("stand-aside", f"lmdeploy-regex-lora is disabled by {boot.ENV_DISABLE}; "
                                     "LMDeploy's own add_adapters stays in place")
            return
        from . import hook

        hook.on_module_loaded(module)
    except Exception:  # the plugin must never break LMDeploy's import
        warn_once("callback", "lmdeploy-regex-lora: could not wrap add_adapters; LMDeploy runs unchanged",
                  exc_info=True)
