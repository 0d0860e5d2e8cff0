"""Stand-ins for the parts of the GPU end-to-end run that need CUDA: LMDeploy's ``pipeline`` and its api_server.

Both answer with one deterministic "model" (:func:`generate`, :func:`score`), keyed by ``base`` or an adapter
name, so that a plugin that serves each adapter as its merged model passes and one that ignores adapters fails.
The api_server stand-in is ``tests/scripts/fake_api_server.py``: it takes ``lmdeploy serve api_server``'s own
command line (what ``benchmarks.gpu_e2e.server.server_command`` builds) after the script's path.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import sys
import threading
from typing import Any

FAKE_API_SERVER = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "fake_api_server.py"
#: How far each model's tokens are shifted: every adapter answers differently from the base model.
SHIFT = {"base": 0, "attn-r24": 11, "mlp-head-r8": 23}


def generate(key: str, ids: list[int], n: int, vocab: int) -> tuple[list[int], list[dict[int, float]]]:
    """``n`` greedy tokens of model ``key`` after prompt ``ids``, and each step's top-2 log-probabilities."""
    toks = [3 + (sum(ids) + 7 * k + SHIFT[key]) % (vocab - 3) for k in range(n)]
    alt = [3 + (t + 1 - 3) % (vocab - 3) for t in toks]
    return toks, [{t: -0.3, a: -2.0} for t, a in zip(toks, alt, strict=True)]


def score(key: str, ids: list[int]) -> list[dict[int, float]]:
    """Teacher-forced log-probability of each prompt token after the first, by model ``key``."""
    return [{ids[j + 1]: -1.0 - SHIFT[key] / 23} for j in range(len(ids) - 1)]


def api_server_command(lmdeploy_command: list[str], *extra: str) -> list[str]:
    """The stand-in server in place of ``python -m lmdeploy ...`` (``server_command``'s list), plus ``extra``."""
    assert lmdeploy_command[1:3] == ["-m", "lmdeploy"], lmdeploy_command
    return [sys.executable, str(FAKE_API_SERVER), *lmdeploy_command[2:], *extra]


def model_set(folder: pathlib.Path, arch: str = "qwen2", adapters: tuple[str, ...] = ("attn-r24", "mlp-head-r8"),
              vocab: int = 64):
    """A ``ModelSet`` of folder names only (``adapter-<name>``, ``merged-<name>``), whose base folder holds just
    the ``config.json`` the stand-in server reads its vocabulary size from."""
    from benchmarks.gpu_e2e.models import ModelSet

    base = folder / "base"
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text(json.dumps({"vocab_size": vocab}))
    return ModelSet(arch, base, {n: folder / f"adapter-{n}" for n in adapters},
                    {n: folder / f"merged-{n}" for n in adapters}, {})


class _Out:
    def __init__(self, ids: list[int], toks: list[int], lps: list[dict[int, float]] | None) -> None:
        self.ids, self.toks, self.lps = ids, toks, lps

    def to_response(self, index: int):
        from lmdeploy.messages import Response

        return Response(text="", generate_token_len=len(self.toks), input_token_len=len(self.ids),
                        finish_reason="length", token_ids=list(self.toks), logprobs=self.lps, index=index)


class _Engine:
    """``AsyncEngine``'s ``preprocess`` + ``generate`` as ``gpu_e2e.engine`` calls them."""

    def __init__(self, key_for, vocab: int) -> None:
        self.key_for, self.vocab = key_for, vocab

    async def preprocess(self, messages, session, gen_config=None, input_ids=None, adapter_name=None):
        assert messages is None and input_ids
        return (self.key_for(adapter_name), list(input_ids), gen_config)

    async def generate(self, request, stream_response=True):
        key, ids, cfg = request
        if cfg.logprob_start_len >= 0:
            assert cfg.max_new_tokens == 0
            yield _Out(ids, [], score(key, ids))
        else:
            toks, lps = generate(key, ids, cfg.max_new_tokens, self.vocab)
            yield _Out(ids, toks, lps if cfg.logprobs else None)


class _Sessions:
    def __init__(self) -> None:
        self.live: set[int] = set()

    def get(self) -> int:
        self.live.add(len(self.live) + 1000)
        return max(self.live)

    def remove(self, session: int) -> None:
        self.live.discard(session)


class FakePipeline:
    """Stands in for ``lmdeploy.pipeline``: the attributes ``gpu_e2e`` uses, answering with :func:`generate` and
    :func:`score`; the merged folder of an adapter answers as that adapter. Each one opened is recorded in
    ``opened`` as (model path, adapters)."""

    def __init__(self, model_path: str, backend_config: Any, ignore_adapters: bool, opened: list) -> None:
        folder = pathlib.Path(model_path).name
        merged = folder[len("merged-"):] if folder.startswith("merged-") else None
        adapters = backend_config.adapters or {}
        assert backend_config.logprobs_mode == "raw_logprobs" and backend_config.dtype == "float16"

        def key_for(name: str | None) -> str:
            assert name is None or name in adapters, name
            return merged or ("base" if name is None or ignore_adapters else name)

        vocab = json.loads((pathlib.Path(model_path) / "config.json").read_text())["vocab_size"]
        self.async_engine = _Engine(key_for, vocab)
        self.session_mgr = _Sessions()
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        self.internal_thread = type("T", (), {"loop": loop})()
        opened.append((model_path, dict(adapters)))

    def close(self) -> None:
        self.internal_thread.loop.call_soon_threadsafe(self.internal_thread.loop.stop)
        assert not self.session_mgr.live, "sessions left open"


def use_standins(monkeypatch, ignore_adapters: bool = False) -> list:
    """Replace LMDeploy's pipeline and api_server by the stand-ins, and claim a CUDA device; returns the list
    that records every pipeline opened."""
    import lmdeploy
    import torch

    from benchmarks.gpu_e2e import server

    opened: list = []
    monkeypatch.setattr(lmdeploy, "pipeline", lambda path, backend_config, **kw: FakePipeline(
        path, backend_config, ignore_adapters, opened))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    real_command = server.server_command
    monkeypatch.setattr(server, "server_command",
                        lambda ms, port, args: api_server_command(real_command(ms, port, args)))
    return opened
