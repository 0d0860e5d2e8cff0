"""Serve PEFT LoRA adapters (regex ``target_modules`` included) through LMDeploy's PyTorch engine.

The package, by role:

* :mod:`.serve`: what runs inside LMDeploy (the patch table, the loader, config and tensors in, a
  resolved plan, LoRA slots filled from it);
* :mod:`.merge`: the base checkpoint with an adapter folded in, streamed, without torch;
* :mod:`.cli`: the ``lmdeploy-regex-lora`` command (inspect, verify, merge, doctor, demo);
* :mod:`.testing`: tiny model folders, the one LMDeploy CPU build and the one served-vs-merged comparison;
* :mod:`.errors` and :mod:`.safetensors_io`: the one error type and the one reader of untrusted files.

Importing this module imports neither torch nor LMDeploy; the heavy parts load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "install", "uninstall", "is_installed"]


def install() -> bool:
    """Wrap LMDeploy's patch points (now, or when LMDeploy is imported). Idempotent.

    Returns True when the plugin is (or will be) active, False when it stands aside
    (disabled by ``LMDEPLOY_REGEX_LORA_DISABLE`` or an unsupported LMDeploy version).
    """
    from .serve import hook

    return hook.install()


def uninstall() -> None:
    """Restore LMDeploy's original functions and drop the import hook; plain ``nn.Linear`` layers that loaded
    models had wrapped for per-request vision LoRA get their original objects back. Idempotent."""
    from .serve import hook

    hook.uninstall()


def is_installed() -> bool:
    """True when the wrappers are in place on every imported LMDeploy module that needs them."""
    from .serve import hook

    return hook.is_installed()
