"""Handlers for LMDeploy's command line: the engine choice and the adapter pre-flight check.

The commands that take ``--adapters`` (``lmdeploy serve api_server``, ``lmdeploy chat``) let
``autoget_backend`` pick the engine unless ``--backend pytorch`` is given, and TurboMind ignores
adapters without a word: the user would chat with the base model. ``autoget_backend`` is not told
about adapters, so the commands themselves are wrapped: when adapters are given and the automatic
choice is TurboMind, the PyTorch engine is used instead, with one warning line. ``pipeline()``
needs no guard: adapters only exist on ``PytorchEngineConfig``, which always selects PyTorch.

The handlers have ``wrapt``'s ``(wrapped, instance, args, kwargs)`` form; :mod:`.hook` applies them.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

import lmdeploy_regex_lora_boot as boot

logger = logging.getLogger(boot.LOGGER_NAME)

#: Start of the warning logged when ``--adapters`` turns LMDeploy's TurboMind choice into PyTorch.
BACKEND_SWITCH = "lmdeploy-regex-lora: --adapters given but LMDeploy's automatic backend choice is TurboMind"


def _auto_backend(model_path: str, trust_remote_code: bool) -> str:
    """LMDeploy's own automatic engine choice for ``model_path`` (its signature differs across releases)."""
    from lmdeploy.archs import autoget_backend

    if "trust_remote_code" in inspect.signature(autoget_backend).parameters:
        return autoget_backend(model_path, trust_remote_code=trust_remote_code)
    return autoget_backend(model_path)


def resolve_backend(adapters: Any, backend: Any, model_path: str, trust_remote_code: bool) -> Any:
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


def serve_api_server(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
    """``SubCliServe.api_server(args)``: fix ``args.backend`` before LMDeploy reads it."""
    cli_args = args[0] if args else kwargs.get("args")
    if cli_args is not None and hasattr(cli_args, "backend"):
        cli_args.backend = resolve_backend(getattr(cli_args, "adapters", None), cli_args.backend,
                                           cli_args.model_path, bool(getattr(cli_args, "trust_remote_code", False)))
    return wrapped(*args, **kwargs)


def chat_main(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
    """``lmdeploy.cli.chat.main(model_path, backend, ..., **kwargs)``: fix ``backend`` before it is used."""
    signature = inspect.signature(wrapped)
    bound = signature.bind(*args, **kwargs)
    params = bound.arguments
    extra = next((params[p.name] for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), {})
    trust = params.get("trust_remote_code", extra.get("trust_remote_code", False))
    if "backend" in params and "model_path" in params:
        params["backend"] = resolve_backend(extra.get("adapters"), params["backend"], params["model_path"],
                                            bool(trust))
    return wrapped(*bound.args, **bound.kwargs)


def adapter_check(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
    """``AdapterChecker.check``: validate the config as the plugin's loader will, not with ``PeftConfig``.

    LMDeploy's check loads each adapter's config with peft's ``PeftConfig`` in the engine's process and
    exits on failure, before ``add_adapters`` runs. That check both refuses configs the plugin serves
    (``PeftConfig`` of the pinned peft chokes on some newer fields) and lets through ones it must
    refuse; running the plugin's own validation here gives one set of rules and messages, and honours
    ``LMDEPLOY_REGEX_LORA_ON_ERROR=skip``.
    """
    if instance is None:  # a stale unbound reference
        return wrapped(*args, **kwargs)
    from ..errors import AdapterError
    from .config import read_adapter_config
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
