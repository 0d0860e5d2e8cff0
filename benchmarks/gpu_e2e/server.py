"""``lmdeploy serve api_server`` with both adapters: start it, query base and adapters at once over HTTP, stop it."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from .compare import Seq
from .models import ModelSet
from .tokenizer import token_id


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
