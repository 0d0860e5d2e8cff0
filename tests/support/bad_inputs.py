"""Helpers for the bad-input tests: a served model to reuse, its bit-level snapshot, file damage, forked runs.

Every bad adapter is driven through LMDeploy's real ``lmdeploy.pytorch.models.patch.add_adapters`` with the
plugin installed, on one tiny LMDeploy model built once per test module; :class:`ModelState` proves that a
failed load left it bit-identical, with no LoRA slot and LMDeploy's step context manager untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import select
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "base_model.model."
NOBODY = 65534


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The tensor's raw bytes (no float comparison, so -0.0 / NaN payloads count too); no torch kernel runs."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def module_tree(model: torch.nn.Module) -> list[tuple[str, type, int]]:
    """Every module by name, with its type and identity: a wrapper left in a layer's place shows up."""
    return [(n, type(m), id(m)) for n, m in model.named_modules()]


class ModelState:
    """Bit-level snapshot of an LMDeploy model: every parameter and buffer, module tree (names, types and the
    module objects themselves), LoRA slots, ctx_mgr."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.tensors = {n: (id(t), hashlib.sha256(tensor_bytes(t)).digest())
                        for n, t in [*model.named_parameters(), *model.named_buffers()]}
        self.modules = module_tree(model)
        ctx = getattr(model, "ctx_mgr", None)
        self.ctx_attrs = dict(vars(ctx)) if ctx is not None else {}

    def lora_slots(self) -> dict[str, list[str]]:
        return {n: list(m.lora_adapters) for n, m in self.model.named_modules()
                if len(getattr(m, "lora_adapters", ()) or ()) > 0}

    def differences(self) -> list[str]:
        """Empty when the model is exactly as snapshotted."""
        out = []
        now = {n: (id(t), hashlib.sha256(tensor_bytes(t)).digest())
               for n, t in [*self.model.named_parameters(), *self.model.named_buffers()]}
        if now.keys() != self.tensors.keys():
            out.append(f"tensors added/removed: {sorted(now.keys() ^ self.tensors.keys())[:5]}")
        out += [f"{n} changed" for n in self.tensors if n in now and now[n] != self.tensors[n]][:5]
        tree = module_tree(self.model)
        if tree != self.modules:
            changed = sorted({n for n, _, _ in set(tree) ^ set(self.modules)})
            out.append(f"module tree changed: {changed[:5]}")
        slots = self.lora_slots()
        if slots:
            out.append(f"LoRA slots left: {slots}")
        ctx = getattr(self.model, "ctx_mgr", None)
        if ctx is not None and dict(vars(ctx)) != self.ctx_attrs:
            out.append(f"ctx_mgr attributes changed: {sorted(set(vars(ctx)) ^ set(self.ctx_attrs))}")
        return out

    def reset(self) -> None:
        """Undo a (successful) load so the next test gets the pristine model; tensors are never touched."""
        from lmdeploy_regex_lora.serve.vision import unwrap_plain_linears

        unwrap_plain_linears(self.model)
        for m in self.model.modules():
            slots = getattr(m, "lora_adapters", None)
            if slots is not None:
                for key in list(slots):
                    del slots[key]
        ctx = getattr(self.model, "ctx_mgr", None)
        if ctx is not None:
            attrs = vars(ctx)
            for key in [k for k in attrs if k not in self.ctx_attrs]:
                del attrs[key]
            attrs.update(self.ctx_attrs)


def load(model: torch.nn.Module, adapters: dict) -> Any:
    """LMDeploy's own entry point, as its model agent calls it (the plugin's hook must be installed)."""
    from lmdeploy.pytorch.models import patch

    return patch.add_adapters(model, adapters, dtype=torch.float32, device=torch.device("cpu"))


# -- damaging files -------------------------------------------------------------------------------------

def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, drop: tuple[str, ...] = (), **changes: Any) -> Path:
    file = folder / "adapter_config.json"
    cfg = json.loads(file.read_text())
    for key in drop:
        cfg.pop(key, None)
    cfg.update(changes)
    file.write_text(json.dumps(cfg))
    return folder


def edit_tensors(folder: Path, fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Path:
    file = folder / "adapter_model.safetensors"
    state = fn(dict(load_file(str(file))))
    save_file({k: v.contiguous() for k, v in state.items()}, str(file), metadata={"format": "pt"})
    return folder


def key(module: str, half: str) -> str:
    return f"{PREFIX}{module}.{half}.weight"


def safetensors_bytes(header: Any, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return (len(raw) if length is None else length).to_bytes(8, "little") + raw + data


class RunsCode:
    """Pickles to ``os.system('touch MARKER')``: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def live_payload_check(make: Callable[[Path], bytes], control: Path, unsafe_load: Callable[[bytes], Any]) -> None:
    """Prove a payload really runs code when loaded unsafely (so the marker test below can fail)."""
    assert not control.exists()
    unsafe_load(make(control))
    assert control.exists(), "the payload did not run even when loaded unsafely: the test would prove nothing"
    control.unlink()


# -- time and processes ---------------------------------------------------------------------------------

@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the block takes longer: SIGALRM interrupts blocking syscalls."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: this input hangs the plugin")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_forked(fn: Callable[[], Any], timeout: float, as_nobody: bool = False) -> dict:
    """Run ``fn`` in a forked child (optionally as user ``nobody``, which root's files then refuse).

    Returns {'ok': value} / {'error': (type name, str, attrs)} / {'timeout': seconds}. The child only
    does file I/O and Python; it leaves with ``os._exit`` so pytest's state is never touched twice.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(rfd)
            if as_nobody and os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            try:
                result: dict = {"ok": fn()}
            except BaseException as exc:  # report everything, including the plugin's own bugs
                attrs = {k: getattr(exc, k, None) for k in ("adapter", "file", "field", "module", "fix")}
                result = {"error": (type(exc).__name__, str(exc), attrs)}
            with os.fdopen(wfd, "wb") as fh:
                pickle.dump(result, fh)
        finally:
            os._exit(0)
    os.close(wfd)
    start = time.monotonic()
    chunks = []
    with os.fdopen(rfd, "rb") as fh:
        while True:
            left = timeout - (time.monotonic() - start)
            ready, _, _ = select.select([fh], [], [], max(left, 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"timeout": timeout}
            chunk = os.read(fh.fileno(), 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    os.waitpid(pid, 0)
    return pickle.loads(b"".join(chunks))
