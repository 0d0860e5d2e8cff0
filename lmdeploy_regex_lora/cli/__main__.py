"""``python -m lmdeploy_regex_lora.cli``."""

from .main import main

raise SystemExit(main())
