"""Loading ``adapter_model.bin`` only after proving its pickle cannot run code.

A ``.bin`` must be a PyTorch zip archive whose pickle imports nothing but tensor-rebuilding functions,
checked opcode by opcode without running it; it is then loaded with ``torch.load(weights_only=True)``.
Raw and legacy pickles are refused: they cannot be checked before they run.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from typing import TYPE_CHECKING

from ..errors import AdapterError

if TYPE_CHECKING:
    import torch

#: The pickle inside a ``.bin`` only lists tensors; the data lives in separate zip entries.
MAX_PICKLE_BYTES = 64 << 20

# What torch.save writes for a dict of tensors; anything else in a pickle could run code.
_PICKLE_GLOBALS = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
                   ("torch._utils", "_rebuild_tensor")}
# Opcodes that import or call without a GLOBAL we can read (STACK_GLOBAL takes its name from the stack).
_PICKLE_REFUSED_OPS = {"STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"}

_UNSAFE_PICKLE_FIX = ("do not load this file anywhere; if the adapter is yours, convert it to "
                      "adapter_model.safetensors in a trusted environment (or save it again with PEFT).")


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


def load_bin(name: str, file: str, data: bytes) -> dict[str, torch.Tensor]:
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
