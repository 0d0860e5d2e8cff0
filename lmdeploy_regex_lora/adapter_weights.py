"""Reading an adapter's tensors: safetensors first, a pickle only through ``torch.load(weights_only=True)``.

The tensors are the ground truth of what was trained: module names and ranks come from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .errors import AdapterError

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


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


def find_weights_file(name: str, path: str) -> str:
    """Pick the weights file; safetensors wins so a pickle next to it is never opened."""
    st = os.path.join(path, SAFETENSORS_NAME)
    if os.path.isfile(st):
        return st
    binf = os.path.join(path, BIN_NAME)
    if os.path.isfile(binf):
        return binf
    raise AdapterError(f"neither {SAFETENSORS_NAME} nor {BIN_NAME} is there.", adapter=name, file=path,
                       fix="copy the adapter's weights file next to adapter_config.json.")


def _load_raw(name: str, file: str) -> dict[str, torch.Tensor]:
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(file, device="cpu")
        except Exception as exc:  # safetensors raises several types for truncated / corrupt files
            raise AdapterError(
                f"cannot be read as safetensors ({type(exc).__name__}: {exc}).", adapter=name, file=file,
                fix="the upload or copy is probably incomplete; copy the file again.",
            ) from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses any pickle that would run code
        raise AdapterError(f"cannot be loaded safely ({type(exc).__name__}: {str(exc).splitlines()[0]}).",
                           adapter=name, file=file,
                           fix="convert it to adapter_model.safetensors from a trusted environment.") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError("does not hold a flat mapping of names to tensors.", adapter=name, file=file,
                           fix="save the adapter with PEFT's save_pretrained.")
    return state


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


def read_adapter_tensors(name: str, path: str | os.PathLike) -> AdapterTensors:
    """Load and pair every ``lora_A``/``lora_B`` tensor; refuse anything else with a reason."""
    path = os.fspath(path)
    file = find_weights_file(name, path)
    raw = _load_raw(name, file)
    if not raw:
        raise AdapterError("holds no tensors.", adapter=name, file=file, fix="save the adapter again.")

    halves: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    base_copies: dict[str, tuple[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
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
        if len(parts) != 3 or parts[1] not in ("lora_A", "lora_B") or parts[2] != "weight":
            raise AdapterError(f"tensor {key!r} is not a LoRA weight (lora_A/lora_B); it would replace or add "
                               "base weights (modules_to_save?).", adapter=name, file=file,
                               fix="merge this adapter into the base model and serve the merge.")
        module, half = parts[0], parts[1]
        if tensor.dim() != 2:
            raise AdapterError(f"tensor {key!r} has shape {tuple(tensor.shape)}; a LoRA weight of a linear "
                               "layer is 2-D.", adapter=name, file=file, module=module,
                               fix="only LoRA on linear layers can be served; merge the adapter instead.")
        if not torch.is_floating_point(tensor):
            raise AdapterError(f"tensor {key!r} has dtype {tensor.dtype}, not a floating point type.",
                               adapter=name, file=file, module=module, fix="save the adapter again.")
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"tensor {key!r} holds NaN or Inf values.", adapter=name, file=file,
                               module=module, fix="the training run diverged or the file is damaged; "
                                                  "use an earlier checkpoint.")
        halves.setdefault(module, {})[half] = (key, tensor)

    pairs: dict[str, LoraPair] = {}
    for module, h in sorted(halves.items()):
        if "lora_A" not in h or "lora_B" not in h:
            missing = "lora_A" if "lora_A" not in h else "lora_B"
            raise AdapterError(f"has no {missing} for this module.", adapter=name, file=file, module=module,
                               fix="the weights file is incomplete; save the adapter again.")
        (a_key, a), (b_key, b) = h["lora_A"], h["lora_B"]
        if a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise AdapterError(f"lora_A is {tuple(a.shape)} and lora_B is {tuple(b.shape)}: their ranks "
                               "disagree.", adapter=name, file=file, module=module,
                               fix="the weights file is damaged or mixes two adapters; save it again.")
        pairs[module] = LoraPair(module=module, a=a, b=b, a_key=a_key, b_key=b_key)
    return AdapterTensors(file=file, pairs=pairs, base_copies=base_copies)
