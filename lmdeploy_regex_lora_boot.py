"""Start-up side of the plugin: the ``.pth`` line calls :func:`boot` in every interpreter.

LMDeploy builds the model in whatever process its executor picks (the caller, a ``spawn`` child, a
Ray actor), and a monkeypatch made in the parent never reaches the others. A ``.pth`` line runs in all
of them, so :func:`boot` registers a tiny ``sys.meta_path`` finder; once a module named in
:data:`PATCH_POINTS` has executed, :mod:`lmdeploy_regex_lora.serve.hook` wraps its patch points.

Importing this module does nothing else (the ``.pth`` line calls :func:`boot` itself). It runs at
*every* interpreter start, LMDeploy or not, so it is a top-level module (no package ``__init__``),
imports nothing beyond ``sys`` and ``os`` (already loaded by ``site``), has no ``__future__`` import
(annotations naming types imported only for checkers are strings) and must never raise.
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

#: Every place the plugin patches LMDeploy: (module, owner class or "" for the module, attribute,
#: handler as "module:function" in this package). Plain data, so that the finder knows which imports to
#: watch without importing anything; :mod:`lmdeploy_regex_lora.serve.hook` applies and undoes the table.
PATCH_POINTS: "tuple[tuple[str, str, str, str], ...]" = (
    # LMDeploy's adapter loader: ``patch`` defines it; the model agent binds it by name at import time
    # (the ``agent`` package module since 0.12, the flat ``model_agent`` module before).
    ("lmdeploy.pytorch.models.patch", "", "add_adapters", "serve.hook:load_adapters"),
    ("lmdeploy.pytorch.engine.model_agent.agent", "", "add_adapters", "serve.hook:load_adapters"),
    ("lmdeploy.pytorch.engine.model_agent", "", "add_adapters", "serve.hook:load_adapters"),
    # Each step's inputs, recorded for LoRA slots whose rows are not the step's token rows (LM head).
    ("lmdeploy.pytorch.model_inputs", "StepContextManager", "build_context", "serve.steps:record_step"),
    # CLI commands that pick the engine themselves (TurboMind ignores ``--adapters``).
    ("lmdeploy.cli.serve", "SubCliServe", "api_server", "serve.cli_guard:serve_api_server"),
    ("lmdeploy.cli.chat", "", "main", "serve.cli_guard:chat_main"),
    # LMDeploy's pre-flight check of each adapter (``PeftConfig``, which exits the process on failure).
    ("lmdeploy.pytorch.check_env.adapter", "AdapterChecker", "check", "serve.cli_guard:adapter_check"),
)
TARGET_MODULES: "frozenset[str]" = frozenset(point[0] for point in PATCH_POINTS)

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
            from lmdeploy_regex_lora.serve import hook

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
