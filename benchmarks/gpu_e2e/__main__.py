"""``python -m benchmarks.gpu_e2e [options]``: see the package docstring and ``--help``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
