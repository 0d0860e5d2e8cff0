"""The one reader of untrusted files and safetensors headers, and the one dtype table.

Adapters come from training jobs, colleagues and hubs, base checkpoints from downloads that may be
incomplete, so every file is read the same careful way, whoever asks (the serving path, ``merge``,
the config's bias check, ``verify``):

* :func:`open_regular` opens non-blocking and checks the *open descriptor* is a regular file, so a
  FIFO or device never hangs the process and no path swapped in between is read;
* :func:`read_header` checks a safetensors header against the bytes really there before anything is
  decoded: a length field claiming gigabytes is refused, never allocated; names must be unique UTF-8;
  every entry's byte range must fit the file and match ``shape x itemsize``; the tensors must follow
  each other without gap, overlap or bytes left over (what the safetensors library itself refuses);
* :func:`read_range` reads the bytes of one tensor at its offsets, refusing a file that shrank.

Nothing here imports torch or numpy at module level: ``merge`` reads checkpoints without either.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import AdapterError, Blame

if TYPE_CHECKING:
    import torch

#: safetensors' own limit on the JSON header (``MAX_HEADER_SIZE`` in the Rust crate).
MAX_HEADER = 100_000_000

#: The fix for a file that is cut short or damaged on disk.
DAMAGED_FIX = "the upload or copy is incomplete or damaged; copy the file again."


@dataclass(frozen=True)
class DType:
    """One safetensors dtype code: its size, torch name, numpy decoding and precision."""

    code: str
    itemsize: int
    torch_name: str | None  # attribute of ``torch``; None where no torch has it
    numpy_name: str | None  # little-endian numpy dtype; None where numpy has none (BF16 is decoded by bits)
    significand_bits: int | None  # with the implicit one; None for non-float codes
    floating: bool = False


#: Every dtype code the safetensors format defines.
DTYPES: dict[str, DType] = {d.code: d for d in (
    DType("F64", 8, "float64", "<f8", 53, True),
    DType("F32", 4, "float32", "<f4", 24, True),
    DType("F16", 2, "float16", "<f2", 11, True),
    DType("BF16", 2, "bfloat16", None, 8, True),
    DType("F8_E4M3", 1, "float8_e4m3fn", None, 4, True),
    DType("F8_E5M2", 1, "float8_e5m2", None, 3, True),
    DType("F8_E8M0", 1, "float8_e8m0fnu", None, 1),
    DType("I64", 8, "int64", "<i8", None),
    DType("I32", 4, "int32", "<i4", None),
    DType("I16", 2, "int16", "<i2", None),
    DType("I8", 1, "int8", "i1", None),
    DType("U64", 8, "uint64", "<u8", None),
    DType("U32", 4, "uint32", "<u4", None),
    DType("U16", 2, "uint16", "<u2", None),
    DType("U8", 1, "uint8", "u1", None),
    DType("BOOL", 1, "bool", "?", None),
    DType("C64", 8, "complex64", "<c8", None),
)}

#: Floating point codes a LoRA weight may have (float8 included: it is read, then refused or converted).
FLOAT_CODES = frozenset(code for code, d in DTYPES.items() if d.floating)
#: Codes merge decodes with numpy (and :mod:`lmdeploy_regex_lora.merge.rounding` rounds to).
MERGEABLE_CODES = frozenset({"F64", "F32", "F16", "BF16"})


def torch_dtypes() -> dict[str, torch.dtype]:
    """Code -> torch dtype, for every code this torch knows."""
    import torch

    return {code: getattr(torch, d.torch_name) for code, d in DTYPES.items()
            if d.torch_name and isinstance(getattr(torch, d.torch_name, None), torch.dtype)}


# -- files ------------------------------------------------------------------------------------------------

def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def os_error(file: str, exc: OSError, what: str, adapter: str | None = None) -> AdapterError:
    """An :class:`AdapterError` for a failed ``open``/``stat`` of ``file``, with the usual cause as the fix."""
    if isinstance(exc, FileNotFoundError):
        problem = f"the {what} does not exist" + (" (it is a link whose target is missing)"
                                                   if os.path.islink(file) else "") + "."
        fix = ("download or copy the adapter again; in a Hugging Face cache a link into blobs/ without its blob "
               "means an interrupted download.")
    elif isinstance(exc, PermissionError):
        problem = f"permission denied reading the {what}."
        fix = "make the folder and its files readable (and the folder searchable) by the user the server runs as."
    elif exc.errno == errno.ELOOP:
        problem = f"the {what} is a loop of symbolic links."
        fix = "point the links at the real files."
    elif exc.errno == errno.ENXIO:
        problem = f"the {what} is a socket or a device, not a regular file."
        fix = "replace it with the real file."
    else:
        problem = f"the {what} cannot be opened ({exc.strerror or type(exc).__name__})."
        fix = "check the file and the disk."
    return AdapterError(problem, adapter=adapter, file=file, fix=fix)


def open_regular(file: str, *, what: str, adapter: str | None = None, limit: int | None = None) -> tuple[int, int]:
    """An open descriptor of ``file`` and its size; the file must be a regular file (links followed).

    ``O_NONBLOCK`` makes ``open`` return at once on a FIFO without writer, and the check runs on the
    open descriptor (``fstat``), so no path swapped in between can make a read block or hit a device.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(file, flags)
    except OSError as exc:
        raise os_error(file, exc, what, adapter) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AdapterError(f"the {what} is {_kind(st.st_mode)}, not a regular file.", adapter=adapter, file=file,
                               fix=f"replace it with the real {what}.")
        if limit is not None and st.st_size > limit:
            raise AdapterError(f"the {what} is {st.st_size} bytes, more than the {limit} this file can need.",
                               adapter=adapter, file=file, fix=f"restore the {what} written by the training run.")
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError):
            raise os_error(file, exc, what, adapter) from None
        raise
    return fd, st.st_size


def changed_size(file: str, what: str, adapter: str | None = None) -> AdapterError:
    return AdapterError(f"the {what} changed size while it was read.", adapter=adapter, file=file,
                        fix="wait until the copy or download has finished, then start the server.")


def read_regular_file(file: str, *, what: str, adapter: str | None = None, limit: int | None = None) -> bytes:
    """The bytes of ``file``, which must be a regular file (see :func:`open_regular`)."""
    fd, size = open_regular(file, what=what, adapter=adapter, limit=limit)
    try:
        chunks, left = [], size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if left or os.read(fd, 1):
            raise changed_size(file, what, adapter)
        return b"".join(chunks)
    except OSError as exc:
        raise os_error(file, exc, what, adapter) from None
    finally:
        os.close(fd)


def read_range(file: str, offset: int, length: int, *, what: str, adapter: str | None = None) -> bytes:
    """``length`` bytes of ``file`` from ``offset``; a file that ends early (it changed) is refused."""
    fd, _ = open_regular(file, what=what, adapter=adapter)
    try:
        data = os.pread(fd, length, offset)
    except OSError as exc:
        raise os_error(file, exc, what, adapter) from None
    finally:
        os.close(fd)
    if len(data) != length:
        raise AdapterError(f"the {what} ended early while it was read (it changed or is truncated).",
                           adapter=adapter, file=file, fix="copy the file again.")
    return data


def map_regular_file(file: str, *, what: str, adapter: str | None = None) -> torch.Tensor:
    """The bytes of ``file`` (a regular file, see :func:`open_regular`) as a uint8 tensor mapping it.

    Mapped, not read: tensors become views of the page cache and the only copy is the one into the
    LoRA slots, as with LMDeploy's own ``safe_open``. The mapping is made from the descriptor that was
    checked and is copy-on-write, so nothing written to a tensor reaches the file. A file truncated
    while its bytes are copied can still end the process with ``SIGBUS``, as it would LMDeploy's loader.
    """
    import mmap

    import torch

    fd, size = open_regular(file, what=what, adapter=adapter)
    try:
        if size == 0:
            return torch.empty(0, dtype=torch.uint8)
        mapping = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError):
            raise os_error(file, exc, what, adapter) from None
        raise AdapterError(f"the {what} cannot be mapped ({exc}).", adapter=adapter, file=file,
                           fix="check the file and the disk.") from None
    finally:
        os.close(fd)
    return torch.frombuffer(mapping, dtype=torch.uint8)  # holds the mapping until its last view is gone


def recheck_size(file: str, size: int, *, what: str, adapter: str | None = None) -> None:
    """Refuse a file whose size is no longer ``size`` (a copy or download still running)."""
    try:
        now = os.stat(file).st_size
    except OSError as exc:
        raise os_error(file, exc, what, adapter) from None
    if now != size:
        raise changed_size(file, what, adapter)


# -- safetensors headers ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: dtype code, shape, and its bytes as absolute file offsets."""

    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A checked safetensors header: entries in header order, and the raw bytes (length field + JSON)."""

    file: str
    entries: dict[str, Entry]
    metadata: dict | None
    raw: bytes
    size: int  # of the whole file

    @property
    def data_start(self) -> int:
        return len(self.raw)

    @property
    def data_len(self) -> int:
        return self.size - self.data_start


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the name {key!r} appears twice")
        out[key] = value
    return out


def _well_formed(info: object) -> bool:
    def ints(values: object, n: int | None = None) -> bool:
        return isinstance(values, list) and (n is None or len(values) == n) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in values)

    return isinstance(info, dict) and isinstance(info.get("dtype"), str) and ints(info.get("shape")) \
        and all(d >= 0 for d in info["shape"]) and ints(info.get("data_offsets"), 2)


def parse_header(data: bytes | memoryview, file: str, *, adapter: str | None = None) -> Header:
    """Check the header at the start of ``data`` (the whole file, or at least its header) against ``size``.

    ``data`` may be a memory map: only the length field and the header are sliced out of it.
    """
    bad = Blame(adapter, file)
    size = len(data)
    if size < 8:
        raise bad(f"is {size} bytes long, shorter than the 8-byte header length a safetensors file starts "
                  "with (truncated).", DAMAGED_FIX)
    length = int.from_bytes(bytes(data[:8]), "little")
    if length > size - 8:
        raise bad(f"its header length field says {length} bytes, but only {size - 8} bytes follow (truncated, or "
                  "not a safetensors file).", DAMAGED_FIX, field="header length")
    if length > MAX_HEADER:
        raise bad(f"its header claims {length} bytes, more than safetensors allows ({MAX_HEADER}).", DAMAGED_FIX,
                  field="header length")
    raw = bytes(data[:8 + length])
    try:
        text = raw[8:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(f"its header is not UTF-8 (byte {exc.start}); tensor names must be UTF-8.", DAMAGED_FIX,
                  field="header") from None
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise bad("its header nests JSON too deeply.", DAMAGED_FIX, field="header") from None
    except ValueError as exc:
        raise bad(f"its header is not valid JSON ({exc}).", DAMAGED_FIX, field="header") from None
    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object of tensors.", DAMAGED_FIX,
                  field="header")
    return Header(file=file, entries=_entries(header, 8 + length, size, bad), metadata=header.get("__metadata__"),
                  raw=raw, size=size)


def _entries(header: dict, data_start: int, size: int, bad: Blame) -> dict[str, Entry]:
    data_len = size - data_start
    entries: dict[str, Entry] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not _well_formed(info):
            raise bad(f"tensor {key!r} has a malformed entry {info!r}.", DAMAGED_FIX, field=key)
        start, end = info["data_offsets"]
        if not 0 <= start <= end <= data_len:
            raise bad(f"tensor {key!r} claims bytes {start}..{end} of a {data_len}-byte data section "
                      "(truncated or damaged).", DAMAGED_FIX, field=key)
        dtype = DTYPES.get(info["dtype"])
        if dtype is not None and math.prod(info["shape"]) * dtype.itemsize != end - start:
            raise bad(f"tensor {key!r} ({info['dtype']}, shape {info['shape']}) needs "
                      f"{math.prod(info['shape']) * dtype.itemsize} bytes but its data_offsets span {end - start}.",
                      DAMAGED_FIX, field=key)
        entries[key] = Entry(info["dtype"], tuple(info["shape"]), data_start + start, end - start)
    return entries


def check_layout(header: Header, *, adapter: str | None = None, known: object = DTYPES) -> list[tuple[str, Entry]]:
    """The entries in file order, refusing what the safetensors library refuses: dtypes not in ``known``,
    a ``__metadata__`` that is not text to text, gaps or overlaps between tensors, bytes left over."""
    bad = Blame(adapter, header.file)
    fix = "the upload or copy is probably incomplete or damaged; copy the file again."
    meta = header.metadata
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise bad("cannot be read as safetensors (__metadata__ must map names to strings).", fix)
    ordered = sorted(header.entries.items(), key=lambda kv: (kv[1].offset, kv[1].offset + kv[1].nbytes))
    expected = header.data_start
    for key, entry in ordered:
        if entry.dtype not in known:
            raise bad(f"cannot be read as safetensors (tensor {key!r} has the unknown dtype {entry.dtype!r}).", fix)
        if entry.offset != expected:
            start, end = entry.offset - header.data_start, expected - header.data_start
            raise bad(f"cannot be read as safetensors (tensor {key!r} starts at byte {start} of the data section, "
                      f"the previous tensor ends at {end}; tensors must follow each other without gap or "
                      "overlap).", fix)
        expected = entry.offset + entry.nbytes
    if expected != header.size:
        raise bad(f"cannot be read as safetensors (the tensors end at byte {expected - header.data_start} of a "
                  f"{header.data_len}-byte data section).", fix)
    return ordered


def read_header(file: str, *, what: str = "weights file", adapter: str | None = None) -> Header:
    """The checked header of the safetensors ``file``; no tensor data is read.

    The file is mapped, not read: only the pages of the length field and the header are touched.
    """
    import mmap

    fd, size = open_regular(file, what=what, adapter=adapter)
    try:
        if size < 8:
            return parse_header(os.read(fd, 8), file, adapter=adapter)
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as view:
            return parse_header(view, file, adapter=adapter)  # type: ignore[arg-type]
    finally:
        os.close(fd)
