"""``python -m benchmarks.gpu_e2e``: the options, then the phases in order (write, pipelines, servers, report)."""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from .compare import TOLERANCE, evaluate
from .dry_run import dry_run
from .engine import OutOfTime, run_engines
from .models import ARCHS, Dims, ModelSet, make_prompts, prepare_models
from .report import Report
from .server import run_server

#: The first line of the package's docstring (the run's specification) describes the command.
DESCRIPTION = importlib.import_module(__package__).__doc__.splitlines()[0]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_e2e", description=DESCRIPTION,
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
    engines = run_pipelines(sets, prompts, args, report, deadline)
    servers = {} if args.skip_server else run_servers(
        {arch: sets[arch] for arch in engines}, prompts, args, report, deadline, out if out is not None else work)
    for arch, arch_engines in engines.items():
        report.data["rows"].extend(evaluate(arch, arch_engines, servers.get(arch), TOLERANCE[args.dtype]))
    failed = report.conclude(args.dtype, time.perf_counter() - t0)
    return 1 if failed else 0


def run_pipelines(sets: dict[str, ModelSet], prompts: list[list[int]], args: argparse.Namespace, report: Report,
                  deadline: float) -> dict[str, dict[str, dict[str, Any]]]:
    """Architecture -> its engines' results (``engine.run_engines``), for each architecture whose engines all
    ran; a failure is recorded in the report and the next architecture goes on."""
    done = {}
    for arch, ms in sets.items():
        engines: dict[str, dict[str, Any]] = {}
        try:
            run_engines(ms, prompts, args, report, deadline, engines)
        except Exception as exc:  # record, go on: one call must bring back all it can
            report.record_error(arch, exc)
            continue
        done[arch] = engines
    return done


def run_servers(sets: dict[str, ModelSet], prompts: list[list[int]], args: argparse.Namespace, report: Report,
                deadline: float, log_dir: pathlib.Path) -> dict[str, dict[str, Any]]:
    """Architecture -> its api_server's answers, while at least 30 s of the budget are left for each; a failure
    is recorded in the report (with the server's log file) and the next architecture goes on."""
    servers = {}
    for arch, ms in sets.items():
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
            report.record_error(f"{arch} api_server (log: {log_dir / f'server-{arch}.log'})", exc)
    return servers


def _with_timeout(args: argparse.Namespace, left: float) -> argparse.Namespace:
    """``args`` with the server's start-up wait cut to the time left in the budget."""
    new = argparse.Namespace(**vars(args))
    new.server_timeout = min(args.server_timeout, max(left - 20.0, 10.0))
    return new
