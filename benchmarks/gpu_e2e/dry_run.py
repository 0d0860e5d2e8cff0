"""``--dry-run``: every step short of CUDA, on CPU.

The tokenizer through LMDeploy's own ``Tokenizer``; LMDeploy's CPU model build with the plugin, every LoRA slot
against the merged checkpoints; the plan of engines and the server command line, printed.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .models import LM_HEAD, ModelSet
from .report import Report
from .server import server_command
from .tokenizer import EOS, token_string


def check_tokenizer(ms: ModelSet) -> dict[str, Any]:
    """What LMDeploy needs of the tokenizer here, through its own ``Tokenizer``: it loads, knows EOS, decodes,
    and maps every id to the token string the server's log-probabilities name (``convert_ids_to_tokens``).

    Prompts go in as token ids, so the class transformers picks for the folder (for ``model_type: qwen2``
    transformers 5 builds its ``Qwen2Tokenizer`` around the vocabulary) does not change what is served.
    """
    from lmdeploy.tokenizer import Tokenizer

    tok = Tokenizer(str(ms.base))
    hf = tok.model.model
    vocab = json.loads((ms.base / "config.json").read_text())["vocab_size"]
    names = hf.convert_ids_to_tokens(list(range(vocab)))
    wrong = [(i, t) for i, t in enumerate(names) if t != token_string(i)]
    if wrong:
        raise AssertionError(f"{ms.arch}: ids map to other token strings: {wrong[:5]}")
    if tok.eos_token_id != EOS:
        raise AssertionError(f"{ms.arch}: eos_token_id {tok.eos_token_id}, expected {EOS}")
    text = tok.decode([5, 17, 300 % vocab])
    return {"class": type(hf).__name__, "eos": tok.eos_token_id, "vocab": vocab, "decode_sample": text}


def check_plugin_cpu(ms: ModelSet) -> dict[str, Any]:
    """Build LMDeploy's model on CPU, add both adapters through the plugin, compare every slot with the merges."""
    import torch

    import lmdeploy_regex_lora
    from lmdeploy_regex_lora.testing.build import build_lmdeploy_model
    from lmdeploy_regex_lora.testing.compare import compare, load_models

    if not lmdeploy_regex_lora.install():
        raise RuntimeError("the plugin stood aside (see its log)")
    from lmdeploy.pytorch.models import patch

    names = sorted(ms.adapters)  # LMDeploy numbers adapters in sorted-name order, from 1
    base, merged = load_models(ms.base, {i + 1: ms.merged[n] for i, n in enumerate(names)})
    served = build_lmdeploy_model(ms.base)
    patch.add_adapters(served, {n: str(ms.adapters[n]) for n in names}, dtype=torch.float32,
                       device=torch.device("cpu"))
    stats = compare(served, base, merged)
    blocks = sorted({int(lora.adapter_info.max_rank) for m in served.modules() if hasattr(m, "lora_adapters")
                     for lora in m.lora_adapters.values()})
    head = [n for n, m in served.named_modules() if n.endswith(LM_HEAD[ms.arch]) and len(getattr(
        m, "lora_adapters", {}))]
    return {"targeted": stats["targeted"], "untargeted": stats["untargeted"], "slots": stats["slots"],
            "max_err": stats["max_err"], "kernel_blocks": blocks, "lm_head_slots": head}


def dry_run(sets: dict[str, ModelSet], prompts: list[list[int]], args: argparse.Namespace,
            report: Report) -> None:
    for arch, ms in sets.items():
        print(f"[{arch}] tokenizer: {check_tokenizer(ms)}")
        stats = check_plugin_cpu(ms)
        print(f"[{arch}] plugin on CPU, every LoRA slot against the merged checkpoints: {stats}")
        report.phase(f"dry_run:{arch}", stats)
        print(f"[{arch}] engines: plugin ({', '.join(ms.adapters)} + base, mixed batch), "
              + ", ".join(f"merged:{n}" for n in ms.merged) + ", base")
        print(f"[{arch}] server: {' '.join(server_command(ms, 23333, args))}")
    import lmdeploy.serve.openai.api_server  # noqa: F401  (the server's imports resolve here)
    from lmdeploy import pipeline  # noqa: F401

    print("dry run: every step short of CUDA done; LMDeploy's pipeline and api_server modules import")
