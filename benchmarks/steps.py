"""The steps the time-to-servable and merge benchmarks run, each in a fresh interpreter.

    python -m benchmarks.steps peft-merge BASE ADAPTER OUT    # PEFT merge_and_unload + save_pretrained
    python -m benchmarks.steps build BASE [NAME=ADAPTER ...]  # LMDeploy's CPU build (+ adapters via the plugin)

Each prints one ``STEP {json}`` line with its phase times, so a benchmark can show where time goes.
"""

from __future__ import annotations

import json
import sys
import time


def peft_merge(base: str, adapter: str, out: str) -> dict:
    """What users run today before serving with LMDeploy: PEFT's merge on the transformers model."""
    t0 = time.perf_counter()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t1 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
    model = PeftModel.from_pretrained(model, adapter)
    t2 = time.perf_counter()
    merged = model.merge_and_unload()
    t3 = time.perf_counter()
    merged.save_pretrained(out)
    t4 = time.perf_counter()
    return {"imports": t1 - t0, "load": t2 - t1, "merge": t3 - t2, "save": t4 - t3}


def build(base: str, adapters: dict[str, str]) -> dict:
    """Build the model as LMDeploy's engine does on CPU; with adapters, load them through the plugin."""
    t0 = time.perf_counter()
    import torch

    from lmdeploy_regex_lora.testing.build import build_lmdeploy_model

    t1 = time.perf_counter()
    model = build_lmdeploy_model(base, dtype="float16")
    t2 = time.perf_counter()
    times = {"imports": t1 - t0, "build": t2 - t1}
    if adapters:
        import logging

        from lmdeploy.pytorch.models import patch

        import lmdeploy_regex_lora

        logging.getLogger("lmdeploy.regex_lora").setLevel(logging.WARNING)
        assert lmdeploy_regex_lora.install()
        patch.add_adapters(model, adapters, dtype=torch.float16, device=torch.device("cpu"))
        times["add_adapters"] = time.perf_counter() - t2
    return times


def main(argv: list[str]) -> int:
    command, *rest = argv
    if command == "peft-merge":
        base, adapter, out = rest
        times = peft_merge(base, adapter, out)
    elif command == "build":
        base, *pairs = rest
        times = build(base, dict(p.split("=", 1) for p in pairs))
    else:
        raise SystemExit(f"unknown step {command!r}")
    print("STEP " + json.dumps({k: round(v, 3) for k, v in times.items()}))
    return 0


def step_times(output: str) -> dict:
    """The ``STEP`` line a step printed."""
    for line in output.splitlines():
        if line.startswith("STEP "):
            return json.loads(line[5:])
    return {}




if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
