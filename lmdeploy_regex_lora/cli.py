"""Command line entry (``lmdeploy-regex-lora`` / ``python -m lmdeploy_regex_lora.cli``).

Subcommands import their implementation lazily so ``--version`` and ``--help`` stay instant
(no torch, no lmdeploy).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    """Top-level parser; subcommands parse their own arguments."""
    parser = argparse.ArgumentParser(prog="lmdeploy-regex-lora", description="Regex-target PEFT LoRA for LMDeploy.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    # add_help=False: ``demo --help`` belongs to the demo's own parser.
    sub.add_parser("demo", add_help=False, help="run the end-to-end demo; all further arguments go to it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Everything after the subcommand goes to it verbatim (argparse.REMAINDER chokes on options).
    split = 1 if argv[:1] == ["demo"] else len(argv)
    args, rest = parser.parse_args(argv[:split]), argv[split:]
    if args.command == "demo":
        from . import demo

        result = demo.main(rest)
        return int(result or 0)
    parser.error(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    raise SystemExit(main())
