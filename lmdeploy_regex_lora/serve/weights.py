"""Reading an adapter's tensors: safetensors first, a pickle only after a scan and through ``weights_only``.

The tensors are the ground truth of what was trained: module names and ranks come from here.
Files are opened and their headers checked by :mod:`lmdeploy_regex_lora.safetensors_io` (nothing in a
file is trusted); a ``.bin`` goes through :mod:`.pickle_safety`. When ``adapter_model.safetensors``
exists in any form, ``adapter_model.bin`` is never opened.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import AdapterError, Blame, printable
from ..safetensors_io import (
    FLOAT_CODES,
    Entry,
    check_layout,
    map_regular_file,
    parse_header,
    read_header,
    read_regular_file,
    recheck_size,
    torch_dtypes,
)
from .pickle_safety import load_bin

if TYPE_CHECKING:  # torch is imported where tensors are made: read_adapter_specs (merge) never needs it
    import torch

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
#: What a file of LoRA weights is called in messages.
WHAT = "weights file"


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


@dataclass
class AdapterTensors:
    file: str
    pairs: dict[str, LoraPair]
    #: Full weights saved next to the LoRA tensors (PEFT's ``save_embedding_layers`` writes the LM head /
    #: embedding as ``<module>.base_layer.weight``): key -> (module name, tensor). They change nothing
    #: when they equal the served model's weights; the plan checks that.
    base_copies: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)


# -- files ------------------------------------------------------------------------------------------------

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

def _load_safetensors(name: str, file: str, raw: torch.Tensor) -> dict[str, torch.Tensor]:
    """The file's tensors as views of ``raw`` (its bytes), after every check ``safetensors.load`` makes."""
    data = memoryview(raw.numpy()) if raw.numel() else memoryview(b"")
    header = parse_header(data, file, adapter=name)
    if sys.byteorder != "little":  # safetensors stores little-endian; let the library swap bytes
        from safetensors.torch import load

        try:
            return load(bytes(data))
        except Exception as exc:  # safetensors raises several types for damaged files
            raise AdapterError(f"cannot be read as safetensors ({type(exc).__name__}: {exc}).", adapter=name,
                               file=file, fix="the upload or copy is probably incomplete or damaged; copy the "
                                              "file again.") from None
    dtypes = torch_dtypes()
    out: dict[str, torch.Tensor] = {}
    for key, entry in check_layout(header, adapter=name, known=dtypes):
        dtype = dtypes[entry.dtype]
        flat = raw[entry.offset:entry.offset + entry.nbytes]
        if entry.offset % dtype.itemsize:  # a view must be aligned to its element size
            flat = flat.clone()
        out[key] = flat.view(dtype).reshape(entry.shape)
    return out


def _safetensors_header(name: str, file: str):
    if not file.endswith(".safetensors"):
        raise AdapterError(f"only {SAFETENSORS_NAME} can be read without loading tensors; a .bin is a pickle that "
                           "must be unpickled to list its tensors.", adapter=name, file=file,
                           fix="convert the adapter to adapter_model.safetensors (or check it with a command that "
                               "loads it, e.g. `lmdeploy-regex-lora verify`).")
    return read_header(file, what=WHAT, adapter=name)


def _float_entries(name: str, file: str, entries: dict[str, Entry]):
    for key, entry in entries.items():
        if entry.dtype not in FLOAT_CODES:
            raise AdapterError(f"tensor {key!r} has dtype {entry.dtype}, not a floating point type.",
                               adapter=name, file=file, field=key, fix="save the adapter again with PEFT.")
        yield key, entry


def _load_headers(name: str, file: str) -> dict[str, torch.Tensor]:
    """``meta`` tensors (dtype and shape) from a safetensors header; no tensor data is read."""
    import torch

    dtypes = torch_dtypes()
    header = _safetensors_header(name, file)
    return {key: torch.empty(entry.shape, dtype=dtypes[entry.dtype], device="meta")
            for key, entry in _float_entries(name, file, header.entries)}


def _load_specs(name: str, file: str) -> dict[str, Entry]:
    """The header's :class:`Entry` per tensor, after the same layout checks as a full read; no torch."""
    header = _safetensors_header(name, file)
    check_layout(header, adapter=name)
    return dict(_float_entries(name, file, header.entries))


def _load_raw(name: str, file: str) -> dict[str, torch.Tensor]:
    import torch

    if file.endswith(".safetensors"):
        raw = map_regular_file(file, what=WHAT, adapter=name)
        tensors = _load_safetensors(name, file, raw)
        recheck_size(file, raw.numel(), what=WHAT, adapter=name)
        return tensors
    state = load_bin(name, file, read_regular_file(file, what=WHAT, adapter=name))
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


def _check_tensor(name: str, file: str, key: str, module: str, tensor: torch.Tensor | Entry,
                  check_values: bool) -> None:
    blame = Blame(name, file)
    spec = isinstance(tensor, Entry)
    if not spec:
        import torch

        if tensor.layout != torch.strided:
            raise blame(f"tensor {key!r} is a {tensor.layout} tensor; LoRA weights are dense.",
                        "save the adapter again with PEFT.", module=module)
    if tensor.dim() != 2:
        raise blame(f"tensor {key!r} has shape {tuple(tensor.shape)}; a LoRA weight of a linear layer is 2-D.",
                    "only LoRA on linear layers can be served; merge the adapter instead.", module=module)
    if not (tensor.dtype in FLOAT_CODES if spec else tensor.is_floating_point()):
        raise blame(f"tensor {key!r} has dtype {tensor.dtype}, not a floating point type.",
                    "save the adapter again; quantized or integer LoRA weights cannot be served.", module=module)
    if tensor.numel() == 0:
        raise blame(f"tensor {key!r} is empty (shape {tuple(tensor.shape)}): rank 0 or a zero-size layer.",
                    "the weights file is damaged or was saved before training; save the adapter again.",
                    module=module)
    if spec or tensor.is_meta or not check_values:  # headers only: no values; or the caller checks what it serves
        return
    if not all_finite(tensor):
        raise blame(f"tensor {key!r} {NON_FINITE_PROBLEM}", NON_FINITE_FIX, module=module)


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
    """The adapter's pairs as :class:`Entry` (header only, no torch), or None for a ``.bin`` adapter.

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
