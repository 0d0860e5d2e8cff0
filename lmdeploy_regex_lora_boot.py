"""Start-up side of the plugin: the ``.pth`` line imports this module and calls :func:`boot`.

LMDeploy builds the model in whatever process its executor picks (the caller, a ``spawn`` child, a
Ray actor), and a monkeypatch made in the parent never reaches the others. A ``.pth`` line runs in all
of them, so :func:`boot` puts this very module first in ``sys.meta_path``: its :func:`find_spec`
answers every import in the process, and for the modules named in :data:`PATCH_POINTS` hands over to
:mod:`lmdeploy_regex_lora.serve.import_hook`, which lets the module execute and then wraps its patch
points (:mod:`lmdeploy_regex_lora.serve.hook`).

This runs at *every* interpreter start, LMDeploy or not, and each start pays for every module and
every object made here: so the finder is the module itself (no class to create), the module imports
only ``sys`` (already loaded), has no ``__future__`` import and no ``typing``, and :func:`boot` never
raises. Importing it does nothing else; ``boot()`` is called by the ``.pth`` line.
"""

import sys

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
TARGET_MODULES = frozenset(point[0] for point in PATCH_POINTS)


def find_spec(fullname, path=None, target=None):
    """``sys.meta_path`` protocol: nothing for any module but LMDeploy's patch points."""
    if fullname not in TARGET_MODULES:
        return None
    try:
        from lmdeploy_regex_lora.serve.import_hook import find_target_spec
    except Exception:  # a broken install must not break LMDeploy's import
        return None
    return find_target_spec(fullname, path, target)


def boot():
    """Entry point of the ``.pth`` line: this module first in ``sys.meta_path`` (once); never raises."""
    try:
        module = sys.modules[__name__]
        if module not in sys.meta_path:
            sys.meta_path.insert(0, module)
    except Exception:  # interpreter start-up must survive anything
        pass
