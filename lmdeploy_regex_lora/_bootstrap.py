"""The start-up module under its package name, for the package's own imports (``from . import _bootstrap``).

The ``.pth`` imports the top-level :mod:`lmdeploy_regex_lora_boot` (no package ``__init__`` at every
interpreter start). This name is the same module object, not a copy: the finder it registered, its
log-once budget and its target list stay one.
"""

import sys

import lmdeploy_regex_lora_boot

sys.modules[__name__] = lmdeploy_regex_lora_boot
