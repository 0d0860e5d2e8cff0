"""Reading an adapter's tensors: safetensors first, a pickle only after a scan and through ``weights_only``.

The tensors are the ground truth of what was trained: module names and ranks come from here.

Files come from training jobs, colleagues and hubs, so nothing here trusts them: every file is
opened non-blocking and checked to be a regular file on the open descriptor (a FIFO or device
never hangs the server, and a swapped path cannot slip through between check and read); the
safetensors header is checked against the real file size before anything is decoded (a header
length field claiming gigabytes is refused, never allocated); a ``.bin`` must be a PyTorch zip
archive whose pickle imports nothing but tensor-rebuilding functions, checked opcode by opcode
without running it, and is then loaded with ``torch.load(weights_only=True)``. When
``adapter_model.safetensors`` exists in any form, ``adapter_model.bin`` is never opened.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import pickletools
import stat
import sys
import zipfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import AdapterError, printable

if TYPE_CHECKING:  # torch is imported where tensors are made: read_adapter_specs (merge) never needs it
    import torch

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

#: safetensors' own limit on the JSON header (``MAX_HEADER_SIZE`` in the Rust crate).
MAX_SAFETENSORS_HEADER = 100_000_000
#: The pickle inside a ``.bin`` only lists tensors; the data lives in separate zip entries.
MAX_PICKLE_BYTES = 64 << 20

_SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "C64": 8,
}

#: Floating point safetensors dtypes (a LoRA weight is never anything else) -> torch dtype names.
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}

# What torch.save writes for a dict of tensors; anything else in a pickle could run code.
_PICKLE_GLOBALS = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
                   ("torch._utils", "_rebuild_tensor")}
# Opcodes that import or call without a GLOBAL we can read (STACK_GLOBAL takes its name from the stack).
_PICKLE_REFUSED_OPS = {"STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"}

_UNSAFE_PICKLE_FIX = ("do not load this file anywhere; if the adapter is yours, convert it to "
                      "adapter_model.safetensors in a trusted environment (or save it again with PEFT).")


@dataclass
class LoraPair:
    """``lora_A`` (r x in) and ``lora_B`` (out x r) of one module, under the name the trainer's model used."""

    module: str
    a: torch.Tensor
    b: torch.Tensor
    a_key: str
    b_key: str

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the safetensors header describes it, without torch: what planning needs, and where the
    bytes are. ``merge`` plans from these and reads the values itself, so it never imports torch."""

    dtype: str  # safetensors code: F32, BF16, ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class AdapterTensors:
    file: str
    pairs: dict[str, LoraPair]
    #: Full weights saved next to the LoRA tensors (PEFT's ``save_embedding_layers`` writes the LM head /
    #: embedding as ``<module>.base_layer.weight``): key -> (module name, tensor). They change nothing
    #: when they equal the served model's weights; the plan checks that.
    base_copies: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)


# -- files ------------------------------------------------------------------------------------------------

def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def os_error(name: str, file: str, exc: OSError, what: str) -> AdapterError:
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
    return AdapterError(problem, adapter=name, file=file, fix=fix)


def _open_regular(name: str, file: str, *, what: str, limit: int | None = None) -> tuple[int, int]:
    """An open descriptor of ``file`` and its size; the file must be a regular file (links followed).

    ``O_NONBLOCK`` makes ``open`` return at once on a FIFO without writer, and the check runs on the
    open descriptor (``fstat``), so no path swapped in between can make the read block or hit a device.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(file, flags)
    except OSError as exc:
        raise os_error(name, file, exc, what) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AdapterError(f"the {what} is {_kind(st.st_mode)}, not a regular file.", adapter=name, file=file,
                               fix=f"replace it with the real {what}.")
        if limit is not None and st.st_size > limit:
            raise AdapterError(f"the {what} is {st.st_size} bytes, more than the {limit} this file can need.",
                               adapter=name, file=file, fix=f"restore the {what} written by the training run.")
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError):
            raise os_error(name, file, exc, what) from None
        raise
    return fd, st.st_size


def _changed_size(name: str, file: str, what: str) -> AdapterError:
    return AdapterError(f"the {what} changed size while it was read.", adapter=name, file=file,
                        fix="wait until the copy or download has finished, then start the server.")


def read_regular_file(name: str, file: str, *, what: str, limit: int | None = None) -> bytes:
    """The bytes of ``file``, which must be a regular file (see :func:`_open_regular`)."""
    fd, size = _open_regular(name, file, what=what, limit=limit)
    try:
        chunks, left = [], size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if left or os.read(fd, 1):
            raise _changed_size(name, file, what)
        return b"".join(chunks)
    except OSError as exc:
        raise os_error(name, file, exc, what) from None
    finally:
        os.close(fd)


def map_regular_file(name: str, file: str, *, what: str) -> torch.Tensor:
    """The bytes of ``file`` (a regular file, see :func:`_open_regular`) as a uint8 tensor mapping it.

    Mapped, not read: the adapter's tensors become views of the page cache and the only copy is the
    one into the LoRA slots, as with LMDeploy's own ``safe_open`` (reading into memory first cost a
    copy and a page fault per 4 KiB, ~40 % of a load). The mapping is made from the descriptor that
    was checked, so no path swapped in between is mapped; it is copy-on-write, so nothing written to
    a tensor reaches the file. The file's size is checked again once everything is decoded; a file
    truncated while its bytes are copied can still end the process with ``SIGBUS``, as it would
    LMDeploy's loader, and the slots are checked for NaN/Inf after they are filled.
    """
    import mmap

    import torch

    fd, size = _open_regular(name, file, what=what)
    try:
        if size == 0:
            return torch.empty(0, dtype=torch.uint8)
        mapping = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError):
            raise os_error(name, file, exc, what) from None
        raise AdapterError(f"the {what} cannot be mapped ({exc}).", adapter=name, file=file,
                           fix="check the file and the disk.") from None
    finally:
        os.close(fd)
    return torch.frombuffer(mapping, dtype=torch.uint8)  # holds the mapping until its last view is gone


def _recheck_size(name: str, file: str, raw: torch.Tensor, what: str) -> None:
    """Refuse a file whose size changed since it was mapped (a copy or download still running)."""
    try:
        size = os.stat(file).st_size
    except OSError as exc:
        raise os_error(name, file, exc, what) from None
    if size != raw.numel():
        raise _changed_size(name, file, what)


def _listing(path: str, limit: int = 8) -> str:
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return "cannot be listed"
    if not names:
        return "is empty"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return "holds " + ", ".join(printable(n) for n in names[:limit]) + more


def find_weights_file(name: str, path: str) -> str:
    """Pick the weights file; safetensors wins so a pickle next to it is never opened.

    ``lstat``, not ``isfile``: a broken safetensors link (an interrupted Hub download) must be reported, not
    replaced by the pickle next to it.
    """
    for candidate in (SAFETENSORS_NAME, BIN_NAME):
        file = os.path.join(path, candidate)
        try:
            os.lstat(file)
        except FileNotFoundError:
            continue
        except OSError:
            pass  # there, but not accessible: reading it reports why
        return file
    listing = _listing(path)
    fix = "copy the adapter's weights file next to adapter_config.json."
    if os.path.lexists(os.path.join(path, "model.safetensors")) or \
            os.path.lexists(os.path.join(path, "model.safetensors.index.json")):
        fix = "this folder looks like a full (merged) model, not a LoRA adapter: serve it as the model instead."
    raise AdapterError(f"neither {SAFETENSORS_NAME} nor {BIN_NAME} is there (the folder {listing}).", adapter=name,
                       file=path, fix=fix)


# -- safetensors ------------------------------------------------------------------------------------------

def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the name {key!r} appears twice")
        out[key] = value
    return out


def check_safetensors_header(name: str, file: str, data: bytes) -> dict:
    """Check the header against the bytes really there, before any decoding; return it."""
    def bad(problem: str, fix: str = "the upload or copy is incomplete or damaged; copy the file again.",
            field_: str | None = None) -> AdapterError:
        return AdapterError(problem, adapter=name, file=file, field=field_, fix=fix)

    if len(data) < 8:
        raise bad(f"is {len(data)} bytes long, shorter than the 8-byte header length a safetensors file starts "
                  "with (truncated).")
    size = int.from_bytes(bytes(data[:8]), "little")
    body = len(data) - 8
    if size > body:
        raise bad(f"its header length field says {size} bytes, but only {body} bytes follow (truncated, or not a "
                  "safetensors file).", field_="header length")
    if size > MAX_SAFETENSORS_HEADER:
        raise bad(f"its header claims {size} bytes, more than safetensors allows ({MAX_SAFETENSORS_HEADER}).",
                  field_="header length")
    try:
        text = bytes(data[8:8 + size]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(f"its header is not UTF-8 (byte {exc.start}); tensor names must be UTF-8.",
                  field_="header") from None
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise bad("its header nests JSON too deeply.", field_="header") from None
    except ValueError as exc:
        raise bad(f"its header is not valid JSON ({exc}).", field_="header") from None
    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object of tensors.", field_="header")
    data_len = body - size
    for key, info in header.items():
        if key == "__metadata__":
            continue
        ok = isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list) \
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"]) \
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2 \
            and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"])
        if not ok:
            raise bad(f"tensor {key!r} has a malformed entry {info!r}.", field_=key)
        start, end = info["data_offsets"]
        if not 0 <= start <= end <= data_len:
            raise bad(f"tensor {key!r} claims bytes {start}..{end} of a {data_len}-byte data section "
                      "(truncated or damaged).", field_=key)
        itemsize = _SAFETENSORS_ITEMSIZE.get(info["dtype"])
        if itemsize is not None:
            count = 1
            for d in info["shape"]:
                count *= d
            if count * itemsize != end - start:
                raise bad(f"tensor {key!r} ({info['dtype']}, shape {info['shape']}) needs {count * itemsize} bytes "
                          f"but its data_offsets span {end - start}.", field_=key)
    return header


def _tensor_dtypes() -> dict[str, torch.dtype]:
    """Every safetensors dtype this torch has, so that a non-float tensor is refused by its dtype name."""
    import torch

    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
             "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "I64": "int64", "I32": "int32", "I16": "int16",
             "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
             "C64": "complex64"}
    return {st: getattr(torch, t) for st, t in names.items() if isinstance(getattr(torch, t, None), torch.dtype)}


def _load_safetensors(name: str, file: str, raw: torch.Tensor) -> dict[str, torch.Tensor]:
    """The file's tensors as views of ``raw`` (its bytes), after every check ``safetensors.load`` makes.

    :func:`check_safetensors_header` runs first, on the header alone; then what the safetensors
    library itself refuses (unknown dtypes, a ``__metadata__`` that is not text to text, gaps or
    overlaps between tensors, bytes left over) is refused here with the same message as before.
    """
    data = memoryview(raw.numpy()) if raw.numel() else memoryview(b"")
    header = check_safetensors_header(name, file, data)

    def unreadable(reason: str) -> AdapterError:
        return AdapterError(f"cannot be read as safetensors ({reason}).", adapter=name, file=file,
                            fix="the upload or copy is probably incomplete or damaged; copy the file again.")

    if sys.byteorder != "little":  # safetensors stores little-endian; let the library swap bytes
        from safetensors.torch import load

        try:
            return load(bytes(data))
        except Exception as exc:  # safetensors raises several types for damaged files
            raise unreadable(f"{type(exc).__name__}: {exc}") from None
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise unreadable("__metadata__ must map names to strings")
    dtypes = _tensor_dtypes()
    base = 8 + int.from_bytes(bytes(data[:8]), "little")
    out: dict[str, torch.Tensor] = {}
    for key, info in _laid_out(name, file, header, len(data) - base, dtypes):
        start, end = info["data_offsets"]
        dtype = dtypes[info["dtype"]]
        flat = raw[base + start:base + end]
        if (base + start) % dtype.itemsize:  # a view must be aligned to its element size
            flat = flat.clone()
        out[key] = flat.view(dtype).reshape(info["shape"])
    return out


def _laid_out(name: str, file: str, header: dict, data_len: int, known: object) -> list[tuple[str, dict]]:
    """The entries in file order, refusing what the safetensors library refuses: unknown dtypes (not in
    ``known``), gaps or overlaps between tensors, bytes left over."""
    def unreadable(reason: str) -> AdapterError:
        return AdapterError(f"cannot be read as safetensors ({reason}).", adapter=name, file=file,
                            fix="the upload or copy is probably incomplete or damaged; copy the file again.")

    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                     key=lambda kv: tuple(kv[1]["data_offsets"]))
    expected = 0
    for key, info in entries:
        if info["dtype"] not in known:
            raise unreadable(f"tensor {key!r} has the unknown dtype {info['dtype']!r}")
        start, end = info["data_offsets"]
        if start != expected:
            raise unreadable(f"tensor {key!r} starts at byte {start} of the data section, the previous tensor ends "
                             f"at {expected} (tensors must follow each other without gap or overlap)")
        expected = end
    if expected != data_len:
        raise unreadable(f"the tensors end at byte {expected} of a {data_len}-byte data section")
    return entries


# -- pickle (.bin) ----------------------------------------------------------------------------------------

def _allowed_global(module: str, qualname: str) -> bool:
    if (module, qualname) in _PICKLE_GLOBALS:
        return True
    # torch.FloatStorage, torch.BFloat16Storage, ... and dtype objects (torch.float32).
    import torch

    return module == "torch" and qualname.isidentifier() and (
        qualname.endswith("Storage") or isinstance(getattr(torch, qualname, None), torch.dtype))


def scan_pickle(name: str, file: str, payload: bytes) -> None:
    """Refuse a pickle that would import anything but tensor rebuilding, without running any of it."""
    try:
        for op, arg, pos in pickletools.genops(payload):
            if op.name == "GLOBAL":
                module, _, qualname = str(arg).partition(" ")
                if not _allowed_global(module, qualname):
                    raise AdapterError(f"its pickle would import and call {module}.{qualname} (opcode at byte {pos})"
                                       "; refused before unpickling, nothing in it was run.", adapter=name,
                                       file=file, field="pickle", fix=_UNSAFE_PICKLE_FIX)
            elif op.name in _PICKLE_REFUSED_OPS:
                raise AdapterError(f"its pickle uses opcode {op.name} (byte {pos}), which can import arbitrary code; "
                                   "refused before unpickling, nothing in it was run.", adapter=name, file=file,
                                   field="pickle", fix=_UNSAFE_PICKLE_FIX)
    except AdapterError:
        raise
    except Exception as exc:  # pickletools raises ValueError on damaged streams
        raise AdapterError(f"its pickle is damaged ({exc}).", adapter=name, file=file, field="pickle",
                           fix="the file is incomplete or not a PyTorch checkpoint; save the adapter again.") from None


def _load_bin(name: str, file: str, data: bytes) -> dict[str, torch.Tensor]:
    import torch

    stream = io.BytesIO(data)
    if not zipfile.is_zipfile(stream):
        raise AdapterError("is not a PyTorch zip archive (what torch.save writes since PyTorch 1.6); raw and legacy "
                           "pickles are refused because they cannot be checked before they run.", adapter=name,
                           file=file, fix=_UNSAFE_PICKLE_FIX)
    try:
        with zipfile.ZipFile(stream) as archive:
            records = [i for i in archive.infolist() if i.filename.endswith("data.pkl")]
            if len(records) != 1:
                raise AdapterError(f"holds {len(records)} data.pkl records; a PyTorch checkpoint has exactly one.",
                                   adapter=name, file=file, fix="save the adapter again.")
            if records[0].file_size > MAX_PICKLE_BYTES:
                raise AdapterError(f"its pickle claims {records[0].file_size} bytes; a list of tensors never needs "
                                   f"more than {MAX_PICKLE_BYTES}.", adapter=name, file=file, field="pickle",
                                   fix=_UNSAFE_PICKLE_FIX)
            with archive.open(records[0]) as fh:
                payload = fh.read(MAX_PICKLE_BYTES + 1)
    except AdapterError:
        raise
    except Exception as exc:  # zipfile: BadZipFile, CRC errors, truncated members
        raise AdapterError(f"is a damaged zip archive ({type(exc).__name__}: {exc}).", adapter=name, file=file,
                           fix="the upload or copy is incomplete; copy the file again.") from None
    scan_pickle(name, file, payload)
    try:
        stream.seek(0)
        return torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses any pickle that would run code
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise AdapterError(f"cannot be loaded safely ({type(exc).__name__}: {first}).", adapter=name, file=file,
                           fix="convert it to adapter_model.safetensors from a trusted environment.") from None


def _read_header(name: str, file: str) -> tuple[dict, int, int]:
    """The checked safetensors header, where its data section starts and the file's size; no tensor data is read.

    The file is mapped, not read: :func:`check_safetensors_header` slices only the length field and
    the header out of the mapping, so only those pages are ever touched.
    """
    import mmap

    if not file.endswith(".safetensors"):
        raise AdapterError(f"only {SAFETENSORS_NAME} can be read without loading tensors; a .bin is a pickle that "
                           "must be unpickled to list its tensors.", adapter=name, file=file,
                           fix="convert the adapter to adapter_model.safetensors (or check it with a command that "
                               "loads it, e.g. `lmdeploy-regex-lora verify`).")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(file, flags)
    except OSError as exc:
        raise os_error(name, file, exc, "weights file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AdapterError(f"the weights file is {_kind(st.st_mode)}, not a regular file.", adapter=name,
                               file=file, fix="replace it with the real weights file.")
        if st.st_size < 8:
            header = check_safetensors_header(name, file, os.read(fd, 8))
        else:
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as view:
                header = check_safetensors_header(name, file, view)  # type: ignore[arg-type]
                start = 8 + int.from_bytes(view[:8], "little")
    finally:
        os.close(fd)
    return header, start, st.st_size


def _float_entries(name: str, file: str, header: dict):
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in FLOAT_DTYPES:
            raise AdapterError(f"tensor {key!r} has dtype {info['dtype']}, not a floating point type.",
                               adapter=name, file=file, field=key, fix="save the adapter again with PEFT.")
        yield key, info


def _load_headers(name: str, file: str) -> dict[str, torch.Tensor]:
    """``meta`` tensors (dtype and shape) from a safetensors header; no tensor data is read."""
    import torch

    header, _, _ = _read_header(name, file)
    return {key: torch.empty(info["shape"], dtype=getattr(torch, FLOAT_DTYPES[info["dtype"]]), device="meta")
            for key, info in _float_entries(name, file, header)}


def _load_specs(name: str, file: str) -> dict[str, TensorSpec]:
    """:class:`TensorSpec` per tensor, after the same layout checks as a full read; torch is not imported."""
    header, start, size = _read_header(name, file)
    _laid_out(name, file, header, size - start, _SAFETENSORS_ITEMSIZE)
    return {key: TensorSpec(info["dtype"], tuple(info["shape"]), start + info["data_offsets"][0],
                            info["data_offsets"][1] - info["data_offsets"][0])
            for key, info in _float_entries(name, file, header)}


def _load_raw(name: str, file: str) -> dict[str, torch.Tensor]:
    import torch

    if file.endswith(".safetensors"):
        raw = map_regular_file(name, file, what="weights file")
        tensors = _load_safetensors(name, file, raw)
        _recheck_size(name, file, raw, "weights file")
        return tensors
    state = _load_bin(name, file, read_regular_file(name, file, what="weights file"))
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise AdapterError("does not hold a flat mapping of names to tensors.", adapter=name, file=file,
                           fix="save the adapter with PEFT's save_pretrained.")
    return state


# -- pairing ----------------------------------------------------------------------------------------------

def _refusal_for_key(key: str) -> str | None:
    leaf = key.rsplit(".", 1)[-1]
    if "lora_embedding_A" in key or "lora_embedding_B" in key:
        return "LoRA on an embedding layer is not supported by LMDeploy's LoRA slots"
    if "lora_magnitude_vector" in key:
        return "DoRA magnitude vectors are not an additive LoRA delta"
    if ".lora_B." in key and leaf == "bias":
        return "lora_B carries a bias (lora_bias), which LMDeploy's LoRA kernel cannot apply"
    if ".lora_E" in key or key.endswith("lora_E"):
        return "AdaLoRA tensors (lora_E) are not plain LoRA"
    return None


def _check_tensor(name: str, file: str, key: str, module: str, tensor: torch.Tensor | TensorSpec,
                  check_values: bool) -> None:
    def bad(problem: str, fix: str) -> AdapterError:
        return AdapterError(f"tensor {key!r} {problem}", adapter=name, file=file, module=module, fix=fix)

    spec = isinstance(tensor, TensorSpec)
    if not spec:
        import torch

        if tensor.layout != torch.strided:
            raise bad(f"is a {tensor.layout} tensor; LoRA weights are dense.", "save the adapter again with PEFT.")
    if tensor.dim() != 2:
        raise bad(f"has shape {tuple(tensor.shape)}; a LoRA weight of a linear layer is 2-D.",
                  "only LoRA on linear layers can be served; merge the adapter instead.")
    if not (tensor.dtype in FLOAT_DTYPES if spec else tensor.is_floating_point()):
        raise bad(f"has dtype {tensor.dtype}, not a floating point type.",
                  "save the adapter again; quantized or integer LoRA weights cannot be served.")
    if tensor.numel() == 0:
        raise bad(f"is empty (shape {tuple(tensor.shape)}): rank 0 or a zero-size layer.",
                  "the weights file is damaged or was saved before training; save the adapter again.")
    if spec or tensor.is_meta or not check_values:  # headers only: no values; or the caller checks what it serves
        return
    if not all_finite(tensor):
        raise bad(NON_FINITE_PROBLEM, NON_FINITE_FIX)


#: The refusal of a tensor holding NaN or Inf (also used by :mod:`.slots` for the filled slots).
NON_FINITE_PROBLEM = "holds NaN or Inf values."
NON_FINITE_FIX = "the training run diverged or the file is damaged; use an earlier checkpoint."


def all_finite(*tensors: torch.Tensor) -> bool:
    """No NaN and no Inf in any of ``tensors``, in one pass each that allocates nothing of their size.

    ``aminmax`` propagates NaN and lands on any Inf, so two scalars per tensor tell, and one
    ``isfinite`` over all of them answers with a single sync; ``isfinite(t).all()`` per tensor writes
    a bool tensor as large as the input first (about 5x slower on CPU). The 8-bit float types have no
    kernel for it; their float32 copy keeps NaN and Inf.
    """
    import torch

    extremes = [torch.stack(torch.aminmax(t if t.element_size() >= 2 else t.float())).float()
                for t in tensors if t.numel()]
    return not extremes or bool(torch.isfinite(torch.cat(extremes)).all())


def read_adapter_tensors(name: str, path: str | os.PathLike, headers_only: bool = False,
                         check_values: bool = True) -> AdapterTensors:
    """Load and pair every ``lora_A``/``lora_B`` tensor; refuse anything else with a reason.

    ``headers_only``: the tensors are ``meta`` tensors built from the safetensors header (names, dtypes,
    shapes; no values, so the NaN check is skipped), for planning without reading the weights.
    ``check_values=False`` skips the NaN/Inf check too: the serving path checks the filled slots instead
    (one pass over the served dtype, which also catches values that overflow it); see :mod:`.slots`.
    """
    path = os.fspath(path)
    file = find_weights_file(name, path)
    raw = _load_headers(name, file) if headers_only else _load_raw(name, file)
    return _pair(name, file, raw, check_values)


def read_adapter_specs(name: str, path: str | os.PathLike) -> AdapterTensors | None:
    """The adapter's pairs as :class:`TensorSpec` (header only, no torch), or None for a ``.bin`` adapter.

    Every check of :func:`read_adapter_tensors` but the values' (there are none yet): the caller
    reads the bytes at each spec's offset and checks them itself (``merge``).
    """
    path = os.fspath(path)
    file = find_weights_file(name, path)
    if not file.endswith(".safetensors"):
        return None
    return _pair(name, file, _load_specs(name, file), check_values=False)


def _pair(name: str, file: str, raw: dict, check_values: bool) -> AdapterTensors:
    """Pair every ``lora_A``/``lora_B`` of ``raw`` (tensors or specs) by module; refuse anything else."""
    if not raw:
        raise AdapterError("holds no tensors.", adapter=name, file=file, fix="save the adapter again.")

    halves: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    base_copies: dict[str, tuple[str, torch.Tensor]] = {}
    for key, tensor in sorted(raw.items()):  # sorted: the same file always gives the same first error
        reason = _refusal_for_key(key)
        if reason:
            raise AdapterError(f"tensor {key!r}: {reason}.", adapter=name, file=file,
                               fix="merge this adapter into the base model and serve the merge.")
        if not key.startswith(PREFIX):
            raise AdapterError(f"tensor {key!r} does not start with {PREFIX!r}, so it is not a PEFT adapter tensor.",
                               adapter=name, file=file, fix="save the adapter with PEFT's save_pretrained.")
        body = key[len(PREFIX):]
        if body.endswith(".weight") and ".lora_" not in body:
            module = body[: -len(".weight")].removesuffix(".base_layer")
            base_copies[key] = (module, tensor)
            continue
        parts = body.rsplit(".", 2)
        if len(parts) == 3 and parts[0].rsplit(".", 1)[-1] in ("lora_A", "lora_B") and parts[2] == "weight":
            raise AdapterError(f"tensor {key!r} carries the adapter name {parts[1]!r}: it was saved from the model's "
                               "state_dict, not with save_pretrained.", adapter=name, file=file,
                               module=parts[0].rsplit(".", 1)[0],
                               fix=f"save the adapter with PEFT's save_pretrained (or drop '.{parts[1]}' from the "
                                   "tensor names).")
        if len(parts) != 3 or parts[1] not in ("lora_A", "lora_B") or parts[2] != "weight":
            raise AdapterError(f"tensor {key!r} is not a LoRA weight (lora_A/lora_B); it would replace or add "
                               "base weights (modules_to_save?).", adapter=name, file=file,
                               fix="merge this adapter into the base model and serve the merge.")
        module, half = parts[0], parts[1]
        _check_tensor(name, file, key, module, tensor, check_values)
        halves.setdefault(module, {})[half] = (key, tensor)
    if not halves:
        raise AdapterError(f"holds no lora_A/lora_B tensors (only {len(base_copies)} full weight(s)), so it would "
                           "serve the base model unchanged.", adapter=name, file=file,
                           fix="point --adapters at the LoRA checkpoint of the training run.")

    pairs: dict[str, LoraPair] = {}
    for module, h in sorted(halves.items()):
        if "lora_A" not in h or "lora_B" not in h:
            missing = "lora_A" if "lora_A" not in h else "lora_B"
            raise AdapterError(f"has no {missing} for this module.", adapter=name, file=file, module=module,
                               fix="the weights file is incomplete; save the adapter again.")
        (a_key, a), (b_key, b) = h["lora_A"], h["lora_B"]
        if a.shape[0] != b.shape[1]:
            raise AdapterError(f"lora_A is {tuple(a.shape)} and lora_B is {tuple(b.shape)}: their ranks "
                               "disagree.", adapter=name, file=file, module=module,
                               fix="the weights file is damaged or mixes two adapters; save it again.")
        pairs[module] = LoraPair(module=module, a=a, b=b, a_key=a_key, b_key=b_key)
    return AdapterTensors(file=file, pairs=pairs, base_copies=base_copies)
