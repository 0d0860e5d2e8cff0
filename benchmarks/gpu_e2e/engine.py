"""LMDeploy's ``pipeline`` on every model of the plan: mixed-adapter generation, prompt scoring, throughput."""

from __future__ import annotations

import argparse
import gc
import pathlib
import statistics
import time
from collections.abc import Sequence
from typing import Any

from .compare import Seq
from .models import ModelSet, make_prompts
from .report import Report

#: One engine of the plan: (key, model folder, adapters, request adapter names, throughput adapter names).
EngineSpec = tuple[str, pathlib.Path, dict[str, str] | None, list[str | None], list[str | None]]


def engine_plan(ms: ModelSet, skip_throughput: bool) -> list[EngineSpec]:
    """Each engine of one architecture, in order: the base model with both adapters through the plugin, each
    merged checkpoint, the base model alone."""
    names: list[str | None] = [*ms.adapters, None]
    plan: list[EngineSpec] = [
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
