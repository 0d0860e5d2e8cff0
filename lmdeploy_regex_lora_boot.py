"""Start-up side of the plugin, imported by ``lmdeploy_regex_lora.pth`` in every interpreter.

A top-level module, not part of the package: importing ``lmdeploy_regex_lora._bootstrap`` would
import the package ``__init__`` first, and every start pays for each module it loads. For the same
reason there is no ``from __future__ import annotations`` (the ``__future__`` module is one more
import): annotations naming types imported only for checkers are strings. The package reaches this
module as ``lmdeploy_regex_lora._bootstrap`` (an alias of this very module object).

LMDeploy builds the model in whatever process its executor picks (the caller, a ``spawn``
child, a Ray actor), and a monkeypatch made in the parent never reaches the others. A ``.pth``
line runs in all of them, so this module only registers a tiny ``sys.meta_path`` finder that
calls :mod:`lmdeploy_regex_lora.hook` once LMDeploy's ``add_adapters`` modules (and the CLI
modules that choose an engine) have executed.

It runs on *every* interpreter start, LMDeploy or not, so it imports nothing beyond ``sys``
and ``os`` (already loaded by ``site``) and must never raise.
"""

import os
import sys

TYPE_CHECKING = False  # ``typing`` costs milliseconds at every start-up; type checkers know this idiom
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType
    from typing import Any

ENV_DISABLE = "LMDEPLOY_REGEX_LORA_DISABLE"
LOGGER_NAME = "lmdeploy.regex_lora"

# Modules whose global ``add_adapters`` LMDeploy calls: ``patch`` defines it, the agent binds it
# by name (``agent`` package module since 0.12, the flat ``model_agent`` module before).
ADD_ADAPTERS_MODULES: "tuple[str, ...]" = (
    "lmdeploy.pytorch.models.patch",
    "lmdeploy.pytorch.engine.model_agent.agent",
    "lmdeploy.pytorch.engine.model_agent",
)
# CLI modules whose commands pick the engine on their own (TurboMind ignores ``--adapters``).
BACKEND_CHOICE_MODULES: "tuple[str, ...]" = (
    "lmdeploy.cli.serve",
    "lmdeploy.cli.chat",
)
# LMDeploy's pre-flight check of each adapter (``PeftConfig.from_pretrained``, which exits the process
# on failure): replaced by the plugin's own config validation while it is active.
ADAPTER_CHECK_MODULES: "tuple[str, ...]" = ("lmdeploy.pytorch.check_env.adapter",)
TARGET_MODULES: "tuple[str, ...]" = ADD_ADAPTERS_MODULES + BACKEND_CHOICE_MODULES + ADAPTER_CHECK_MODULES

_TRUTHY = frozenset({"1", "true", "yes", "on"})
_warned: "set[str]" = set()


def env_disabled() -> bool:
    """True when ``LMDEPLOY_REGEX_LORA_DISABLE`` asks the plugin to stand aside."""
    return os.environ.get(ENV_DISABLE, "").strip().lower() in _TRUTHY


def warn_once(key: str, message: str, *, exc_info: bool = False) -> None:
    """Log a warning at most once per process per ``key``; logging failures are swallowed.

    ``logging`` is imported here, not at start-up, because it is only needed on the rare path.
    """
    if key in _warned:
        return
    _warned.add(key)
    try:
        import logging

        logging.getLogger(LOGGER_NAME).warning(message, exc_info=exc_info)
    except Exception:  # a broken logging setup must not break LMDeploy
        pass


def has_warned(key: str) -> bool:
    """Whether :func:`warn_once` already fired for ``key`` (lets the hook share one budget)."""
    return key in _warned


class _LoaderProxy:
    """Runs the real loader, then our callback; hands the real loader back to the module.

    Only ``exec_module`` is intercepted; anything else (``get_source``, resource readers, ...)
    is forwarded, and ``__loader__``/``__spec__.loader`` are reset so nothing downstream ever
    sees the proxy.
    """

    def __init__(self, loader: "Any", callback: "Callable[[ModuleType], None]") -> None:
        self._loader = loader
        self._callback = callback

    def __getattr__(self, name: str) -> "Any":
        if name in ("_loader", "_callback"):  # half-built proxy (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self._loader, name)

    def create_module(self, spec: "Any") -> "ModuleType | None":
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: "ModuleType") -> None:
        loader = self._loader
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = loader
        loader.exec_module(module)
        self._callback(module)


class PostImportFinder:
    """``sys.meta_path`` finder that attaches :class:`_LoaderProxy` to the target modules.

    It never finds anything itself: it asks the other finders and decorates their spec, so
    editable installs, zip imports and other hooks keep working.
    """

    def __init__(self, disabled: bool) -> None:
        self.disabled = disabled
        self._busy: set[str] = set()

    def find_spec(self, fullname: str, path: "Any" = None, target: "Any" = None) -> "Any":
        if fullname not in TARGET_MODULES or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = None
            for finder in list(sys.meta_path):
                find = getattr(finder, "find_spec", None)
                if finder is self or find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
            if spec is None or not hasattr(spec.loader, "exec_module"):
                return spec
            spec.loader = _LoaderProxy(spec.loader, self._on_loaded)
            return spec
        except Exception:  # fall back to the normal import path
            warn_once("finder", "lmdeploy-regex-lora: import hook failed; standing aside", exc_info=True)
            return None
        finally:
            self._busy.discard(fullname)

    def _on_loaded(self, module: "ModuleType") -> None:
        """Called once a target module has fully executed."""
        try:
            if self.disabled:
                warn_once(
                    "stand-aside",
                    f"lmdeploy-regex-lora is disabled by {ENV_DISABLE}; "
                    "LMDeploy's own add_adapters stays in place",
                )
                return
            from lmdeploy_regex_lora import hook

            hook.on_module_loaded(module)
        except Exception:  # the plugin must never break LMDeploy's import
            warn_once(
                "callback",
                "lmdeploy-regex-lora: could not wrap add_adapters; LMDeploy runs unchanged",
                exc_info=True,
            )


def installed_finder() -> "PostImportFinder | None":
    """The finder currently in ``sys.meta_path``, if any (found by type name: survives reloads)."""
    for finder in sys.meta_path:
        if type(finder).__name__ == PostImportFinder.__name__ and getattr(
            type(finder), "__module__", None
        ) == __name__:
            return finder  # type: ignore[return-value]
    return None


def register(disabled: bool = False) -> "PostImportFinder":
    """Put the finder first in ``sys.meta_path`` (idempotent; updates the disabled flag)."""
    finder = installed_finder()
    if finder is None:
        finder = PostImportFinder(disabled)
        sys.meta_path.insert(0, finder)
    finder.disabled = disabled
    return finder


def unregister() -> None:
    """Remove every copy of the finder from ``sys.meta_path``."""
    while (finder := installed_finder()) is not None:
        sys.meta_path.remove(finder)


def boot() -> None:
    """Entry point of the ``.pth`` line: register the finder, never raise."""
    try:
        register(disabled=env_disabled())
    except Exception:  # interpreter start-up must survive anything
        pass


boot()
