"""Reading ``adapter_config.json`` into one validated object per adapter.

We parse the JSON ourselves instead of going through ``peft.PeftConfig``: with peft 0.14 (the
version LMDeploy pins) one unknown key written by a newer PEFT makes ``PeftConfig`` drop every
LoRA field, and LMDeploy then serves garbage or crashes. Every problem is raised here, at parse
time, as an :class:`AdapterError` naming the adapter, the file and the field.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import AdapterError

logger = logging.getLogger("lmdeploy.regex_lora")

CONFIG_NAME = "adapter_config.json"

# Keys PEFT (0.10 .. 0.21) or ms-swift write that do not change what the adapter computes at inference.
_HARMLESS_KEYS = frozenset(
    {
        "task_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
        "lora_dropout", "megatron_config", "megatron_core", "loftq_config", "eva_config",
        "runtime_config", "corda_config", "qalora_group_size", "use_qalora", "alora_invocation_tokens",
        "arrow_config", "ensure_weight_tying", "peft_version", "lora_ga_config", "model_key_mapping",
    }
)

# init_lora_weights values whose training rewrote the base weights: the raw checkpoint only
# reproduces the trained model on top of that rewritten base.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of a PEFT LoRA config that decide what the adapter computes."""

    name: str
    path: str
    config_file: str
    r: int = 8
    lora_alpha: float = 8.0
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    peft_version: str | None = None
    ignored_keys: tuple[str, ...] = ()

    def scaling(self, rank: int, alpha: float) -> float:
        """PEFT's per-module scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def describe_targets(self) -> str:
        t = self.target_modules
        return repr(t) if isinstance(t, str) else "[" + ", ".join(t or ()) + "]"


def _err(cfg_name: str, file: str, fieldname: str | None, problem: str, fix: str) -> AdapterError:
    return AdapterError(problem, adapter=cfg_name, file=file, field=fieldname, fix=fix)


def _str_or_list(name: str, file: str, key: str, value: Any) -> str | tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        # PEFT turns the list into a set; order never matters for matching.
        return tuple(sorted(set(value)))
    raise _err(name, file, key, f"must be a string (regex) or a list of strings, got {value!r}.",
               "write it as PEFT does: a regex string or a JSON list of module names.")


def _number_map(name: str, file: str, key: str, value: Any, kind: type) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _err(name, file, key, f"must be an object mapping module patterns to numbers, got {value!r}.",
                   "fix the field or remove it.")
    out = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
            raise _err(name, file, key, f"entry {k!r} must be a {kind.__name__}, got {v!r}.",
                       "fix the entry or remove it.")
        if v <= 0:
            raise _err(name, file, key, f"entry {k!r} must be positive, got {v!r}.", "fix the entry.")
        out[k] = kind(v)
    return out


def _refuse_if(cond: bool, name: str, file: str, key: str, problem: str, fix: str) -> None:
    if cond:
        raise _err(name, file, key, problem, fix)


def parse_adapter_config(name: str, path: str | os.PathLike, raw: dict[str, Any]) -> AdapterConfig:
    """Validate a decoded ``adapter_config.json``; raise :class:`AdapterError` on anything we cannot honour."""
    path = os.fspath(path)
    file = os.path.join(path, CONFIG_NAME)
    if not isinstance(raw, dict):
        raise _err(name, file, None, "the JSON document is not an object.", "use the adapter_config.json PEFT wrote.")

    peft_type = raw.get("peft_type", "LORA")
    _refuse_if(not isinstance(peft_type, str) or peft_type.upper() != "LORA", name, file, "peft_type",
               f"peft_type is {peft_type!r}; only plain LoRA adapters can be served.",
               "merge this adapter into the base model (e.g. `swift export --merge_lora true`) and serve the merge.")

    r = raw.get("r", 8)
    _refuse_if(isinstance(r, bool) or not isinstance(r, int) or r <= 0, name, file, "r",
               f"must be a positive integer, got {r!r}.", "set it to the rank the adapter was trained with.")
    alpha = raw.get("lora_alpha", 8)
    _refuse_if(isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha),
               name, file, "lora_alpha", f"must be a number, got {alpha!r}.", "set it to the training alpha.")

    target_modules = _str_or_list(name, file, "target_modules", raw.get("target_modules"))
    _refuse_if(target_modules is None or target_modules == () or target_modules == "", name, file,
               "target_modules", "is missing or empty, so no module can be matched.",
               "use the adapter_config.json written by the training run; it always lists the targets.")
    exclude_modules = _str_or_list(name, file, "exclude_modules", raw.get("exclude_modules"))

    layers_to_transform = raw.get("layers_to_transform")
    if isinstance(layers_to_transform, int) and not isinstance(layers_to_transform, bool):
        layers_to_transform = (layers_to_transform,)
    elif layers_to_transform is not None:
        _refuse_if(not isinstance(layers_to_transform, list)
                   or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers_to_transform),
                   name, file, "layers_to_transform", f"must be an int or a list of ints, got {layers_to_transform!r}.",
                   "fix the field.")
        # PEFT treats an empty list as "no layer selection".
        layers_to_transform = tuple(layers_to_transform) or None
    layers_pattern = raw.get("layers_pattern")
    if isinstance(layers_pattern, str):
        layers_pattern = (layers_pattern,)
    elif layers_pattern is not None:
        _refuse_if(not isinstance(layers_pattern, list) or not all(isinstance(p, str) for p in layers_pattern),
                   name, file, "layers_pattern", f"must be a string or a list of strings, got {layers_pattern!r}.",
                   "fix the field.")
        layers_pattern = tuple(layers_pattern) or None
    if isinstance(target_modules, str):
        # PEFT's LoraConfig.__post_init__ refuses these combinations; such a config was never trained.
        _refuse_if(layers_to_transform is not None, name, file, "layers_to_transform",
                   "cannot be used when target_modules is a regex string (PEFT refuses this config too).",
                   "encode the layer selection in the regex and drop layers_to_transform.")
        _refuse_if(layers_pattern is not None, name, file, "layers_pattern",
                   "cannot be used when target_modules is a regex string (PEFT refuses this config too).",
                   "encode the layer selection in the regex and drop layers_pattern.")
    _refuse_if(layers_pattern is not None and layers_to_transform is None, name, file, "layers_pattern",
               "is set without layers_to_transform (PEFT refuses this config).", "drop layers_pattern.")

    rank_pattern = _number_map(name, file, "rank_pattern", raw.get("rank_pattern"), int)
    alpha_pattern = _number_map(name, file, "alpha_pattern", raw.get("alpha_pattern"), float)

    use_rslora = raw.get("use_rslora", False)
    _refuse_if(not isinstance(use_rslora, bool), name, file, "use_rslora",
               f"must be true or false, got {use_rslora!r}.", "fix the field.")
    fan_in_fan_out = raw.get("fan_in_fan_out", False)
    _refuse_if(not isinstance(fan_in_fan_out, bool), name, file, "fan_in_fan_out",
               f"must be true or false, got {fan_in_fan_out!r}.", "fix the field.")

    # Fields that change the computation in ways a LoRA slot cannot express.
    _refuse_if(bool(raw.get("use_dora", False)), name, file, "use_dora",
               "DoRA rescales the merged weight by a learned magnitude; it is not an additive LoRA delta.",
               "merge the adapter into the base model and serve the merged checkpoint.")
    _refuse_if(bool(raw.get("modules_to_save")), name, file, "modules_to_save",
               f"the adapter replaces whole modules {raw.get('modules_to_save')!r}; LoRA slots cannot carry "
               "full replacement weights.", "merge the adapter into the base model and serve the merge.")
    for key in ("target_parameters", "layer_replication", "trainable_token_indices"):
        _refuse_if(bool(raw.get(key)), name, file, key,
                   f"{key}={raw.get(key)!r} changes the model beyond additive LoRA on linear layers.",
                   "merge the adapter into the base model and serve the merge.")
    bias = raw.get("bias", "none")
    _refuse_if(bias not in ("none", None), name, file, "bias",
               f"bias={bias!r}: the adapter trained base-layer biases, which LoRA slots cannot carry.",
               "merge the adapter into the base model and serve the merge.")
    _refuse_if(bool(raw.get("lora_bias", False)), name, file, "lora_bias",
               "lora_bias=true adds a trained bias to lora_B, which LMDeploy's LoRA kernel cannot apply.",
               "merge the adapter into the base model and serve the merge.")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise _err(name, file, "init_lora_weights",
                   f"init_lora_weights={init!r}: training rewrote the base weights, so this checkpoint is "
                   "not a delta on the original model.",
                   "serve the converted adapter instead (ms-swift writes it to <checkpoint>/converted/default; "
                   "PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) makes one).")

    known = {
        "peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform",
        "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out", "use_dora",
        "modules_to_save", "target_parameters", "layer_replication", "trainable_token_indices", "bias",
        "lora_bias", "init_lora_weights",
    }
    ignored = tuple(sorted(k for k in raw if k not in known))
    unknown = [k for k in ignored if k not in _HARMLESS_KEYS]
    if unknown:
        logger.debug("adapter %r: ignoring keys %s in %s (they do not change the computation)", name, unknown, file)

    peft_version = raw.get("peft_version")
    return AdapterConfig(
        name=name,
        path=path,
        config_file=file,
        r=r,
        lora_alpha=float(alpha),
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_rslora=use_rslora,
        fan_in_fan_out=fan_in_fan_out,
        peft_version=peft_version if isinstance(peft_version, str) else None,
        ignored_keys=ignored,
    )


def read_adapter_config(name: str, path: str | os.PathLike) -> AdapterConfig:
    """Read and validate ``<path>/adapter_config.json``."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise AdapterError("the adapter folder does not exist or is not a directory.", adapter=name, file=path,
                           fix="pass --adapters NAME=PATH with the folder that holds adapter_config.json.")
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise AdapterError(f"{CONFIG_NAME} is missing.", adapter=name, file=file,
                           fix="point --adapters at the checkpoint folder PEFT or ms-swift wrote "
                               "(it holds adapter_config.json and adapter_model.safetensors).")
    try:
        with open(file, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"is not valid JSON ({exc}).", adapter=name, file=file,
                           fix="restore the adapter_config.json written by the training run.") from None
    except OSError as exc:
        raise AdapterError(f"cannot be read ({exc.strerror}).", adapter=name, file=file,
                           fix="check the file's permissions.") from None
    return parse_adapter_config(name, path, raw)
