"""Run LMDeploy's own CLI parsing and commands up to the engine start; report the engine each one picks.

Usage: python tests/scripts/backend_choice.py MODEL_DIR ADAPTER_DIR  (run by tests/test_backend_choice.py in a venv
where our wheel is installed, so the plugin is active through its ``.pth`` alone).

Two parts cannot run on a CPU machine and are replaced, here only:
* TurboMind's extension (``lmdeploy.turbomind._turbomind``) needs ``libcuda.so.1``; without it
  ``turbomind.is_available()`` is False and ``autoget_backend`` always answers "pytorch". The
  scenarios marked ``turbomind_built`` set ``lmdeploy.turbomind._tm`` to a placeholder, so LMDeploy's
  real ``autoget_backend`` runs its real ``is_supported(model)`` check and answers "turbomind".
* Starting an engine: ``lmdeploy.serve.openai.api_server.serve`` (what ``serve api_server`` calls) and
  ``lmdeploy.cli.chat.build_pipe`` (what ``chat`` calls) are replaced by recorders of their arguments.
Everything in between (argparse, ``SubCliServe.api_server``, ``cli.chat.main``, ``autoget_backend``,
``PytorchEngineConfig`` / ``TurbomindEngineConfig`` construction) is LMDeploy's.
Prints one ``RESULT {json}`` line per scenario.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys


class Stop(Exception):
    """Raised by the recorders: the engine would start here."""


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


def config_summary(config) -> dict:
    fields = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    return {"type": type(config).__name__, "has_adapters_field": "adapters" in fields,
            "adapters": getattr(config, "adapters", None)}


def main() -> int:
    model, adapter = sys.argv[1], sys.argv[2]
    preloaded = sorted(m for m in sys.modules if m.startswith("lmdeploy_regex_lora"))

    import lmdeploy.cli.chat as cli_chat
    import lmdeploy.turbomind as turbomind
    from lmdeploy.archs import autoget_backend_config
    from lmdeploy.cli.cli import CLI
    from lmdeploy.cli.serve import SubCliServe
    from lmdeploy.messages import PytorchEngineConfig, TurbomindEngineConfig
    from lmdeploy.serve.openai import api_server

    import lmdeploy_regex_lora
    from lmdeploy_regex_lora.serve import hook

    real_tm = turbomind._tm
    seen: dict = {}

    def record_serve(model_path, *args, backend="turbomind", backend_config=None, **kwargs):
        seen.update(backend=backend, config=config_summary(backend_config))
        raise Stop

    def record_build_pipe(model_path, backend, trust_remote_code=False, **kwargs):
        seen.update(backend=backend, adapters_kwarg=kwargs.get("adapters"))
        raise Stop

    api_server.serve = record_serve
    cli_chat.build_pipe = record_build_pipe
    serve_wrapped = hook.is_wrapper(SubCliServe.api_server)
    chat_wrapped = hook.is_wrapper(cli_chat.main)
    original_serve = SubCliServe.__dict__["api_server"]
    original_chat = cli_chat.main

    # Built the way lmdeploy.cli.entrypoint.run builds them (after our import hook wrapped the commands).
    CLI.add_parsers()
    SubCliServe.add_parsers()
    parser = CLI.parser

    handler = Records()
    logging.getLogger("lmdeploy").addHandler(handler)  # ours ("lmdeploy.regex_lora") propagates to it

    def run(label: str, argv: list[str], turbomind_built: bool) -> None:
        turbomind._tm = object() if turbomind_built else real_tm
        seen.clear()
        handler.lines.clear()
        args = parser.parse_args(argv)
        try:
            args.run(args)
        except Stop:
            pass
        print("RESULT " + json.dumps({"label": label, "argv": argv, "turbomind_built": turbomind_built,
                                      "logs": list(handler.lines), **seen}), flush=True)

    serve = ["serve", "api_server", model, "--max-batch-size", "8"]  # else it asks the GPU for a size
    chat = ["chat", model]
    with_adapters = ["--adapters", f"mine={adapter}"]
    print("STATE " + json.dumps({"preloaded": preloaded, "serve_wrapped": serve_wrapped,
                                 "chat_wrapped": chat_wrapped, "installed": lmdeploy_regex_lora.is_installed()}))
    for cmd_name, cmd in (("serve", serve), ("chat", chat)):
        run(f"{cmd_name}/adapters/auto/tm", cmd + with_adapters, True)
        run(f"{cmd_name}/adapters/explicit-turbomind/tm", cmd + with_adapters + ["--backend", "turbomind"], True)
        run(f"{cmd_name}/none/auto/tm", cmd, True)
        run(f"{cmd_name}/adapters/pytorch/tm", cmd + with_adapters + ["--backend", "pytorch"], True)
        run(f"{cmd_name}/adapters/auto/no-tm", cmd + with_adapters, False)

    # pipeline(): adapters only exist on PytorchEngineConfig, and LMDeploy maps that to PyTorch itself.
    turbomind._tm = object()
    pipe = {
        "pytorch_config": autoget_backend_config(model, PytorchEngineConfig(adapters={"mine": adapter}))[0],
        "no_config": autoget_backend_config(model, None)[0],
        "turbomind_config_fields": config_summary(TurbomindEngineConfig()),
    }
    print("PIPELINE " + json.dumps(pipe), flush=True)

    # uninstall(): LMDeploy's own objects are back, and the parser that holds our wrapper acts as LMDeploy.
    lmdeploy_regex_lora.uninstall()
    now_serve = SubCliServe.__dict__["api_server"]
    restored = {
        # the class holds a staticmethod of LMDeploy's very function again; the module its very ``main``
        "serve": isinstance(now_serve, staticmethod) and now_serve.__func__ is original_serve.__func__.__wrapped__,
        "chat": cli_chat.main is original_chat.__wrapped__,
        "serve_unwrapped": not hook.is_wrapper(SubCliServe.api_server),
        "chat_unwrapped": not hook.is_wrapper(cli_chat.main),
    }
    print("RESTORED " + json.dumps(restored), flush=True)
    run("serve/adapters/auto/tm/after-uninstall", serve + with_adapters, True)
    run("chat/adapters/auto/tm/after-uninstall", chat + with_adapters, True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
