"""Patching LMDeploy, reversibly, in the manner of OpenTelemetry's instrumentors.

One table, :data:`lmdeploy_regex_lora_boot.PATCH_POINTS` (module, owner, attribute, handler), lists
every place the plugin changes LMDeploy. :func:`install`, :func:`uninstall` and :func:`is_installed`
iterate it with one wrap and one unwrap routine: each attribute becomes a ``wrapt`` proxy (marked as
ours, ``__wrapped__`` being LMDeploy's function, ``staticmethod`` kept) whose handler has the
``(wrapped, instance, args, kwargs)`` form, and :func:`uninstall` puts the identical objects back.
A proxy someone kept after :func:`uninstall` behaves as LMDeploy's function.

:data:`SUPPORTED` is the one LMDeploy version range (setup.cfg's ``install_requires`` repeats it; a
test keeps the two equal). Outside it, or when ``LMDEPLOY_REGEX_LORA_DISABLE`` is set,
:func:`stand_aside_reason` says why and the plugin touches nothing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

import wrapt
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

import lmdeploy_regex_lora_boot as boot

from . import import_hook

__all__ = ["SUPPORTED", "install", "uninstall", "is_installed", "is_wrapper", "lmdeploy_version",
           "stand_aside_reason", "PatchPoint", "patch_points"]

SUPPORTED = SpecifierSet(">=0.12.1,<0.19")
"""LMDeploy releases that pass tests/test_versions.py (scripts/version_matrix.py runs it on every release):
0.12.1 to 0.18.0. 0.12.0 and older cannot build Qwen2/Llama models with transformers 5 themselves, so
the plugin's checks cannot pass there; they stand aside (one warning), as any later, unchecked release."""

MARKER = "_lmdeploy_regex_lora_wrapper"
_STAND_ASIDE = "stand-aside"  # one warning budget shared with import_hook's "disabled" notice

logger = logging.getLogger(boot.LOGGER_NAME)
_lock = threading.RLock()


class PatchPoint(NamedTuple):
    """One row of the table: ``module.owner.attribute`` is wrapped by ``handler`` ("module:function")."""

    module: str
    owner: str
    attribute: str
    handler: str


def patch_points() -> tuple[PatchPoint, ...]:
    return tuple(PatchPoint(*row) for row in boot.PATCH_POINTS)


#: Patch point -> the attribute as LMDeploy defined it (``staticmethod`` kept), for every point wrapped now.
_originals: dict[PatchPoint, Any] = {}
#: One proxy per (original function, handler), so a function bound under two names gets one proxy.
_proxies: dict[tuple[Callable[..., Any], str], PluginWrapper] = {}


class PluginWrapper(wrapt.FunctionWrapper):
    """Type of every proxy the plugin installs; the class attribute is the marker :func:`is_wrapper` reads."""

    _lmdeploy_regex_lora_wrapper = True


def is_wrapper(obj: object) -> bool:
    """True for our proxy only; looks at the real type, since proxies forward ``getattr``."""
    return getattr(type(obj), MARKER, False) is True


def lmdeploy_version() -> str | None:
    """Installed LMDeploy version, read from its metadata so that lmdeploy is not imported."""
    try:
        return importlib.metadata.version("lmdeploy")
    except importlib.metadata.PackageNotFoundError:
        module = sys.modules.get("lmdeploy")  # e.g. a source checkout on sys.path
        version = getattr(module, "__version__", None)
        return version if isinstance(version, str) else None


def in_supported_range(version: str | None) -> bool:
    try:
        return version is not None and SUPPORTED.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def stand_aside_reason() -> str | None:
    """Why the plugin must not touch LMDeploy in this process, or None when it may."""
    if import_hook.env_disabled():
        return f"lmdeploy-regex-lora is disabled by {boot.ENV_DISABLE}; LMDeploy's own add_adapters stays in place"
    version = lmdeploy_version()
    if in_supported_range(version):
        return None
    return (f"lmdeploy-regex-lora supports lmdeploy{SUPPORTED} but found lmdeploy {version or '(not installed)'}; "
            "standing aside, LMDeploy's own add_adapters stays in place")


# -- one wrap and one unwrap routine -------------------------------------------------------------------

def _owner(point: PatchPoint, module: ModuleType | None) -> Any:
    if module is None:
        return None
    return getattr(module, point.owner, None) if point.owner else module


def _raw(owner: Any, attribute: str) -> Any:
    """``owner``'s own ``attribute`` as stored (a class hands out bound functions through getattr)."""
    try:
        return vars(owner).get(attribute)
    except TypeError:
        return None


def _function(raw: Any) -> Any:
    return raw.__func__ if isinstance(raw, staticmethod) else raw


def _handler(point: PatchPoint) -> Callable[..., Any]:
    module_name, _, name = point.handler.partition(":")
    return getattr(importlib.import_module(f"lmdeploy_regex_lora.{module_name}"), name)


def _gated(point: PatchPoint, handler: Callable[..., Any]) -> Callable[..., Any]:
    def call(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        if point not in _originals:  # uninstalled; someone kept a reference to the proxy
            return wrapped(*args, **kwargs)
        return handler(wrapped, instance, args, kwargs)

    return call


def _wrap(point: PatchPoint, module: ModuleType) -> None:
    """Wrap one point of an imported module, unless it is absent or already ours."""
    owner = _owner(point, module)
    raw = _raw(owner, point.attribute) if owner is not None else None
    func = _function(raw)
    if func is None or not callable(func):
        return
    if is_wrapper(func):  # e.g. the agent bound patch's proxy by name: record what it stands for
        original = func.__wrapped__
        _originals[point] = staticmethod(original) if isinstance(raw, staticmethod) else original
        return
    handler = _handler(point)
    refusal = getattr(handler, "refuses", None)
    reason = refusal(func) if refusal is not None else None
    if reason:
        import_hook.warn_once("signature", f"lmdeploy-regex-lora: {reason}; leaving it unwrapped")
        return
    proxy = _proxies.get((func, point.handler))
    if proxy is None:
        proxy = _proxies[(func, point.handler)] = PluginWrapper(func, _gated(point, handler))
    _originals[point] = raw
    setattr(owner, point.attribute, staticmethod(proxy) if isinstance(raw, staticmethod) else proxy)
    logger.debug("wrapped %s.%s", point.module, ".".join(filter(None, (point.owner, point.attribute))))


def _unwrap(point: PatchPoint) -> None:
    """Put back the original of one point, if our proxy still sits there."""
    owner = _owner(point, sys.modules.get(point.module))
    raw = _raw(owner, point.attribute) if owner is not None else None
    func = _function(raw)
    if not is_wrapper(func):
        return  # absent, untouched, or re-wrapped by someone else: leave it alone
    original = _originals.get(point)
    if original is None:
        original = staticmethod(func.__wrapped__) if isinstance(raw, staticmethod) else func.__wrapped__
    setattr(owner, point.attribute, original)


# -- the instrumentor's API ----------------------------------------------------------------------------

def install() -> bool:
    """Wrap every imported target module and hook the rest; idempotent.

    Returns False (after one warning per process) when disabled or LMDeploy is out of range.
    """
    with _lock:
        reason = stand_aside_reason()
        if reason is not None:
            import_hook.warn_once(_STAND_ASIDE, reason)
            uninstall()
            return False
        import_hook.register()
        for point in patch_points():
            module = sys.modules.get(point.module)
            if module is not None:
                _wrap(point, module)
        return True


def uninstall() -> None:
    """Remove the import hook and put LMDeploy's original objects back; idempotent.

    Plain ``nn.Linear`` layers the loader wrapped for image-row LoRA get their original objects back too.
    """
    with _lock:
        import_hook.unregister()
        for point in patch_points():
            _unwrap(point)
        _originals.clear()
        _proxies.clear()
        vision = sys.modules.get("lmdeploy_regex_lora.serve.vision")  # not imported: nothing was wrapped
        if vision is not None:
            vision.unwrap_all()


def is_installed() -> bool:
    """True when the hook is active and every imported patch point holds our proxy."""
    with _lock:
        if not import_hook.installed() or stand_aside_reason() is not None:
            return False
        for point in patch_points():
            owner = _owner(point, sys.modules.get(point.module))
            func = _function(_raw(owner, point.attribute)) if owner is not None else None
            if func is not None and not is_wrapper(func):
                return False
        return True


def wrap_module(module: ModuleType) -> None:
    """Wrap every patch point of ``module`` (already imported)."""
    with _lock:
        for point in patch_points():
            if point.module == module.__name__:
                _wrap(point, module)


def on_module_loaded(module: ModuleType) -> None:
    """Post-import callback of the boot module's finder: activate (once) and wrap ``module``."""
    with _lock:
        if install():
            wrap_module(module)


# -- the add_adapters handler --------------------------------------------------------------------------

_EXPECTED_PARAMS = ("model", "adapters", "dtype", "device")


def load_adapters(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
    """``add_adapters(model, adapters, dtype, device)``: our loader instead of LMDeploy's."""
    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    bound.apply_defaults()  # LMDeploy's own defaults (dtype=torch.float16) still apply
    try:
        from .loader import add_adapters
    except Exception:  # our loader is broken: LMDeploy's path is better than no model
        import_hook.warn_once("loader-import", "lmdeploy-regex-lora: loader failed to import; using LMDeploy's "
                              "add_adapters", exc_info=True)
        return wrapped(*args, **kwargs)
    import torch  # already loaded by LMDeploy; local so that importing this module stays light

    # LMDeploy's function is decorated with @torch.inference_mode(): keep the same context.
    # Its caller (BaseModelAgent._build_model) ignores the return value; pass ours through.
    with torch.inference_mode():
        return add_adapters(bound.arguments["model"], bound.arguments["adapters"], dtype=bound.arguments["dtype"],
                            device=bound.arguments["device"])


def _refuses_add_adapters(func: Callable[..., Any]) -> str | None:
    params = tuple(inspect.signature(func).parameters)
    if params == _EXPECTED_PARAMS:
        return None
    expected = ", ".join(_EXPECTED_PARAMS)
    return f"{func.__module__}.add_adapters{inspect.signature(func)} is not the expected ({expected})"


load_adapters.refuses = _refuses_add_adapters  # type: ignore[attr-defined]
