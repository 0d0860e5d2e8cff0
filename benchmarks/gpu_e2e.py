"""End to end on a GPU: what LMDeploy serves through ``--adapters`` with the plugin equals the merged checkpoints.

Everything else in this project is checked on CPU, below LMDeploy's engine. Users meet the engine: its
scheduler, CUDA graphs, paged attention, the spawned API server. This script runs that whole path on a
CUDA machine, in one call:

1. writes tiny random models (a Qwen2-shaped and an InternLM2-shaped LLM, 4 layers, hidden 256, vocab 512,
   each with a word-level ``tokenizer.json``), two ms-swift-style regex adapters per model (``attn-r24``:
   rank 24 on the attention linears; ``mlp-head-r8``: rank 8, rsLoRA, on the MLP linears *and the LM head*)
   and the merged checkpoint of each adapter (``W + scaling * B @ A`` in float64, saved in float32). No PEFT
   is needed for this; ``tests/test_gpu_e2e_prep.py`` checks on CPU that PEFT's own merge gives the same
   checkpoints and that PEFT loads the adapters;
2. runs LMDeploy's ``pipeline`` with ``PytorchEngineConfig(adapters=...)`` (the plugin active through its
   ``.pth``), and each merged checkpoint (and the base model) without adapters, on the same prompts: greedy
   generation with top-k log-probabilities in one batch that mixes both adapters and none, and teacher-forced
   log-probabilities of the prompt tokens (``logprob_start_len=0``);
3. starts ``lmdeploy serve api_server <base> --backend pytorch --adapters a=... b=...`` on 127.0.0.1 and sends
   OpenAI-style ``/v1/chat/completions`` requests (``input_ids``, ``logprobs``, ``top_logprobs``) naming each
   adapter and the base model, all at once; same comparison against the pipeline's merged / base results;
4. times generation throughput of each plugin-served adapter against its merged model (the LoRA overhead),
   prints a table and writes it, with every number, to ``$OUT/gpu_e2e.json`` when ``$OUT`` (or ``--out``) is set.

Tolerance (float16, the dtype served here). The served path computes ``x W + s (x A) B`` with float16 operands
and float32 accumulation; the merged model rounds ``W + s B A`` to float16 once. Each differs from exact
arithmetic by a few float16 units in the last place (u = 2**-11, about 4.9e-4, relative) per layer; through 4
layers and the LM head that is ~1e-2 on a log-probability of order 1 (on CPU, this script's Qwen2 model in
float16 against float32 differs by 0.016 at most). A log-probability passes when
``|served - merged| <= 0.05 + 0.005 * |merged|`` (``TOLERANCE``; eight times that for ``--dtype bfloat16``).
Greedy tokens must be identical; the only divergence accepted is a *near tie*: at the first differing step both
tokens are in the reference's top-k and their log-probabilities differ by at most twice the tolerance there, in
both runs. Each adapter must also move the log-probabilities far more than the error (``EFFECT_FACTOR``), so a
silently absent adapter cannot pass.

Without CUDA, ``--dry-run`` goes as far as the CPU allows: it writes everything, checks the tokenizer through
LMDeploy's own ``Tokenizer``, builds LMDeploy's models on CPU with the plugin and compares every served LoRA
slot with the merged checkpoints (``lmdeploy_regex_lora.testing.compare``), and prints the engine plan and the server
command line.

All pipelines run first, then the servers; no phase starts once ``--budget`` seconds (420) have passed, so the
table and ``gpu_e2e.json`` come back within one device call (540 s) even if a phase hangs or fails.

On the device machine (no network) LMDeploy and its missing dependencies travel as wheels made by
``benchmarks/gpu_e2e_prepare.py`` and are installed by ``benchmarks/gpu_e2e_device.sh``, which runs this file.

    python -m benchmarks.gpu_e2e --dry-run            # CPU
    bash benchmarks/gpu_e2e_device.sh                 # on the GPU machine, after the prepare step
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import gc
import hashlib
import json
import math
import os
import pathlib
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

# ---------------------------------------------------------------------------------------------------- constants

ARCHS: tuple[str, ...] = ("qwen2", "internlm2")


@dataclasses.dataclass(frozen=True)
class Tol:
    """A log-probability passes when ``|served - reference| <= atol + rtol * |reference|``."""

    atol: float
    rtol: float

    def allow(self, ref: float) -> float:
        return self.atol + self.rtol * abs(ref)


#: float16 (u = 2**-11) as argued in the module docstring; bfloat16 has 8 times its unit roundoff (u = 2**-8).
TOLERANCE = {"float16": Tol(0.05, 0.005), "bfloat16": Tol(0.4, 0.04)}
FP16 = TOLERANCE["float16"]
#: An adapter's largest effect on a log-probability must exceed this many times the largest served-vs-merged error.
EFFECT_FACTOR = 10.0
PAD, BOS, EOS = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


@dataclasses.dataclass(frozen=True)
class Dims:
    """Model sizes (GQA: 4 query heads share 2 key/value heads; head_dim = hidden / heads)."""

    vocab: int = 512
    hidden: int = 256
    intermediate: int = 512
    heads: int = 4
    kv_heads: int = 2
    layers: int = 4

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """One swift-style regex adapter: ``target_modules`` is a regex string, as ms-swift >= 3.4.1 writes it."""

    name: str
    regex: str
    r: int
    alpha: int
    seed: int
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


#: Two adapters per model: different targets and ranks; one of rank 24 (not a power of two), one on the LM head.
ADAPTERS: dict[str, tuple[AdapterSpec, AdapterSpec]] = {
    "qwen2": (
        AdapterSpec("attn-r24", r"^(model.*\.(q_proj|k_proj|v_proj|o_proj))$", r=24, alpha=48, seed=101),
        AdapterSpec("mlp-head-r8", r"^(model.*\.(gate_proj|up_proj|down_proj)|lm_head)$", r=8, alpha=16, seed=102,
                    use_rslora=True),
    ),
    "internlm2": (
        AdapterSpec("attn-r24", r"^(model.*\.(wqkv|wo))$", r=24, alpha=48, seed=201),
        AdapterSpec("mlp-head-r8", r"^(model.*\.(w1|w2|w3)|output)$", r=8, alpha=16, seed=202, use_rslora=True),
    ),
}
LM_HEAD = {"qwen2": "lm_head", "internlm2": "output"}


@dataclasses.dataclass(frozen=True)
class ModelSet:
    """The folders written for one architecture."""

    arch: str
    base: pathlib.Path
    adapters: dict[str, pathlib.Path]  # adapter name -> adapter folder
    merged: dict[str, pathlib.Path]  # adapter name -> merged model folder
    targets: dict[str, list[str]]  # adapter name -> HF module names it trains

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "base": str(self.base), "adapters": {k: str(v) for k, v in self.adapters.items()},
                "merged": {k: str(v) for k, v in self.merged.items()}, "targets": self.targets}


# ---------------------------------------------------------------------------------------------------- weights


def _seed(seed: int, name: str) -> int:
    """Per-tensor seed: a tensor's values depend on (seed, name) only."""
    digest = hashlib.sha256(f"gpu_e2e:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _randn(shape: tuple[int, ...], seed: int, name: str, std: float):
    import torch

    gen = torch.Generator().manual_seed(_seed(seed, name))
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


def checkpoint_shape(arch: str, key: str, d: Dims) -> tuple[int, ...]:
    """Shape of checkpoint tensor ``key`` of a Qwen2 / InternLM2 causal LM of sizes ``d``."""
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    leaf, kind = key.rsplit(".", 2)[-2:]
    if kind == "bias":
        return ({"q_proj": q, "k_proj": kv, "v_proj": kv}[leaf],)
    table: dict[str, tuple[int, ...]] = {
        # qwen2
        "embed_tokens": (d.vocab, d.hidden), "q_proj": (q, d.hidden), "k_proj": (kv, d.hidden),
        "v_proj": (kv, d.hidden), "o_proj": (d.hidden, q), "gate_proj": (d.intermediate, d.hidden),
        "up_proj": (d.intermediate, d.hidden), "down_proj": (d.hidden, d.intermediate), "lm_head": (d.vocab, d.hidden),
        # internlm2
        "tok_embeddings": (d.vocab, d.hidden), "wqkv": (q + 2 * kv, d.hidden), "wo": (d.hidden, q),
        "w1": (d.intermediate, d.hidden), "w3": (d.intermediate, d.hidden), "w2": (d.hidden, d.intermediate),
        "output": (d.vocab, d.hidden),
    }
    if leaf in table:
        return table[leaf]
    if "norm" in leaf:
        return (d.hidden,)
    raise KeyError(f"{arch}: no shape rule for checkpoint key {key!r}")


def _base_tensor(key: str, shape: tuple[int, ...], seed: int):
    """Norms ~1; embeddings std 1 (padding row zero, as LMDeploy loads it); linears std 1/sqrt(fan_in),
    LM head 2/sqrt(hidden) (log-probabilities spread over a few units); biases std 0.02."""
    leaf, kind = key.rsplit(".", 2)[-2:]
    if len(shape) == 1:
        return _randn(shape, seed, key, 0.02) + (0.0 if kind == "bias" else 1.0)
    if leaf in ("embed_tokens", "tok_embeddings"):
        t = _randn(shape, seed, key, 1.0)
        t[PAD] = 0.0
        return t
    std = (2.0 if leaf in ("lm_head", "output") else 1.0) / math.sqrt(shape[1])
    return _randn(shape, seed, key, std)


def token_string(i: int) -> str:
    """The vocabulary's token ``i``: three specials, then ``t3 .. t{V-1}`` (one word per token)."""
    return SPECIAL_TOKENS[i] if i < len(SPECIAL_TOKENS) else f"t{i}"


def token_id(token: str) -> int:
    if token in SPECIAL_TOKENS:
        return SPECIAL_TOKENS.index(token)
    if not re.fullmatch(r"t\d+", token):
        raise ValueError(f"not a token of this vocabulary: {token!r}")
    return int(token[1:])


def write_tokenizer(out: pathlib.Path, vocab: int) -> None:
    """A word-level ``tokenizer.json`` (one whitespace-separated word per token, nothing added) + its config.

    LMDeploy's pipeline and server need a tokenizer (to detokenize, and to name tokens in log-probabilities);
    prompts are sent as token ids. ``tokenizers`` alone encodes ``"t5 t17"`` as ``[5, 17]``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({token_string(i): i for i in range(vocab)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with single spaces
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "pad_token": "<pad>", "unk_token": "<pad>", "model_max_length": 4096, "add_bos_token": False,
           "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<pad>"}, indent=2) + "\n")


def write_model(arch: str, out: pathlib.Path, d: Dims, seed: int = 0) -> pathlib.Path:
    """A complete model folder of ``arch`` at sizes ``d``.

    ``lmdeploy_regex_lora.testing.tiny_models.make_tiny_model`` writes the folder (its config conventions, InternLM2's
    remote-code config, generation config, checkpoint key names); this rescales the config and rewrites the
    weights at ``d``'s sizes, and adds the tokenizer.
    """
    from safetensors.torch import save_file

    from lmdeploy_regex_lora.testing.tiny_models import checkpoint_shapes, make_tiny_model

    make_tiny_model(arch, out, seed=seed, num_layers=d.layers)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(vocab_size=d.vocab, hidden_size=d.hidden, intermediate_size=d.intermediate,
               num_attention_heads=d.heads, num_key_value_heads=d.kv_heads, num_hidden_layers=d.layers,
               max_position_embeddings=2048)
    if arch == "qwen2":
        cfg.update(head_dim=d.head_dim, max_window_layers=d.layers)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    keys = sorted(checkpoint_shapes(out))
    tensors = {k: _base_tensor(k, checkpoint_shape(arch, k, d), seed).contiguous() for k in keys}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(out, d.vocab)
    return out


def write_adapter(model_dir: pathlib.Path, out: pathlib.Path, spec: AdapterSpec) -> list[str]:
    """A PEFT-format LoRA adapter as ms-swift saves it (regex ``target_modules``); returns the trained modules.

    ``lora_A`` has std 1/sqrt(in); ``lora_B`` is sized so that ``scaling * B A x`` is about half of ``W x``:
    each adapter changes the model's outputs clearly.
    """
    from safetensors.torch import save_file

    from lmdeploy_regex_lora.testing.tiny_models import checkpoint_linear_names

    linears = checkpoint_linear_names(model_dir)
    pattern = re.compile(spec.regex)
    targets = [name for name in linears if pattern.fullmatch(name)]
    if not targets:
        raise ValueError(f"{spec.name}: {spec.regex!r} matches no linear of {model_dir}")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    b_std = 0.5 / (spec.scaling * math.sqrt(spec.r))
    for name in targets:
        n_out, n_in = linears[name]
        tensors[f"base_model.model.{name}.lora_A.weight"] = _randn((spec.r, n_in), spec.seed, name + ".A",
                                                                   1 / math.sqrt(n_in))
        tensors[f"base_model.model.{name}.lora_B.weight"] = _randn((n_out, spec.r), spec.seed, name + ".B", b_std)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir), "revision": None,
        "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": 0.0, "target_modules": spec.regex, "bias": "none",
        "use_rslora": spec.use_rslora, "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "layers_pattern": None, "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return targets


def write_merged(model_dir: pathlib.Path, adapter_dir: pathlib.Path, spec: AdapterSpec,
                 out: pathlib.Path) -> pathlib.Path:
    """``W + scaling * B @ A`` (float64, saved float32) under the checkpoint's own keys; every other file copied.

    For InternLM2's ``wqkv`` the merge happens in the checkpoint's interleaved row order, as PEFT merges it;
    LMDeploy re-orders base and LoRA rows alike when it loads them.
    """
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(model_dir / "model.safetensors"))
    lora = load_file(str(adapter_dir / "adapter_model.safetensors"))
    prefix = "base_model.model."
    modules = sorted({k[len(prefix):].rsplit(".lora_", 1)[0] for k in lora})
    for name in modules:
        a = lora[f"{prefix}{name}.lora_A.weight"].to(torch.float64)
        b = lora[f"{prefix}{name}.lora_B.weight"].to(torch.float64)
        w = state[f"{name}.weight"]
        state[f"{name}.weight"] = (w.to(torch.float64) + spec.scaling * (b @ a)).to(w.dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy2(item, out / item.name)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def prepare_models(work: pathlib.Path, archs: Sequence[str], d: Dims, seed: int = 0) -> dict[str, ModelSet]:
    """Write base model, adapters and merged checkpoints of each architecture under ``work``."""
    sets = {}
    for arch in archs:
        root = work / arch
        if root.exists():
            shutil.rmtree(root)
        base = write_model(arch, root / "base", d, seed)
        adapters, merged, targets = {}, {}, {}
        for spec in ADAPTERS[arch]:
            adapters[spec.name] = root / f"adapter-{spec.name}"
            targets[spec.name] = write_adapter(base, adapters[spec.name], spec)
            merged[spec.name] = write_merged(base, adapters[spec.name], spec, root / f"merged-{spec.name}")
        sets[arch] = ModelSet(arch, base, adapters, merged, targets)
    return sets


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of distinct lengths (5 .. 5 + 6(n-1) tokens) of ordinary tokens (no specials)."""
    import torch

    gen = torch.Generator().manual_seed(_seed(seed, "prompts"))
    prompts = []
    for i in range(n):
        length = 5 + 6 * i
        prompts.append([int(t) for t in torch.randint(len(SPECIAL_TOKENS), vocab, (length,), generator=gen)])
    return prompts


# ---------------------------------------------------------------------------------------------------- comparison


@dataclasses.dataclass
class Seq:
    """One generated sequence: its tokens and, per step, the top-k log-probabilities (token id -> logprob)."""

    tokens: list[int]
    logprobs: list[dict[int, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "logprobs": [{str(k): v for k, v in d.items()} for d in self.logprobs]}


def _common_diff(a: dict[int, float], b: dict[int, float]) -> float:
    """Largest |a[t] - b[t]| over the tokens both top-k dicts hold (0.0 when none)."""
    common = a.keys() & b.keys()
    return max((abs(a[t] - b[t]) for t in common), default=0.0)


def _excess(a: dict[int, float], b: dict[int, float], tol: Tol) -> float:
    """Largest |a[t] - b[t]| minus its allowance over the common tokens (> 0: out of tolerance)."""
    common = a.keys() & b.keys()
    return max((abs(a[t] - b[t]) - tol.allow(b[t]) for t in common), default=-tol.atol)


def compare_seq(got: Seq, ref: Seq, tol: Tol = FP16) -> dict[str, Any]:
    """Compare one served sequence with its reference.

    Returns ``identical`` (tokens equal), ``near_tie`` (tokens differ first at a step where both runs saw the two
    tokens within twice the tolerance of each other), ``max_lp_diff`` over the common prefix (and the first
    differing step), ``lp_ok`` and ``first_diff`` (step index or None).
    """
    n = min(len(got.tokens), len(ref.tokens))
    first = next((i for i in range(n) if got.tokens[i] != ref.tokens[i]), None)
    if first is None and len(got.tokens) != len(ref.tokens):
        first = n
    steps = range((first + 1) if first is not None else n)
    steps = [i for i in steps if i < len(got.logprobs) and i < len(ref.logprobs)]
    max_diff = max((_common_diff(got.logprobs[i], ref.logprobs[i]) for i in steps), default=0.0)
    lp_ok = all(_excess(got.logprobs[i], ref.logprobs[i], tol) <= 0 for i in steps)
    near_tie = False
    detail = None
    if first is not None and first < n:
        g, r = got.tokens[first], ref.tokens[first]
        glp, rlp = got.logprobs[first] if first < len(got.logprobs) else {}, ref.logprobs[first] if first < len(
            ref.logprobs) else {}
        margin_ref = rlp[r] - rlp[g] if g in rlp and r in rlp else math.inf
        margin_got = glp[g] - glp[r] if g in glp and r in glp else math.inf
        near_tie = max(margin_ref, margin_got) <= 2 * tol.allow(rlp.get(r, 0.0))
        detail = {"step": first, "served": g, "reference": r, "margin_reference": margin_ref,
                  "margin_served": margin_got}
    return {"identical": first is None, "near_tie": near_tie, "first_diff": detail, "max_lp_diff": max_diff,
            "lp_ok": lp_ok}


def compare_many(got: Sequence[Seq], ref: Sequence[Seq], tol: Tol = FP16) -> dict[str, Any]:
    """Aggregate :func:`compare_seq` over prompts; ``ok`` when every sequence is identical or a near tie and
    every compared log-probability is within tolerance."""
    if len(got) != len(ref):
        raise ValueError(f"{len(got)} served sequences against {len(ref)} references")
    per = [compare_seq(g, r, tol) for g, r in zip(got, ref, strict=True)]
    identical = sum(p["identical"] for p in per)
    near = sum((not p["identical"]) and p["near_tie"] for p in per)
    ok = all((p["identical"] or p["near_tie"]) and p["lp_ok"] for p in per)
    return {"n": len(per), "identical": identical, "near_tie": near, "ok": ok,
            "max_lp_diff": max((p["max_lp_diff"] for p in per), default=0.0),
            "diffs": [p["first_diff"] for p in per if p["first_diff"] is not None]}


def compare_rows(got: Sequence[Sequence[dict[int, float]]], ref: Sequence[Sequence[dict[int, float]]],
                 tol: Tol = FP16) -> dict[str, Any]:
    """Teacher-forced prompt log-probabilities (one dict per scored position): largest difference, tolerance."""
    max_diff, ok, rows = 0.0, True, 0
    for g_rows, r_rows in zip(got, ref, strict=True):
        if len(g_rows) != len(r_rows):
            raise ValueError(f"{len(g_rows)} scored positions against {len(r_rows)}")
        for g, r in zip(g_rows, r_rows, strict=True):
            max_diff = max(max_diff, _common_diff(g, r))
            ok = ok and _excess(g, r, tol) <= 0
            rows += 1
    return {"rows": rows, "max_lp_diff": max_diff, "ok": ok}


def effect(a: Sequence[Sequence[dict[int, float]]], b: Sequence[Sequence[dict[int, float]]]) -> float:
    """Largest |a - b| over common tokens of teacher-forced rows: how much an adapter moves the model."""
    return max((_common_diff(x, y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True)),
               default=0.0)


# ---------------------------------------------------------------------------------------------------- pipeline


def _gen_config(args: argparse.Namespace, **overrides: Any):
    from lmdeploy import GenerationConfig

    kwargs: dict[str, Any] = dict(max_new_tokens=args.new_tokens, do_sample=False, top_k=1, ignore_eos=True,
                                  logprobs=args.top_logprobs)
    kwargs.update(overrides)
    return GenerationConfig(**kwargs)


def engine_config(args: argparse.Namespace, adapters: dict[str, str] | None):
    from lmdeploy import PytorchEngineConfig

    return PytorchEngineConfig(dtype=args.dtype, adapters=adapters or None, logprobs_mode="raw_logprobs",
                               session_len=args.session_len, max_batch_size=args.max_batch_size,
                               cache_max_entry_count=args.cache_max_entry_count)


def _collect(pipe, batches: dict[str | None, list[list[int]]], gen_config) -> dict[str | None, list[Any]]:
    """Submit every request of every batch (one per adapter name, None = base) at once, so that the engine
    schedules adapters and base together, and gather the final ``Response`` of each.

    Prompts go in as token ids through the pipeline's own engine (``AsyncEngine.preprocess`` with ``input_ids``
    + ``generate``, the path ``Pipeline.infer`` takes after tokenizing), on the pipeline's event loop:
    ``Pipeline.infer`` takes text only and one adapter name per call.
    """
    import asyncio

    engine = pipe.async_engine

    async def one(name: str | None, ids: list[int]):
        session = pipe.session_mgr.get()
        try:
            request = await engine.preprocess(None, session, gen_config=gen_config, input_ids=ids,
                                              adapter_name=name)
            result = None
            async for out in engine.generate(request, stream_response=False):
                resp = out.to_response(0)
                result = result.extend(resp) if result is not None else resp
            return result
        finally:
            pipe.session_mgr.remove(session)

    async def run_all():
        jobs = [(name, i) for name, prompts in batches.items() for i in range(len(prompts))]
        outs = await asyncio.gather(*(one(name, batches[name][i]) for name, i in jobs))
        return dict(zip(jobs, outs, strict=True))

    got = asyncio.run_coroutine_threadsafe(run_all(), pipe.internal_thread.loop).result()
    results: dict[str | None, list[Any]] = {}
    for name, prompts in batches.items():
        results[name] = []
        for i in range(len(prompts)):
            resp = got[(name, i)]
            if resp is None or resp.finish_reason == "error":
                raise RuntimeError(f"adapter {name!r}, prompt {i}: {getattr(resp, 'error_message', 'no response')}")
            results[name].append(resp)
    return results


def run_pipeline(model_dir: pathlib.Path, adapters: dict[str, str] | None, names: Sequence[str | None],
                 prompts: list[list[int]], args: argparse.Namespace, bench_names: Sequence[str | None] = ()
                 ) -> dict[str, Any]:
    """One LMDeploy engine: mixed greedy generation, teacher-forced scoring, optional throughput; then closed."""
    import torch
    from lmdeploy import pipeline

    t0 = time.perf_counter()
    pipe = pipeline(str(model_dir), backend_config=engine_config(args, adapters), log_level="WARNING",
                    trust_remote_code=True)
    out: dict[str, Any] = {"startup_s": time.perf_counter() - t0, "gen": {}, "score": {}, "tps": {}}
    try:
        if adapters:
            import lmdeploy_regex_lora

            out["plugin_installed"] = bool(lmdeploy_regex_lora.is_installed())
            if not out["plugin_installed"]:
                raise RuntimeError("the plugin is not active in the pipeline's process: is its wheel installed?")
        gen = _collect(pipe, {n: prompts for n in names}, _gen_config(args))
        for name, resps in gen.items():
            for p, r in zip(prompts, resps, strict=True):
                if r.input_token_len != len(p):
                    raise RuntimeError(f"a prompt of {len(p)} tokens was served as {r.input_token_len}")
            out["gen"][_key(name)] = [Seq(list(r.token_ids), [dict(d) for d in (r.logprobs or [])]) for r in resps]
        score = _collect(pipe, {n: prompts for n in names},
                         _gen_config(args, max_new_tokens=0, logprob_start_len=0, ignore_eos=False))
        out["score"] = {_key(n): [[dict(d) for d in (r.logprobs or [])] for r in resps] for n, resps in score.items()}
        for name in bench_names:
            out["tps"][_key(name)] = bench(pipe, name, args)
    finally:
        pipe.close()
        del pipe
        gc.collect()
        torch.cuda.empty_cache()
    return out


def _key(name: str | None) -> str:
    return name if name is not None else "base"


def bench(pipe, name: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """Generated tokens per second for ``bench_prompts`` prompts x ``bench_new_tokens`` (median of reps)."""
    prompts = make_prompts(args.bench_prompts, args.vocab, seed=args.seed + 7)
    gcfg = _gen_config(args, max_new_tokens=args.bench_new_tokens, logprobs=None)
    _collect(pipe, {name: prompts[:4]}, gcfg)  # warm-up
    times, tokens = [], 0
    for _ in range(args.bench_reps):
        t0 = time.perf_counter()
        resps = _collect(pipe, {name: prompts}, gcfg)[name]
        times.append(time.perf_counter() - t0)
        tokens = sum(len(r.token_ids) for r in resps)
    med = statistics.median(times)
    return {"tokens": tokens, "seconds": times, "tokens_per_s": tokens / med}


# ---------------------------------------------------------------------------------------------------- api_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(ms: ModelSet, port: int, args: argparse.Namespace, python: str = sys.executable) -> list[str]:
    """``lmdeploy serve api_server`` with the PyTorch backend and both adapters, on loopback."""
    return [python, "-m", "lmdeploy", "serve", "api_server", str(ms.base), "--backend", "pytorch",
            "--adapters", *[f"{n}={p}" for n, p in ms.adapters.items()],
            "--server-name", "127.0.0.1", "--server-port", str(port), "--dtype", args.dtype,
            "--logprobs-mode", "raw_logprobs", "--session-len", str(args.session_len),
            "--max-batch-size", str(args.max_batch_size), "--cache-max-entry-count", str(args.cache_max_entry_count),
            "--trust-remote-code", "--log-level", "WARNING"]


def http_json(url: str, payload: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode())
    except urllib.error.HTTPError as exc:  # keep the server's own explanation (LMDeploy answers JSON errors)
        body = exc.read().decode(errors="replace")[:2000]
        raise RuntimeError(f"{url} answered HTTP {exc.code}: {body} (request: {str(payload)[:500]})") from exc


def wait_ready(base_url: str, timeout: float, proc: subprocess.Popen | None = None) -> list[str]:
    """Poll ``/v1/models`` until it answers; return the model ids it lists. Fails fast if the server exits."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"api_server exited with {proc.returncode} before it was ready")
        try:
            listed = http_json(f"{base_url}/v1/models", timeout=5)
            return [m["id"] for m in listed.get("data", [])]
        except (urllib.error.URLError, ConnectionError, OSError, ValueError) as exc:
            last = exc
            time.sleep(1.0)
    raise TimeoutError(f"api_server at {base_url} not ready after {timeout:.0f} s (last error: {last})")


def chat_payload(model: str, ids: Sequence[int], args: argparse.Namespace) -> dict[str, Any]:
    """An OpenAI-style chat completion on token ids (LMDeploy's ``input_ids`` extension: no chat template)."""
    return {"model": model, "messages": [], "input_ids": list(ids), "max_completion_tokens": args.new_tokens,
            "temperature": 0.0, "top_k": 1, "ignore_eos": True, "logprobs": True,
            "top_logprobs": min(args.top_logprobs, 20), "return_token_ids": True, "stream": False}


def parse_chat_response(resp: dict[str, Any]) -> Seq:
    """Tokens and per-step top log-probabilities of a non-streamed chat completion."""
    choice = resp["choices"][0]
    content = (choice.get("logprobs") or {}).get("content") or []
    logprobs = []
    for step in content:
        d = {token_id(t["token"]): float(t["logprob"]) for t in step.get("top_logprobs", [])}
        d.setdefault(token_id(step["token"]), float(step["logprob"]))
        logprobs.append(d)
    tokens = choice.get("output_ids")
    if tokens is None:
        tokens = [token_id(step["token"]) for step in content]
    return Seq([int(t) for t in tokens], logprobs)


def query_server(base_url: str, names: Sequence[str], prompts: list[list[int]], args: argparse.Namespace
                 ) -> dict[str, list[Seq]]:
    """Every (model name, prompt) request at once, from threads, so the server batches adapters together."""
    jobs = [(n, i) for n in names for i in range(len(prompts))]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futs = {job: pool.submit(http_json, f"{base_url}/v1/chat/completions",
                                 chat_payload(job[0], prompts[job[1]], args), args.request_timeout) for job in jobs}
        got = {job: parse_chat_response(f.result()) for job, f in futs.items()}
    return {n: [got[(n, i)] for i in range(len(prompts))] for n in names}


def stop_server(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGINT the server's process group (uvicorn shuts the engine down), then SIGTERM / SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_server(ms: ModelSet, prompts: list[list[int]], args: argparse.Namespace, log_path: pathlib.Path,
               command: Callable[[int], list[str]] | None = None) -> dict[str, Any]:
    """Start the api_server for ``ms``, query base + both adapters, stop it; the log goes to ``log_path``.

    ``command(port)`` replaces :func:`server_command` (the CPU test starts a stand-in server: LMDeploy's engine
    has no CPU path).
    """
    port = free_port()
    cmd = command(port) if command is not None else server_command(ms, port, args)
    base_url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ms.base.parent),
                                start_new_session=True)
    try:
        listed = wait_ready(base_url, args.server_timeout, proc)
        startup = time.perf_counter() - t0
        base_name = next((m for m in listed if m not in ms.adapters), None)
        missing = [n for n in ms.adapters if n not in listed]
        if base_name is None or missing:
            raise RuntimeError(f"/v1/models lists {listed}: base model or adapters {missing} missing")
        names = [base_name, *ms.adapters]
        got = query_server(base_url, names, prompts, args)
        return {"startup_s": startup, "listed": listed, "base_name": base_name,
                "gen": {("base" if n == base_name else n): seqs for n, seqs in got.items()}}
    finally:
        stop_server(proc)


# ---------------------------------------------------------------------------------------------------- report


def evaluate(arch: str, engines: dict[str, dict[str, Any]], server: dict[str, Any] | None,
             tol: Tol = FP16) -> list[dict[str, Any]]:
    """Rows of the report for one architecture: the plugin engine's adapters and base against the merged and
    base engines (pipeline), then the api_server's answers against the same references."""
    rows = []
    plugin = engines["plugin"]
    refs = {name: engines[f"merged:{name}"] for name in plugin["gen"] if name != "base"}
    refs["base"] = engines["base"]
    for name, ref in refs.items():
        gen = compare_many(plugin["gen"][name], ref["gen"]["base"], tol)
        score = compare_rows(plugin["score"][name], ref["score"]["base"], tol)
        row: dict[str, Any] = {"arch": arch, "path": "pipeline", "adapter": name, "gen": gen, "score": score}
        if name != "base":
            row["effect"] = effect(ref["score"]["base"], engines["base"]["score"]["base"])
            error = max(gen["max_lp_diff"], score["max_lp_diff"])
            row["discriminative"] = row["effect"] > EFFECT_FACTOR * max(error, tol.atol / EFFECT_FACTOR)
        served_tps = plugin["tps"].get(name, {}).get("tokens_per_s")
        merged_tps = ref["tps"].get("base", {}).get("tokens_per_s")
        if served_tps and merged_tps:
            row["tps"] = {"served": served_tps, "merged": merged_tps, "ratio": served_tps / merged_tps}
        row["ok"] = gen["ok"] and score["ok"] and row.get("discriminative", True)
        rows.append(row)
    if server is not None:
        for name, seqs in server["gen"].items():
            gen = compare_many(seqs, refs[name]["gen"]["base"], tol)
            rows.append({"arch": arch, "path": "api_server", "adapter": name, "gen": gen, "ok": gen["ok"]})
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table: tokens identical, largest log-probability difference, throughput ratio."""
    header = ["model", "path", "adapter", "tokens identical", "max Δlogprob, generated", "max Δlogprob, prompt",
              "adapter effect", "served / merged tok/s", "ratio", "ok"]
    lines = []
    for r in rows:
        g = r["gen"]
        ident = f"{g['identical']}/{g['n']}" + (f" (+{g['near_tie']} near tie)" if g["near_tie"] else "")
        score = f"{r['score']['max_lp_diff']:.2e}" if "score" in r else "—"
        eff = f"{r['effect']:.2f}" if "effect" in r else "—"
        tps = r.get("tps")
        tps_s = f"{tps['served']:.0f} / {tps['merged']:.0f}" if tps else "—"
        ratio = f"{tps['ratio']:.3f}" if tps else "—"
        lines.append([r["arch"], r["path"], r["adapter"], ident, f"{g['max_lp_diff']:.2e}", score, eff, tps_s,
                      ratio, "yes" if r["ok"] else "NO"])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]

    def fmt(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines)])


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Seq):
        return obj.to_dict()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, pathlib.Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def machine_info() -> dict[str, Any]:
    """Date, GPU, versions: what docs/performance.md needs next to the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    info: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                            "python": platform.python_version(), "host": platform.node()}
    for pkg in ("lmdeploy", "lmdeploy-regex-lora", "torch", "transformers", "peft", "triton", "safetensors"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except Exception as exc:  # the report must still be written
        info["gpu_error"] = repr(exc)
    return info


class Report:
    """Results written to ``--out`` after every phase, so a run cut short still returns what it measured."""

    def __init__(self, out: pathlib.Path | None, args: argparse.Namespace) -> None:
        self.out = out
        self.data: dict[str, Any] = {"machine": machine_info(), "args": vars(args),
                                     "tolerance": {**dataclasses.asdict(TOLERANCE[args.dtype]),
                                                   "effect_factor": EFFECT_FACTOR, "dtype": args.dtype},
                                     "phases": {}, "rows": [], "errors": []}
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)

    def phase(self, key: str, value: Any) -> None:
        self.data["phases"][key] = value
        self.flush()

    def flush(self) -> None:
        if self.out is not None:
            (self.out / "gpu_e2e.json").write_text(json.dumps(_jsonable(self.data), indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------- dry run


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


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU only: write, check tokenizer and plugin, print plan")
    p.add_argument("--models", default=",".join(ARCHS), help="comma-separated subset of " + ",".join(ARCHS))
    p.add_argument("--work", default=None, help="folder for models and adapters (default: a temporary folder)")
    p.add_argument("--out", default=os.environ.get("OUT") or None, help="where gpu_e2e.json and logs go")
    p.add_argument("--skip-server", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=Dims.vocab)
    p.add_argument("--hidden", type=int, default=Dims.hidden)
    p.add_argument("--intermediate", type=int, default=Dims.intermediate)
    p.add_argument("--layers", type=int, default=Dims.layers)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--top-logprobs", type=int, default=20)
    p.add_argument("--bench-prompts", type=int, default=64)
    p.add_argument("--bench-new-tokens", type=int, default=128)
    p.add_argument("--bench-reps", type=int, default=3)
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--session-len", type=int, default=1024)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--cache-max-entry-count", type=float, default=0.03)
    p.add_argument("--server-timeout", type=float, default=180.0, help="seconds to wait for the api_server")
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds after which no new phase starts and the table is printed (the device call has 540)")
    p.add_argument("--request-timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in ARCHS]
    if bad or not models:
        p.error(f"--models: unknown {bad}; choose from {', '.join(ARCHS)}")
    args.models = models
    if args.hidden % Dims.heads:
        p.error(f"--hidden must be a multiple of {Dims.heads}")
    if not 1 <= args.top_logprobs <= 20:
        p.error("--top-logprobs must be 1..20 (the OpenAI API's limit)")
    if args.prompts < 1 or args.new_tokens < 1 or args.bench_prompts < 1 or args.bench_reps < 1:
        p.error("--prompts, --new-tokens, --bench-prompts and --bench-reps must be positive")
    if args.prompts * 3 > args.max_batch_size:
        p.error("--max-batch-size must hold the mixed batch (3 x --prompts)")
    return args


def engine_plan(ms: ModelSet, skip_throughput: bool
                ) -> list[tuple[str, pathlib.Path, dict[str, str] | None, list[str | None], list[str | None]]]:
    """(key, model folder, adapters, request adapter names, throughput adapter names) of each engine, in order:
    the base model with both adapters through the plugin, each merged checkpoint, the base model alone."""
    names: list[str | None] = [*ms.adapters, None]
    plan: list[tuple[str, pathlib.Path, dict[str, str] | None, list[str | None], list[str | None]]] = [
        ("plugin", ms.base, {n: str(p) for n, p in ms.adapters.items()}, names,
         [] if skip_throughput else list(ms.adapters))]
    plan += [(f"merged:{n}", ms.merged[n], None, [None], [] if skip_throughput else [None]) for n in ms.adapters]
    plan.append(("base", ms.base, None, [None], []))
    return plan


class OutOfTime(RuntimeError):
    """The run's ``--budget`` is spent: later phases are skipped so that the table still comes back."""


def run_engines(ms: ModelSet, prompts: list[list[int]], args: argparse.Namespace, report: Report,
                deadline: float, engines: dict[str, dict[str, Any]]) -> None:
    """Every engine of one architecture's plan, in order, each opened, used and closed; results go into
    ``engines`` as they come (a failure keeps what came before it)."""
    for key, folder, adapters, run_names, bench_names in engine_plan(ms, args.skip_throughput):
        if time.perf_counter() > deadline:
            raise OutOfTime(f"--budget spent before pipeline {key}")
        print(f"[{ms.arch}] pipeline {key} ...", flush=True)
        engines[key] = run_pipeline(folder, adapters, run_names, prompts, args, bench_names)
        report.phase(f"pipeline:{ms.arch}:{key}", engines[key])
        print(f"[{ms.arch}] pipeline {key}: engine up in {engines[key]['startup_s']:.1f} s", flush=True)


def _record_error(report: Report, where: str, exc: BaseException) -> None:
    import traceback

    tb = traceback.format_exc()
    report.data["errors"].append({"arch": where, "error": repr(exc), "traceback": tb})
    report.flush()
    print(f"[{where}] FAILED: {exc!r}\n{tb}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    dims = Dims(vocab=args.vocab, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers)
    out = pathlib.Path(args.out) if args.out else None
    work = pathlib.Path(args.work) if args.work else pathlib.Path(tempfile.mkdtemp(prefix="gpu_e2e_"))
    report = Report(out, args)
    t0 = time.perf_counter()
    deadline = t0 + args.budget
    sets = prepare_models(work, args.models, dims, seed=args.seed)
    prompts = make_prompts(args.prompts, dims.vocab, seed=args.seed)
    report.phase("models", {a: s.to_dict() for a, s in sets.items()})
    print(f"models, adapters and merged checkpoints written to {work} in {time.perf_counter() - t0:.1f} s")
    if args.dry_run:
        dry_run(sets, prompts, args, report)
        return 0

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing beyond --dry-run can run here", file=sys.stderr)
        return 2
    # All pipelines first, then the servers: a server that hangs cannot starve the pipeline comparisons.
    engines: dict[str, dict[str, dict[str, Any]]] = {}
    complete = []
    for arch, ms in sets.items():
        engines[arch] = {}
        try:
            run_engines(ms, prompts, args, report, deadline, engines[arch])
            complete.append(arch)
        except Exception as exc:  # record, go on: one call must bring back all it can
            _record_error(report, arch, exc)
    servers: dict[str, dict[str, Any]] = {}
    log_dir = out if out is not None else work
    for arch, ms in sets.items():
        if args.skip_server or arch not in complete:
            continue
        left = deadline - time.perf_counter()
        try:
            if left < 30:
                raise OutOfTime(f"--budget spent before the api_server ({left:.0f} s left)")
            print(f"[{arch}] api_server ...", flush=True)
            servers[arch] = run_server(ms, prompts, _with_timeout(args, left),
                                       log_dir / f"server-{arch}.log")
            report.phase(f"server:{arch}", servers[arch])
            print(f"[{arch}] api_server up in {servers[arch]['startup_s']:.1f} s; models {servers[arch]['listed']}",
                  flush=True)
        except Exception as exc:
            _record_error(report, f"{arch} api_server (log: {log_dir / f'server-{arch}.log'})", exc)
    for arch in complete:
        rows = evaluate(arch, engines[arch], servers.get(arch), TOLERANCE[args.dtype])
        report.data["rows"].extend(rows)
    failed = bool(report.data["errors"]) or not all(r["ok"] for r in report.data["rows"])
    table = format_table(report.data["rows"])
    tol = TOLERANCE[args.dtype]
    report.data["table"] = table
    report.data["wall_s"] = time.perf_counter() - t0
    report.flush()
    m = report.data["machine"]
    print(f"\n{m.get('gpu')} | lmdeploy {m.get('lmdeploy')} | torch {m.get('torch')} | {m['date']} | "
          f"{args.dtype}, tolerance |Δlogprob| <= {tol.atol} + {tol.rtol}·|ref|")
    print(table)
    for r in report.data["rows"]:
        if not r["ok"]:
            print(f"MISMATCH {r['arch']} {r['path']} {r['adapter']}: {json.dumps(_jsonable(r))[:2000]}")
    for e in report.data["errors"]:
        print(f"ERROR {e['arch']}: {e['error']}")
    print("RESULT: " + ("FAIL" if failed else "PASS") + f" in {report.data['wall_s']:.0f} s")
    return 1 if failed else 0


def _with_timeout(args: argparse.Namespace, left: float) -> argparse.Namespace:
    """``args`` with the server's start-up wait cut to the time left in the budget."""
    new = argparse.Namespace(**vars(args))
    new.server_timeout = min(args.server_timeout, max(left - 20.0, 10.0))
    return new


if __name__ == "__main__":
    raise SystemExit(main())
