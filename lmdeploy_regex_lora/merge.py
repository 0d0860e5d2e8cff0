"""``lmdeploy-regex-lora merge``: the base checkpoint with one adapter folded in, streamed shard by shard.

For engines without LoRA (LMDeploy's TurboMind, and any other), and for layers no engine can serve
LoRA on per request. The merged weights are ``W + scaling * B @ A`` in the checkpoint's own (Hugging
Face) layout, computed in float64 and rounded once to the nearest value of the shard's dtype
(:mod:`.rounding`): the same on every machine, and within one unit in the last place of PEFT's
``merge_and_unload``, whose float32 product depends on the BLAS. Which modules, with which scaling, and
under which checkpoint names is decided by the serving path's own config reader, matcher, naming
schemes and checks (:func:`~lmdeploy_regex_lora.plan.resolve_adapter`), run on the checkpoint's
weights as its safetensors headers list them (:class:`~lmdeploy_regex_lora.model_map.CheckpointMap`).

Memory: neither torch nor LMDeploy is imported (importing torch's CUDA build alone takes ~690 MiB of
RSS here; a ``.bin`` adapter still needs torch to be unpickled), the adapter is read one module at a
time at its header offsets, and a merged shard has the very header of its input shard (same names,
dtypes, shapes and offsets), so the output is written as a stream: untouched tensors are byte ranges
copied through one reused 4 MiB buffer, and a merged weight is read, merged and written a block of
rows (4 MiB of float64) at a time. Peak memory is a few tens of MiB, whatever the shard or adapter size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from . import cli_common as cc
from . import rounding
from .errors import AdapterError

DESCRIPTION = """\
Write BASE with ADAPTER merged in (W + scaling * B @ A) to OUT, for TurboMind or any engine without LoRA.

Safetensors in, safetensors out: the same shards, the same model.safetensors.index.json, every
non-weight file (config, tokenizer, remote code) copied. Shards and the adapter are streamed and
neither torch nor LMDeploy is loaded, so memory stays at a few tens of MiB. Targets and scalings
are resolved by the plugin's own matcher on BASE's weight names (PEFT's rules); an adapter the
plugin refuses for its content is refused here too. Layers LMDeploy cannot serve LoRA on per
request (vision tower, projector) are merged like any other: merging is the fix for those.
Merged weights are W + scaling * B @ A computed in float64, rounded once to the shard's dtype.

Exit status: 0 written; 2 an input cannot be used (message on stderr). OUT must not exist or be empty.
"""

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: Bytes copied per read for tensors the adapter does not touch, and the float32 working set per merge block.
COPY_CHUNK = 4 << 20
MERGE_CHUNK = 4 << 20
#: Files that hold (unmerged) weights in another format; copying them would ship the base model's weights.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".safetensors")
_SKIPPED_DIRS = {".git", ".cache"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE", help="base model folder (safetensors checkpoint)")
    parser.add_argument("adapter", metavar="ADAPTER", help="adapter folder, as NAME=PATH or PATH")
    parser.add_argument("out", metavar="OUT", help="output folder (created; must be empty if it exists)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of a table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (plain lines are printed "
                        "when stderr is not a terminal)")


# -- reading safetensors headers --------------------------------------------------------------------------

@dataclass
class ShardHeader:
    """One safetensors file: its raw header bytes (copied verbatim) and the tensor entries."""

    file: str
    header_bytes: bytes  # the 8-byte length and the JSON header, exactly as in the file
    entries: dict[str, dict]  # name -> {"dtype", "shape", "data_offsets"}
    data_len: int

    @property
    def data_start(self) -> int:
        return len(self.header_bytes)


def _open_regular(file: str, what: str) -> int:
    try:
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise AdapterError(f"the {what} cannot be opened ({exc.strerror or type(exc).__name__}).", file=file,
                           fix="check that the folder is complete and the file readable.") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AdapterError(f"the {what} is not a regular file.", file=file, fix="replace it with the real file.")
    return fd


def read_shard_header(file: str) -> ShardHeader:
    """Header of a safetensors shard, checked against the file size; no tensor data is read."""
    def bad(problem: str) -> AdapterError:
        return AdapterError(problem, file=file, fix="the checkpoint is incomplete or damaged; download it again.")

    fd = _open_regular(file, "checkpoint shard")
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise bad(f"is {size} bytes, too short for a safetensors file.")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, 100_000_000):
            raise bad(f"its header length field says {n} bytes, but the file has {size - 8} after it.")
        text = os.pread(fd, n, 8)
    finally:
        os.close(fd)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"its header is not valid JSON ({exc}).") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object.")
    data_len = size - 8 - n
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            ok = isinstance(info["dtype"], str) and isinstance(info["shape"], list) and 0 <= start <= end <= data_len
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise bad(f"tensor {key!r} has a malformed or out-of-range header entry {info!r}.")
        entries[key] = info
    return ShardHeader(file=file, header_bytes=head + text, entries=entries, data_len=data_len)


def checkpoint_shards(base: str) -> tuple[list[str], str | None]:
    """The shard file names of ``base`` (sorted) and the index file name, or refuse a non-safetensors model."""
    index = os.path.join(base, INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AdapterError(f"cannot be read as a safetensors index ({type(exc).__name__}: {exc}).", file=index,
                               fix="restore the model's model.safetensors.index.json.") from None
        for shard in shards:
            if os.path.basename(shard) != shard or not os.path.isfile(os.path.join(base, shard)):
                raise AdapterError(f"names shard {shard!r}, which is not in the folder.", file=index,
                                   fix="the download is incomplete; fetch the missing shards.")
        return shards, INDEX_NAME
    if os.path.isfile(os.path.join(base, SINGLE_NAME)):
        return [SINGLE_NAME], None
    others = sorted(f for f in os.listdir(base) if f.endswith((".bin", ".pt", ".pth")))
    raise AdapterError(
        "holds no safetensors checkpoint (model.safetensors or model.safetensors.index.json)"
        + (f"; it has {', '.join(others[:3])}" if others else "") + ".", file=base,
        fix="merge reads and writes safetensors only: convert the checkpoint first (transformers' "
            "save_pretrained(safe_serialization=True)).")


# -- planning ---------------------------------------------------------------------------------------------

@dataclass
class MergeTarget:
    """One checkpoint weight the adapter changes."""

    key: str  # checkpoint tensor name
    module: str  # the module's name in the adapter
    shard: str
    rank: int
    alpha: float
    scaling: float


@dataclass
class MergePlan:
    base: str
    adapter: str
    adapter_path: str
    weights_file: str
    naming: str
    shards: list[str]
    index: str | None
    targets: dict[str, MergeTarget]  # by checkpoint key
    headers: dict[str, ShardHeader] = field(repr=False, default_factory=dict)
    pairs: dict = field(repr=False, default_factory=dict)  # checkpoint key -> LoraPair (specs or tensors)


_LM_HEAD_LEAVES = ("lm_head", "output")


def _ties_lm_head(base: str) -> bool | None:
    """``tie_word_embeddings`` from config.json (top level, or a VLM's text/LLM config); None when unset."""
    try:
        with open(os.path.join(base, "config.json"), encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        return None
    for section in (cfg, cfg.get("text_config"), cfg.get("llm_config")):
        if isinstance(section, dict) and isinstance(section.get("tie_word_embeddings"), bool):
            return section["tie_word_embeddings"]
    return None


def plan_merge(base: str, name: str, adapter_path: str) -> MergePlan:
    """Resolve the adapter on the checkpoint's own weights (headers only) and map it onto checkpoint keys.

    The same config reader, matcher, naming schemes and checks as serving, on a
    :class:`~lmdeploy_regex_lora.model_map.CheckpointMap`: neither LMDeploy nor torch is imported for
    a safetensors adapter (a ``.bin`` adapter needs torch to be unpickled).
    """
    from .adapter_config import read_adapter_config
    from .adapter_weights import AdapterTensors, read_adapter_specs, read_adapter_tensors
    from .model_map import NAMING_SCHEMES, CheckpointMap, rename
    from .plan import resolve_adapter

    base = os.fspath(base)
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise AdapterError("is not a model folder (no config.json).", file=base,
                           fix="pass the base model's local folder, not a Hub id.")
    shards, index = checkpoint_shards(base)
    cfg = read_adapter_config(name, adapter_path)
    tensors = read_adapter_specs(name, adapter_path) or read_adapter_tensors(name, adapter_path)
    headers = {s: read_shard_header(os.path.join(base, s)) for s in shards}
    where = {key: s for s, h in headers.items() for key in h.entries}
    model_map = CheckpointMap({key: info["shape"] for h in headers.values() for key, info in h.entries.items()})
    tied = _ties_lm_head(base)
    for module in tensors.pairs:
        if module.rsplit(".", 1)[-1] not in _LM_HEAD_LEAVES:
            continue
        present = any(rename(module, rules) in model_map.sites for _, rules in NAMING_SCHEMES)
        if tied or (not present and tied is None):
            raise AdapterError("the LM head shares its weight with the input embedding (tie_word_embeddings), "
                               "so merging a LoRA on it would change the embedding too.", adapter=name, file=base,
                               module=module, fix="serve this adapter unmerged with the plugin.")
    bare = AdapterTensors(file=tensors.file, pairs=tensors.pairs, base_copies={})
    # Every check of the adapter's content (naming, targets against tensors, ranks, shapes) is serving's.
    resolved = resolve_adapter(cfg, bare, 1, model_map)
    rules = dict(NAMING_SCHEMES)[resolved.plan.naming]

    targets: dict[str, MergeTarget] = {}
    pairs = {}
    for site_name, (m, pair) in sorted(resolved.by_site.items()):
        key = f"{site_name}.weight"
        dtype = headers[where[key]].entries[key]["dtype"]
        if dtype not in rounding.ITEMSIZE:
            raise AdapterError(f"checkpoint tensor {key!r} is {dtype} (quantized?); a LoRA delta can only be merged "
                               "into floating point weights.", adapter=name, file=base, module=m.hf_name,
                               fix="merge into the unquantized base model, then quantize the merge.")
        for half, half_key in ((pair.a, pair.a_key), (pair.b, pair.b_key)):
            _check_readable(tensors.file, half, name, m.hf_name, half_key)  # refused before anything is written
        targets[key] = MergeTarget(key, m.hf_name, where[key], m.rank, m.alpha, m.scaling)
        pairs[key] = pair
    _check_base_copies(name, tensors, rules, headers, where)
    return MergePlan(base=base, adapter=name, adapter_path=os.path.abspath(adapter_path), weights_file=tensors.file,
                     naming=resolved.plan.naming, shards=shards, index=index, targets=targets, headers=headers,
                     pairs=pairs)


def _check_base_copies(name: str, tensors, rules: tuple, headers: dict[str, ShardHeader], where: dict[str, str]
                       ) -> None:
    """Full weights saved beside the LoRA tensors must equal the checkpoint's (else the adapter changed them)."""
    from .model_map import rename

    for key, (module, tensor) in sorted(tensors.base_copies.items()):
        ck = f"{rename(module, rules)}.weight"
        same = False
        if ck in where:
            header = headers[where[ck]]
            info = header.entries[ck]
            copy = _values(tensors.file, tensor, name, module, key)
            if tuple(info["shape"]) == tuple(copy.shape) and info["dtype"] in rounding.ITEMSIZE:
                start, end = info["data_offsets"]
                base_bytes = _pread(header.file, header.data_start + start, end - start, "checkpoint shard")
                same = rounding.encode(info["dtype"], copy.ravel()).tobytes() == base_bytes
        if not same:
            raise AdapterError(f"tensor {key!r} is a full weight that differs from the base checkpoint's {ck!r} "
                               "(a resized vocabulary or modules_to_save); a LoRA merge would drop it.",
                               adapter=name, file=tensors.file, module=module,
                               fix="merge with PEFT on the transformers model (merge_and_unload), which applies it.")


# -- values -----------------------------------------------------------------------------------------------

def _pread(file: str, offset: int, length: int, what: str) -> bytes:
    fd = _open_regular(file, what)
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length:
        raise AdapterError(f"the {what} ended early while it was read (it changed or is truncated).", file=file,
                           fix="copy the file again.")
    return data


def _check_readable(file: str, tensor, adapter: str, module: str, key: str) -> None:
    """Refuse an adapter tensor in a dtype :mod:`.rounding` cannot decode (float8), naming it."""
    from .adapter_weights import TensorSpec

    if isinstance(tensor, TensorSpec) and tensor.dtype not in rounding.ITEMSIZE:
        raise AdapterError(f"tensor {key!r} is {tensor.dtype}; merge reads F64, F32, F16 and BF16 LoRA weights.",
                           adapter=adapter, file=file, module=module,
                           fix="save the adapter in float32 or bfloat16, or serve it with the plugin.")


def _values(file: str, tensor, adapter: str, module: str, key: str):
    """One adapter tensor as a float64 numpy array: read at its header offsets, or converted from torch
    (a ``.bin`` adapter); NaN or Inf is refused, naming the tensor."""
    import numpy as np

    from .adapter_weights import NON_FINITE_FIX, NON_FINITE_PROBLEM, TensorSpec

    _check_readable(file, tensor, adapter, module, key)
    if isinstance(tensor, TensorSpec):
        values = rounding.decode(tensor.dtype, _pread(file, tensor.offset, tensor.nbytes, "adapter weights file"))
        values = values.reshape(tensor.shape)
    else:
        values = tensor.detach().to("cpu").double().numpy()
    if not np.isfinite(values).all():
        raise AdapterError(f"tensor {key!r} {NON_FINITE_PROBLEM}", adapter=adapter, file=file, module=module,
                           fix=NON_FINITE_FIX)
    return values


# -- streaming --------------------------------------------------------------------------------------------

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


def _merge_rows(src, dst, key: str, info: dict, a, b, scaling: float, where: tuple[str, str, str],
                tick: Callable[[int], None]) -> None:
    """Write ``W + scaling * B @ A`` for one weight, a block of rows at a time, rounded once to the weight's dtype.

    Computed in float64 (``a`` and ``b`` are float64 already), so the result is the nearest value of
    the dtype to the exact sum, whatever BLAS the machine has. A value that overflows the dtype where
    the base weight ``key`` was finite is refused (``where``: adapter, file, module), never written as Inf.
    """
    import numpy as np

    code = info["dtype"]
    out_f, in_f = info["shape"]
    itemsize = rounding.ITEMSIZE[code]
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
    targets = sorted((header.entries[k]["data_offsets"][0], k) for k, t in plan.targets.items() if t.shard == shard)
    buf = memoryview(bytearray(COPY_CHUNK))
    with open(header.file, "rb", buffering=0) as src, open(out_file, "wb") as dst:
        dst.write(header.header_bytes)
        tick(len(header.header_bytes))
        src.seek(header.data_start)
        pos = 0
        for start, key in targets:
            _copy_range(src, dst, start - pos, buf, tick)
            info = header.entries[key]
            target, pair = plan.targets[key], plan.pairs[key]
            a = _values(plan.weights_file, pair.a, plan.adapter, target.module, pair.a_key)
            b = _values(plan.weights_file, pair.b, plan.adapter, target.module, pair.b_key)
            _merge_rows(src, dst, key, info, a, b, target.scaling, (plan.adapter, plan.weights_file, target.module),
                        tick)
            pos = info["data_offsets"][1]
        _copy_range(src, dst, header.data_len - pos, buf, tick)
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
    total = sum(h.data_len + h.data_start for h in plan.headers.values())
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


def render(summary: dict) -> str:
    lines = [f"merged adapter {summary['adapter']!r} ({summary['adapter_path']}) into {summary['base']}",
             f"  module names: {summary['naming']}"]
    rows = [{"name": m["module"], "rank": m["rank"], "alpha": m["alpha"], "scaling": m["scaling"],
             "key": m["key"]} for m in summary["modules"]]
    groups = cc.group_rows(rows, "name", ["rank", "alpha", "scaling"], ["key"])
    lines.append(cc.table(["MODULES", "N", "RANK", "ALPHA", "SCALING", "CHECKPOINT TENSOR"],
                          [[g.pattern, len(g.names), g.values["rank"], cc.fmt_num(g.values["alpha"]),
                            cc.fmt_num(g.values["scaling"]), g.values["key"]] for g in groups],
                          indent="    ", right=(1, 2, 3, 4)))
    lines.append(cc.table(["SHARD", "TENSORS", "MERGED", "MIB"],
                          [[s["file"], s["tensors"], s["merged"], f"{s['bytes'] / 2**20:.1f}"]
                           for s in summary["shards"]], indent="    ", right=(1, 2, 3)))
    lines.append(f"  copied {len(summary['copied'])} other file(s)"
                 + (f"; index {summary['index']} kept as is" if summary["index"] else ""))
    if summary["not_copied"]:
        lines.append(f"  not copied (weights in another format, or caches): {', '.join(summary['not_copied'])}")
    lines.append(f"wrote {summary['out']} in {summary['seconds']:.1f} s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    adapters = cc.parse_adapters([args.adapter])
    (name, path), = adapters.items()
    summary = merge_checkpoint(args.base, path, args.out, name=name, progress=not args.no_progress and not args.json)
    if args.json:
        cc.print_json(summary)
    else:
        cc.emit(render(summary))
    return cc.OK
