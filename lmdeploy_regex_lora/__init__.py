"""Serve PEFT LoRA adapters (regex ``target_modules`` included) through LMDeploy's PyTorch engine.

This module is imported by the ``.pth`` bootstrap at every interpreter start, so it must stay
cheap: nothing here imports torch or lmdeploy. The heavy parts load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "install", "uninstall", "is_installed"]


def install() -> bool:
    """Wrap LMDeploy's ``add_adapters`` (now, or when LMDeploy is imported). Idempotent.

    Returns True when the plugin is (or will be) active, False when it stands aside
    (disabled by ``LMDEPLOY_REGEX_LORA_DISABLE`` or an unsupported LMDeploy version).
    """
    from . import hook

    return hook.install()


def uninstall() -> None:
    """Restore LMDeploy's original functions and drop the import hook. Idempotent."""
    from . import hook

    hook.uninstall()


def is_installed() -> bool:
    """True when the wrappers are in place on every imported LMDeploy module that needs them."""
    from . import hook

    return hook.is_installed()
