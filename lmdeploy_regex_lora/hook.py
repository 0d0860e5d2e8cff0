"""Swap LMDeploy's ``add_adapters`` for our loader, reversibly (OpenTelemetry-instrumentor style).

LMDeploy calls ``add_adapters`` through two module globals: ``lmdeploy.pytorch.models.patch``
defines it and the model agent binds it by name at import time, so both names are wrapped,
and both are put back on :func:`uninstall`. The wrappers are ``wrapt`` proxies whose
``__wrapped__`` is LMDeploy's function, so a wrapper that an agent module picked up from
``patch`` is recognised and never wrapped twice.

The CLI commands that take ``--adapters`` (``lmdeploy serve api_server``, ``lmdeploy chat``) let
``autoget_backend`` pick the engine unless ``--backend pytorch`` is given, and TurboMind ignores
adapters without a word: the user would chat with the base model. ``autoget_backend`` is not told
about adapters, so the commands themselves are wrapped: when adapters are given and the automatic
choice is TurboMind, the PyTorch engine is used instead, with one warning line. ``pipeline()``
needs no guard: adapters only exist on ``PytorchEngineConfig``, which always selects PyTorch.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import wrapt
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from . import _bootstrap

__all__ = ["SUPPORTED", "install", "uninstall", "is_installed", "is_wrapper", "lmdeploy_version",
           "BACKEND_SWITCH"]

SUPPORTED = SpecifierSet(">=0.12.1,<0.19")
"""LMDeploy releases that pass tests/test_versions.py (scripts/version_matrix.py runs it on every release):
0.12.1 to 0.18.0. 0.12.0 and older cannot build Qwen2/Llama models with transformers 5 themselves, so
the plugin's checks cannot pass there; they stand aside (one warning), as any later, unchecked release."""

MARKER = "_lmdeploy_regex_lora_wrapper"
_EXPECTED_PARAMS = ("model", "adapters", "dtype", "device")
_STAND_ASIDE = "stand-aside"  # one warning budget shared with the bootstrap's "disabled" notice

logger = logging.getLogger(_bootstrap.LOGGER_NAME)
_lock = threading.RLock()
_originals: dict[str, Callable[..., Any]] = {}  # module name -> LMDeploy's add_adapters
_wrappers: dict[Callable[..., Any], AddAdaptersWrapper] = {}  # one wrapper per original
# (module name, class name or "", attribute) -> the attribute as LMDeploy defined it (staticmethod kept)
_cli_originals: dict[tuple[str, str, str], Any] = {}

#: Start of the warning logged when ``--adapters`` turns LMDeploy's TurboMind choice into PyTorch.
BACKEND_SWITCH = "lmdeploy-regex-lora: --adapters given but LMDeploy's automatic backend choice is TurboMind"


class AddAdaptersWrapper(wrapt.FunctionWrapper):
    """Type of our wrappers; the class attribute is the marker checked by :func:`is_wrapper`."""

    _lmdeploy_regex_lora_wrapper = True


class BackendChoiceWrapper(wrapt.FunctionWrapper):
    """Wrapper of a CLI command that chooses the engine; marked like :class:`AddAdaptersWrapper`."""

    _lmdeploy_regex_lora_wrapper = True


def is_wrapper(obj: object) -> bool:
    """True for our wrapper only; looks at the real type, since proxies forward ``getattr``."""
    return getattr(type(obj), MARKER, False) is True


def lmdeploy_version() -> str | None:
    """Installed LMDeploy version, read from its metadata so that lmdeploy is not imported."""
    try:
        return importlib.metadata.version("lmdeploy")
    except importlib.metadata.PackageNotFoundError:
        module = sys.modules.get("lmdeploy")  # e.g. a source checkout on sys.path
        version = getattr(module, "__version__", None)
        return version if isinstance(version, str) else None


def _stand_aside_reason() -> str | None:
    """Why the plugin must not touch LMDeploy in this process, or None when it may."""
    if _bootstrap.env_disabled():
        return (
            f"lmdeploy-regex-lora is disabled by {_bootstrap.ENV_DISABLE}; "
            "LMDeploy's own add_adapters stays in place"
        )
    version = lmdeploy_version()
    try:
        supported = version is not None and SUPPORTED.contains(Version(version), prereleases=True)
    except InvalidVersion:
        supported = False
    if supported:
        return None
    return (
        f"lmdeploy-regex-lora supports lmdeploy{SUPPORTED} but found lmdeploy {version or '(not installed)'}; "
        "standing aside, LMDeploy's own add_adapters stays in place"
    )


def _make_wrapper(original: Callable[..., Any], signature: inspect.Signature) -> AddAdaptersWrapper:
    """Build the proxy that routes LMDeploy's call to :func:`lmdeploy_regex_lora.loader.add_adapters`."""

    def call_loader(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        # Bind against LMDeploy's own signature so its defaults (dtype=torch.float16) still apply.
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        try:
            from .loader import add_adapters
        except Exception:  # our loader is broken: LMDeploy's path is better than no model
            _bootstrap.warn_once(
                "loader-import",
                "lmdeploy-regex-lora: loader failed to import; using LMDeploy's add_adapters",
                exc_info=True,
            )
            return wrapped(*args, **kwargs)
        import torch  # already loaded by LMDeploy; local so that importing this module stays light

        # LMDeploy's function is decorated with @torch.inference_mode(): keep the same context.
        # Its caller (BaseModelAgent._build_model) ignores the return value; pass ours through.
        with torch.inference_mode():
            return add_adapters(
                bound.arguments["model"],
                bound.arguments["adapters"],
                dtype=bound.arguments["dtype"],
                device=bound.arguments["device"],
            )

    return AddAdaptersWrapper(original, call_loader)


def _wrap_module(module: ModuleType) -> None:
    """Wrap ``module.add_adapters`` unless it is absent or already ours (recording the original)."""
    current = getattr(module, "add_adapters", None)
    if current is None:
        return
    name = module.__name__
    if is_wrapper(current):  # e.g. the agent bound patch's wrapper by name
        _originals[name] = current.__wrapped__
        return
    if not callable(current):
        return
    signature = inspect.signature(current)
    if tuple(signature.parameters) != _EXPECTED_PARAMS:
        _bootstrap.warn_once(
            "signature",
            f"lmdeploy-regex-lora: {name}.add_adapters{signature} is not the expected "
            f"({', '.join(_EXPECTED_PARAMS)}); leaving it unwrapped",
        )
        return
    wrapper = _wrappers.get(current)
    if wrapper is None:
        wrapper = _wrappers[current] = _make_wrapper(current, signature)
    _originals[name] = current
    module.add_adapters = wrapper
    logger.debug("wrapped %s.add_adapters", name)


def _auto_backend(model_path: str, trust_remote_code: bool) -> str:
    """LMDeploy's own automatic engine choice for ``model_path`` (its signature differs across releases)."""
    from lmdeploy.archs import autoget_backend

    if "trust_remote_code" in inspect.signature(autoget_backend).parameters:
        return autoget_backend(model_path, trust_remote_code=trust_remote_code)
    return autoget_backend(model_path)


def _resolve_backend(adapters: Any, backend: Any, model_path: str, trust_remote_code: bool) -> Any:
    """The backend a command should use: PyTorch whenever adapters are given and the choice is automatic.

    LMDeploy treats every ``--backend`` other than ``pytorch`` (including its default ``turbomind``)
    as "choose for me"; with adapters that choice must not be TurboMind, which serves the base model.
    """
    if not adapters or backend == "pytorch":
        return backend
    if _auto_backend(model_path, trust_remote_code) == "turbomind":
        logger.warning(
            "%s, which ignores LoRA adapters and would serve the base model; using the PyTorch engine instead "
            "(pass --backend pytorch to choose it yourself; to serve with TurboMind, merge the adapter into the "
            "model first). Adapters: %s", BACKEND_SWITCH, " ".join(map(str, adapters)))
    # PyTorch was the automatic choice or is now: LMDeploy need not choose (and warn) a second time.
    return "pytorch"


_SERVE_KEY = ("lmdeploy.cli.serve", "SubCliServe", "api_server")
_CHAT_KEY = ("lmdeploy.cli.chat", "", "main")
_CHECK_KEY = ("lmdeploy.pytorch.check_env.adapter", "AdapterChecker", "check")


def _adapter_check(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
    """``AdapterChecker.check``: validate the config as the plugin's loader will, not with ``PeftConfig``.

    LMDeploy's check loads each adapter's config with peft's ``PeftConfig`` in the engine's process and
    exits on failure, before ``add_adapters`` runs. That check both refuses configs the plugin serves
    (``PeftConfig`` of the pinned peft chokes on some newer fields) and lets through ones it must
    refuse; running the plugin's own validation here gives one set of rules and messages, and honours
    ``LMDEPLOY_REGEX_LORA_ON_ERROR=skip``.
    """
    if _CHECK_KEY not in _cli_originals or instance is None:  # uninstalled; a stale reference
        return wrapped(*args, **kwargs)
    from .adapter_config import read_adapter_config
    from .errors import AdapterError
    from .loader import on_error_mode

    path = str(getattr(instance, "adapter_path", ""))
    name = os.path.basename(os.path.normpath(path)) or path
    try:
        read_adapter_config(name, path)
    except AdapterError as err:
        if on_error_mode() == "skip":
            logger.error("%s (the loader will leave this adapter out: LMDEPLOY_REGEX_LORA_ON_ERROR=skip)", err)
            return None
        instance.log_and_exit(err, "Adapter", message=err.fix or str(err))
    return None


def _serve_api_server(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
    """``SubCliServe.api_server(args)``: fix ``args.backend`` before LMDeploy reads it."""
    cli_args = args[0] if args else kwargs.get("args")
    # A parser built while we were installed keeps this wrapper after uninstall(): act as LMDeploy then.
    if _SERVE_KEY in _cli_originals and cli_args is not None and hasattr(cli_args, "backend"):
        cli_args.backend = _resolve_backend(getattr(cli_args, "adapters", None), cli_args.backend,
                                            cli_args.model_path, bool(getattr(cli_args, "trust_remote_code", False)))
    return wrapped(*args, **kwargs)


def _make_chat_main(signature: inspect.Signature) -> Callable[..., Any]:
    def chat_main(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        """``lmdeploy.cli.chat.main(model_path, backend, ..., **kwargs)``: fix ``backend`` before it is used."""
        if _CHAT_KEY not in _cli_originals:  # uninstalled; someone kept a reference to this wrapper
            return wrapped(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        params = bound.arguments
        extra = next((params[p.name] for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), {})
        trust = params.get("trust_remote_code", extra.get("trust_remote_code", False))
        if "backend" in params and "model_path" in params:
            params["backend"] = _resolve_backend(extra.get("adapters"), params["backend"], params["model_path"],
                                                 bool(trust))
        return wrapped(*bound.args, **bound.kwargs)

    return chat_main


def _wrap_backend_choice(module: ModuleType) -> None:
    """Wrap the CLI command of ``module`` that picks an engine (see the module docstring), or LMDeploy's
    adapter pre-flight check."""
    name = module.__name__
    if name == _SERVE_KEY[0]:
        (_, cls_name, attr), handler = _SERVE_KEY, _serve_api_server
    elif name == _CHAT_KEY[0]:
        (_, cls_name, attr), handler = _CHAT_KEY, None  # built from the function's signature below
    elif name == _CHECK_KEY[0]:
        (_, cls_name, attr), handler = _CHECK_KEY, _adapter_check
    else:
        return
    owner = _cli_owner(module, cls_name)
    if owner is None or attr not in vars(owner):
        return
    raw = vars(owner)[attr]
    func = raw.__func__ if isinstance(raw, staticmethod) else raw
    if is_wrapper(func) or not callable(func):
        return
    if handler is None:
        handler = _make_chat_main(inspect.signature(func))
    wrapper = BackendChoiceWrapper(func, handler)
    _cli_originals[(name, cls_name, attr)] = raw
    setattr(owner, attr, staticmethod(wrapper) if isinstance(raw, staticmethod) else wrapper)
    logger.debug("wrapped %s.%s", name, f"{cls_name}.{attr}" if cls_name else attr)


def _cli_owner(module: ModuleType, cls_name: str) -> Any:
    return getattr(module, cls_name, None) if cls_name else module


def _raw_attr(owner: Any, attr: str) -> Any:
    """``owner``'s own ``attr`` as stored (a class hands out bound wrappers through getattr)."""
    raw = vars(owner).get(attr) if hasattr(owner, "__dict__") else None
    return raw.__func__ if isinstance(raw, staticmethod) else raw


def install() -> bool:
    """Wrap every imported target module and hook the rest; idempotent.

    Returns False (after one warning per process) when disabled or LMDeploy is out of range.
    """
    with _lock:
        reason = _stand_aside_reason()
        if reason is not None:
            _bootstrap.warn_once(_STAND_ASIDE, reason)
            uninstall()
            return False
        _bootstrap.register(disabled=False)
        for name in _bootstrap.TARGET_MODULES:
            module = sys.modules.get(name)
            if module is not None:
                _wrap_module(module)
                _wrap_backend_choice(module)
        return True


def uninstall() -> None:
    """Remove the import hook and put LMDeploy's original function objects back; idempotent."""
    with _lock:
        _bootstrap.unregister()
        names = set(_originals) | set(_bootstrap.TARGET_MODULES)
        for name in names:
            module = sys.modules.get(name)
            current = getattr(module, "add_adapters", None) if module is not None else None
            if module is None or not is_wrapper(current):
                continue  # absent, untouched, or re-wrapped by someone else: leave it alone
            module.add_adapters = _originals.get(name, current.__wrapped__)
        for (name, cls_name, attr), raw in _cli_originals.items():
            module = sys.modules.get(name)
            owner = _cli_owner(module, cls_name) if module is not None else None
            if owner is not None and is_wrapper(_raw_attr(owner, attr)):
                setattr(owner, attr, raw)
        _originals.clear()
        _wrappers.clear()
        _cli_originals.clear()


def is_installed() -> bool:
    """True when the hook is active and every imported target module holds our wrapper."""
    with _lock:
        finder = _bootstrap.installed_finder()
        if finder is None or finder.disabled or _stand_aside_reason() is not None:
            return False
        for name in _bootstrap.TARGET_MODULES:
            module = sys.modules.get(name)
            current = getattr(module, "add_adapters", None) if module is not None else None
            if current is not None and not is_wrapper(current):
                return False
        for name, cls_name, attr in (_SERVE_KEY, _CHAT_KEY, _CHECK_KEY):
            module = sys.modules.get(name)
            owner = _cli_owner(module, cls_name) if module is not None else None
            if owner is not None and _raw_attr(owner, attr) is not None and not is_wrapper(_raw_attr(owner, attr)):
                return False
        return True


def on_module_loaded(module: ModuleType) -> None:
    """Post-import callback of the bootstrap finder: activate (once) and wrap ``module``."""
    with _lock:
        if install():
            _wrap_module(module)
            _wrap_backend_choice(module)
