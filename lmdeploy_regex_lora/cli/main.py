"""Command line entry (``lmdeploy-regex-lora`` / ``python -m lmdeploy_regex_lora.cli``).

Subcommands import their implementation lazily so ``--version`` and ``--help`` stay instant
(no torch, no lmdeploy). Every subcommand exits 0 when all is well, 1 when its check failed
(a mismatch, a refused adapter, an inactive hook) and 2 when its input cannot be used (the
:class:`~lmdeploy_regex_lora.errors.AdapterError` message is printed, without a traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .. import __version__

# subcommand -> (module implementing it, one-line help). Each module has DESCRIPTION, add_arguments, run.
COMMANDS = {
    "inspect": ("inspect", "show what adapters will change, from their config and safetensors header only"),
    "verify": ("verify", "load adapters through the plugin and compare with merged checkpoints"),
    "merge": ("merge", "write the base model with one adapter merged in, shard by shard"),
    "doctor": ("doctor", "report versions and whether the plugin's hook is active in a fresh interpreter"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Top-level parser. Only ``command``'s module is imported (for its arguments and description)."""
    parser = argparse.ArgumentParser(prog="lmdeploy-regex-lora", description="Regex-target PEFT LoRA for LMDeploy.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # add_help=False: ``demo --help`` belongs to the demo's own parser.
    sub.add_parser("demo", add_help=False, help="run the end-to-end demo; all further arguments go to it")
    for name, (module_name, help_text) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(f".{module_name}", __package__)
        p = sub.add_parser(name, help=help_text, description=module.DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after ``demo`` goes to it verbatim (argparse.REMAINDER chokes on options).
    if argv[:1] == ["demo"]:
        build_parser().parse_args(argv[:1])
        from . import demo

        result = demo.main(argv[1:])
        return int(result or 0)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    module = importlib.import_module(f".{COMMANDS[args.command][0]}", __package__)
    from ..errors import AdapterError
    from . import common

    # Our tables and JSON own stdout; anything else that prints there (LMDeploy's logger) goes to stderr.
    real_stdout = sys.stdout
    common.set_output(real_stdout)
    sys.stdout = sys.stderr
    try:
        return int(module.run(args))
    except AdapterError as err:
        return common.report_error(err)
    finally:
        sys.stdout = real_stdout
        common.set_output(None)
