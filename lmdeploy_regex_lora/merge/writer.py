"""Writing a merge: each shard streamed with its very header, untouched tensors copied, targets merged.

A merged shard has the same names, dtypes, shapes and offsets as its input, so the output is written
as a stream: untouched tensors are byte ranges copied through one reused 4 MiB buffer, and a merged
weight is read, merged and written a block of rows (4 MiB of float64) at a time, computed in float64
and rounded once to the shard's dtype (:mod:`.rounding`). Peak memory is a few tens of MiB, whatever
the shard or adapter size; neither torch nor LMDeploy is imported.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict

from ..errors import AdapterError
from ..safetensors_io import DTYPES, Entry
from . import rounding
from .planner import MergePlan, plan_merge, values

#: Bytes copied per read for tensors the adapter does not touch, and the float32 working set per merge block.
COPY_CHUNK = 4 << 20
MERGE_CHUNK = 4 << 20
#: Files that hold (unmerged) weights in another format; copying them would ship the base model's weights.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".safetensors")
_SKIPPED_DIRS = {".git", ".cache"}


def _read_exact(src, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = src.readinto(view[got:])
        if not n:
            raise AdapterError("ended early while it was read (it changed or is truncated).", file=src.name,
                               fix="download the checkpoint again.")
        got += n


def _copy_range(src, dst, length: int, buf: memoryview, tick: Callable[[int], None]) -> None:
    """Copy ``length`` bytes through ``buf`` (one buffer reused: no allocation per piece)."""
    while length > 0:
        view = buf[:min(length, len(buf))]
        _read_exact(src, view)
        dst.write(view)
        length -= len(view)
        tick(len(view))


def _merge_rows(src, dst, key: str, entry: Entry, a, b, scaling: float, where: tuple[str, str, str],
                tick: Callable[[int], None]) -> None:
    """Write ``W + scaling * B @ A`` for one weight, a block of rows at a time, rounded once to the weight's dtype.

    Computed in float64 (``a`` and ``b`` are float64 already), so the result is the nearest value of
    the dtype to the exact sum, whatever BLAS the machine has. A value that overflows the dtype where
    the base weight ``key`` was finite is refused (``where``: adapter, file, module), never written as Inf.
    """
    import numpy as np

    code = entry.dtype
    out_f, in_f = entry.shape
    itemsize = DTYPES[code].itemsize
    rows = max(1, min(out_f, MERGE_CHUNK // max(1, in_f * 8)))
    raw = bytearray(rows * in_f * itemsize)
    raw_view = memoryview(raw)
    acc = np.empty((rows, in_f), dtype=np.float64)
    for r0 in range(0, out_f, rows):
        n = min(rows, out_f - r0)
        nbytes = n * in_f * itemsize
        _read_exact(src, raw_view[:nbytes])
        w = rounding.decode(code, raw_view[:nbytes]).reshape(n, in_f)
        block = np.matmul(b[r0:r0 + n], a, out=acc[:n])
        block *= scaling
        block += w
        merged = rounding.encode(code, block)
        finite = rounding.finite_encoded(code, merged)
        if not finite.all() and np.isfinite(w[~finite]).any():
            adapter, file, module = where
            raise AdapterError(f"merged into {key}, it gives values beyond what {code} "
                               "can hold (the weight would hold Inf).", adapter=adapter, file=file, module=module,
                               fix="merge into a checkpoint with a wider dtype (float32), or serve the adapter "
                                   "unmerged with the plugin.")
        dst.write(memoryview(merged).cast("B"))
        tick(nbytes)


def write_shard(plan: MergePlan, shard: str, out_file: str, tick: Callable[[int], None]) -> int:
    """Stream one shard: header verbatim, untouched bytes copied, target weights merged. Returns merged count."""
    header = plan.headers[shard]
    targets = sorted((header.entries[k].offset, k) for k, t in plan.targets.items() if t.shard == shard)
    buf = memoryview(bytearray(COPY_CHUNK))
    with open(header.file, "rb", buffering=0) as src, open(out_file, "wb") as dst:
        dst.write(header.raw)
        tick(len(header.raw))
        src.seek(header.data_start)
        pos = header.data_start
        for start, key in targets:
            _copy_range(src, dst, start - pos, buf, tick)
            entry = header.entries[key]
            target, pair = plan.targets[key], plan.pairs[key]
            a = values(plan.weights_file, pair.a, plan.adapter, target.module, pair.a_key)
            b = values(plan.weights_file, pair.b, plan.adapter, target.module, pair.b_key)
            _merge_rows(src, dst, key, entry, a, b, target.scaling, (plan.adapter, plan.weights_file, target.module),
                        tick)
            pos = entry.offset + entry.nbytes
        _copy_range(src, dst, header.size - pos, buf, tick)
    return len(targets)


def _copy_other_files(base: str, dest: str, written: set[str]) -> tuple[list[str], list[str]]:
    """Copy every non-weight file (recursively); return (copied, skipped) relative paths."""
    copied, skipped = [], []
    for root, dirs, files in os.walk(base):
        rel_root = os.path.relpath(root, base)
        for d in list(dirs):
            if d in _SKIPPED_DIRS:
                dirs.remove(d)
                skipped.append(os.path.normpath(os.path.join(rel_root, d)) + "/")
        for f in sorted(files):
            rel = os.path.normpath(os.path.join(rel_root, f))
            if rel in written:
                continue
            if f.endswith(_OTHER_WEIGHTS) or f.endswith(".bin.index.json"):
                skipped.append(rel)
                continue
            os.makedirs(os.path.join(dest, rel_root), exist_ok=True)
            shutil.copy2(os.path.join(root, f), os.path.join(dest, rel))  # follows links (Hub cache snapshots)
            copied.append(rel)
    return copied, skipped


class _Progress:
    """tqdm on a terminal; otherwise one plain line per shard (logs stay readable)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        self.plain = enabled and not sys.stderr.isatty()
        if enabled and not self.plain:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging",
                                file=sys.stderr)
            except ImportError:
                self.plain = True

    def tick(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def shard_done(self, i: int, total: int, shard: str, merged: int, nbytes: int) -> None:
        if self.plain:
            print(f"[{i}/{total}] {shard}: {merged} weight(s) merged, {nbytes / 2**20:.1f} MiB written",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_out(out: str, base: str) -> None:
    out_abs, base_abs = os.path.realpath(out), os.path.realpath(base)
    if out_abs == base_abs or out_abs.startswith(base_abs + os.sep):
        raise AdapterError("the output folder is the base model folder or inside it.", file=out,
                           fix="write the merge to a new folder next to the base model.")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise AdapterError("the output folder exists and is not empty.", file=out,
                           fix="choose a new folder (merge never overwrites files).")


def _prepare_out(out: str, base: str) -> str:
    _check_out(out, base)
    os.makedirs(out, exist_ok=True)
    staging = os.path.join(out, ".lmdeploy-regex-lora-partial")
    os.makedirs(staging)
    return staging


def merge_checkpoint(base: str | os.PathLike, adapter: str, out: str | os.PathLike, *, name: str | None = None,
                     progress: bool = True) -> dict:
    """Merge ``adapter`` into ``base`` and write the result to ``out``; returns a summary (the ``--json`` output).

    Everything is written under ``out/.lmdeploy-regex-lora-partial`` first and moved into ``out`` only
    when complete, so an interrupted merge never leaves a folder that looks like a model; a merge
    refused part way (a value its dtype cannot hold) removes ``out`` again if it created it.
    """
    start = time.perf_counter()
    base, out = os.fspath(base), os.fspath(out)
    name = name or os.path.basename(os.path.normpath(adapter))
    _check_out(out, base)  # fail before planning; checked again when the folder is created
    plan = plan_merge(base, name, adapter)
    created = not os.path.exists(out)
    staging = _prepare_out(out, base)
    total = sum(h.size for h in plan.headers.values())
    bar = _Progress(total, progress)
    shard_rows = []
    try:
        for i, shard in enumerate(plan.shards, start=1):
            merged = write_shard(plan, shard, os.path.join(staging, shard), bar.tick)
            nbytes = os.path.getsize(os.path.join(staging, shard))
            shard_rows.append({"file": shard, "tensors": len(plan.headers[shard].entries), "merged": merged,
                               "bytes": nbytes})
            bar.shard_done(i, len(plan.shards), shard, merged, nbytes)
        copied, skipped = _copy_other_files(base, staging, set(plan.shards))
        for item in os.listdir(staging):
            os.replace(os.path.join(staging, item), os.path.join(out, item))
        os.rmdir(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:  # a refusal found while streaming leaves no trace, like one found while planning
            with contextlib.suppress(OSError):
                os.rmdir(out)
        raise
    finally:
        bar.close()
    return {
        "base": os.path.abspath(base), "adapter": name, "adapter_path": plan.adapter_path,
        "out": os.path.abspath(out), "naming": plan.naming, "index": plan.index,
        "modules": [asdict(t) for t in plan.targets.values()], "shards": shard_rows,
        "copied": copied, "not_copied": skipped, "seconds": round(time.perf_counter() - start, 3),
    }


