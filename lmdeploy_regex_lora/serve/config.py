"""Reading ``adapter_config.json`` into one validated object per adapter.

We parse the JSON ourselves instead of going through ``peft.PeftConfig``: with peft 0.14 (the
version LMDeploy pins) one unknown key written by a newer PEFT makes ``PeftConfig`` drop every
LoRA field, and LMDeploy then serves garbage or crashes. Every problem is raised here, at parse
time, as an :class:`AdapterError` naming the adapter, the file and the field.

How each field of PEFT 0.10 .. 0.21 is handled (tests/test_config_refusals.py checks that every field
any of those releases writes is in one of these groups):

* read (:data:`PARSED_FIELDS`): ``r`` / ``lora_alpha`` (PEFT's defaults 8 / 8; any finite alpha),
  targets, exclusions, layer selection, rank/alpha patterns (their order is kept: PEFT >= 0.15 applies
  the first key that matches, and PEFT's ``save_pretrained`` writes them sorted, which is the order
  PEFT itself reloads them in), ``use_rslora``; ``fan_in_fan_out`` is accepted and has no effect
  (PEFT resets it to False on ``nn.Linear``, and LoRA's forward never reads it); ``bias`` /
  ``lora_bias`` are refused only when the weights hold bias tensors (without them PEFT loads the
  adapter onto the untouched biases too); ``init_lora_weights`` that rewrote the base are refused
  unless the checkpoint is the converted form;
* refused when set (:data:`REFUSED_FIELDS`): every variant that is not additive LoRA on linears;
* ignored (:data:`HARMLESS_FIELDS`, and any unknown key, logged at debug level).
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from ..errors import AdapterError, Blame
from ..safetensors_io import os_error, read_header, read_regular_file

logger = logging.getLogger("lmdeploy.regex_lora")

CONFIG_NAME = "adapter_config.json"

# Keys PEFT (0.10 .. 0.21) or ms-swift write that do not change what the adapter computes at inference
# (training-only settings, bookkeeping, initialisation recipes whose result is in the tensors).
# ``velora_config`` swaps only LoRA A's backward pass; ``init_lora_weights='mica'`` freezes B during
# training: both forward exactly as LoRA.
HARMLESS_FIELDS = frozenset(
    {
        "task_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
        "lora_dropout", "megatron_config", "megatron_core", "loftq_config", "eva_config",
        "runtime_config", "corda_config", "qalora_group_size", "ensure_weight_tying", "peft_version",
        "lora_ga_config", "velora_config", "model_key_mapping",
    }
)

_MERGE_FIX = ("merge the adapter into the base model (PEFT's merge_and_unload, or `swift export --merge_lora true`) "
              "and serve the merged model.")

#: Fields whose set value makes PEFT compute something other than additive LoRA on linear layers,
#: with why. "Set" means truthy, as PEFT tests them; all are refused with the merge as the fix.
REFUSED_FIELDS: dict[str, str] = {
    "use_dora": "DoRA rescales the merged weight by a learned magnitude; it is not an additive LoRA delta",
    "modules_to_save": "the adapter carries full replacement weights for these modules, which LoRA slots "
                       "cannot hold",
    "trainable_token_indices": "the adapter replaces rows of the embedding matrix (trainable tokens)",
    "target_parameters": "LoRA on raw parameters (e.g. MoE expert weights) is not LoRA on a linear layer",
    "layer_replication": "the adapter duplicates decoder layers, so the served model would have a different depth",
    "use_qalora": "QALoRA feeds lora_A a group-pooled input, not the layer input",
    "alora_invocation_tokens": "Activated LoRA applies the adapter only from the invocation tokens on, which "
                               "LMDeploy cannot do per token",
    "arrow_config": "Arrow routes each token over several LoRA experts",
    "use_bdlora": "BD-LoRA stores block-diagonal factors, not plain lora_A/lora_B matrices",
    "monteclora_config": "MonteCLoRA samples the LoRA weights (variational Monte Carlo)",
    "kasa_config": "KaSA truncates the base weight's singular values and inserts a learned diagonal between "
                   "lora_A and lora_B",
}

# Sub-config fields: PEFT turns any JSON object (even ``{}``) into a config instance, which switches the
# variant on; only ``null`` leaves it off.
_SUBCONFIG_FIELDS = frozenset({"arrow_config", "use_bdlora", "monteclora_config", "kasa_config"})

#: Fields this module reads (the others are harmless, refused, or unknown and ignored).
PARSED_FIELDS = frozenset({
    "peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out", "bias", "lora_bias", "init_lora_weights",
})

# init_lora_weights values whose training rewrote the base weights: the raw checkpoint only
# reproduces the trained model on top of that rewritten base.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

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

    @property
    def all_linear(self) -> bool:
        """PEFT's ``target_modules="all-linear"`` shorthand (compared case-insensitively, as PEFT does)."""
        return isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR

    def describe_targets(self) -> str:
        t = self.target_modules
        return repr(t) if isinstance(t, str) else "[" + ", ".join(t or ()) + "]"


#: PEFT's shorthand for every linear layer but the output layer (peft.utils.constants.INCLUDE_LINEAR_LAYERS_SHORTHAND).
ALL_LINEAR = "all-linear"


def _str_or_list(bad: Blame, key: str, value: Any) -> str | tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        # PEFT turns the list into a set; order never matters for matching.
        return tuple(sorted(set(value)))
    raise bad(f"must be a string (regex) or a list of strings, got {value!r}.",
              "write it as PEFT does: a regex string or a JSON list of module names.", field=key)


def _number_map(bad: Blame, key: str, value: Any, kind: type) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"must be an object mapping module patterns to numbers, got {value!r}.",
                  "fix the field or remove it.", field=key)
    out = {}
    for k, v in value.items():  # dict order is kept: PEFT >= 0.15 applies the first key that matches
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or (kind is int and v != int(v)):
            raise bad(f"entry {k!r} must be a {'positive integer' if kind is int else 'number'}, got {v!r}.",
                      "fix the entry or remove it.", field=key)
        if kind is int and v <= 0:  # PEFT raises on a rank <= 0; any finite alpha is valid to PEFT
            raise bad(f"entry {k!r} must be positive, got {v!r}.", "fix the entry.", field=key)
        out[k] = kind(v)
    return out


def _refuse_if(cond: bool, bad: Blame, key: str, problem: str, fix: str) -> None:
    if cond:
        raise bad(problem, fix, field=key)


def _int_or_ints(bad: Blame, value: Any) -> tuple[int, ...] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    _refuse_if(not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value),
               bad, "layers_to_transform", f"must be an int or a list of ints, got {value!r}.", "fix the field.")
    return tuple(value) or None  # PEFT treats an empty list as "no layer selection"


def _str_or_strs(bad: Blame, value: Any) -> tuple[str, ...] | None:
    if isinstance(value, str):
        return (value,) if value else None  # PEFT: an empty pattern means "any layer list"
    _refuse_if(not isinstance(value, list) or not all(isinstance(p, str) for p in value), bad, "layers_pattern",
               f"must be a string or a list of strings, got {value!r}.", "fix the field.")
    return tuple(value) or None


def _bias_tensors(name: str, path: str, lora_b: bool) -> list[str] | None:
    """Bias tensors in the adapter's safetensors file (``lora_B`` or base-layer biases); None if not known here.

    Only the safetensors header is read. PEFT saves base-layer biases for ``bias='all'`` when the layers
    have any, and ``lora_B`` biases for ``lora_bias=true``; when there are none, PEFT itself loads the
    adapter onto the untouched base biases, which is what we serve. A pickle (``adapter_model.bin``) is
    left to the weights reader, which refuses bias tensors too.
    """
    from .weights import find_weights_file

    try:
        file = find_weights_file(name, path)
        if not file.endswith(".safetensors"):
            return None
        keys = list(read_header(file, adapter=name).entries)
    except AdapterError:  # the weights reader refuses it with its own message
        return None
    if lora_b:
        return [k for k in keys if k.endswith(".lora_B.bias")]
    return [k for k in keys if k.endswith(".bias") and ".lora_" not in k]


def _layer_selection(bad: Blame, raw: dict, regex_targets: bool, name: str
                     ) -> tuple[tuple[int, ...] | None, tuple[str, ...] | None]:
    """``layers_to_transform`` / ``layers_pattern``, refused with a regex target as PEFT refuses them."""
    raw_layers, raw_pattern = raw.get("layers_to_transform"), raw.get("layers_pattern")
    if regex_targets:  # LoraConfig.__post_init__ refuses these combinations (on the raw values, as PEFT does)
        for key, value in (("layers_to_transform", raw_layers), ("layers_pattern", raw_pattern)):
            _refuse_if(value is not None, bad, key,
                       "cannot be used when target_modules is a regex string (PEFT refuses this config too).",
                       f"encode the layer selection in the regex and drop {key}.")
    if raw_pattern and raw_layers is None:
        # PEFT <= 0.13 saved such configs and ignored the pattern; later releases refuse to load them.
        logger.debug("adapter %r: layers_pattern without layers_to_transform selects nothing; ignored (%s)",
                     name, bad.file)
        raw_pattern = None
    layers = _int_or_ints(bad, raw_layers) if raw_layers is not None else None
    return layers, _str_or_strs(bad, raw_pattern) if raw_pattern is not None else None


def _flag(bad: Blame, raw: dict, key: str) -> bool:
    value = raw.get(key, False)
    _refuse_if(not isinstance(value, bool), bad, key, f"must be true or false, got {value!r}.", "fix the field.")
    return value


def _refuse_variants(bad: Blame, raw: dict, name: str, path: str) -> None:
    """Fields that change the computation in ways a LoRA slot cannot express."""
    for key, why in REFUSED_FIELDS.items():
        value = raw.get(key)
        is_set = value is not None if key in _SUBCONFIG_FIELDS else bool(value)
        _refuse_if(is_set, bad, key, f"{key}={value!r}: {why}.", _MERGE_FIX)
    bias = raw.get("bias", "none")
    _refuse_if(bias not in ("none", "all", "lora_only", None), bad, "bias",
               f"must be 'none', 'all' or 'lora_only', got {bias!r}.", "fix the field.")
    if bias not in ("none", None):
        found = _bias_tensors(name, path, lora_b=False)
        _refuse_if(bool(found), bad, "bias",
                   f"bias={bias!r} and the weights hold {len(found or ())} trained base-layer bias tensor(s) "
                   f"(e.g. {(found or [''])[0]!r}); LoRA slots cannot carry them.", _MERGE_FIX)
    if raw.get("lora_bias", False):
        found = _bias_tensors(name, path, lora_b=True)
        _refuse_if(bool(found) or found is None, bad, "lora_bias",
                   f"lora_bias=true: the weights hold {len(found or ())} lora_B bias tensor(s), which LMDeploy's "
                   "LoRA kernel cannot add.", _MERGE_FIX)
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise bad(f"init_lora_weights={init!r}: training rewrote the base weights, so this checkpoint is not a "
                  "delta on the original model.",
                  "serve the converted adapter instead (ms-swift writes it to <checkpoint>/converted/default; "
                  "PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) makes one, with "
                  "init_lora_weights=true).", field="init_lora_weights")


def parse_adapter_config(name: str, path: str | os.PathLike, raw: dict[str, Any]) -> AdapterConfig:
    """Validate a decoded ``adapter_config.json``; raise :class:`AdapterError` on anything we cannot honour."""
    path = os.fspath(path)
    file = os.path.join(path, CONFIG_NAME)
    bad = Blame(name, file)
    if not isinstance(raw, dict):
        raise bad("the JSON document is not an object.", "use the adapter_config.json PEFT wrote.")

    peft_type = raw.get("peft_type", "LORA")
    _refuse_if(not isinstance(peft_type, str) or peft_type.upper() != "LORA", bad, "peft_type",
               f"peft_type is {peft_type!r}; only plain LoRA adapters can be served.", _MERGE_FIX)
    # PEFT's LoraConfig defaults: r=8, lora_alpha=8.
    r = raw.get("r", 8)
    _refuse_if(isinstance(r, bool) or not isinstance(r, int) or r <= 0, bad, "r",
               f"must be a positive integer, got {r!r}.", "set it to the rank the adapter was trained with.")
    alpha = raw.get("lora_alpha", 8)
    _refuse_if(isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha),
               bad, "lora_alpha", f"must be a number, got {alpha!r}.", "set it to the training alpha.")

    target_modules = _str_or_list(bad, "target_modules", raw.get("target_modules"))
    _refuse_if(target_modules is None or target_modules == () or target_modules == "", bad,
               "target_modules", "is missing or empty, so no module can be matched.",
               "use the adapter_config.json written by the training run; it always lists the targets.")
    exclude_modules = _str_or_list(bad, "exclude_modules", raw.get("exclude_modules"))
    layers_to_transform, layers_pattern = _layer_selection(bad, raw, isinstance(target_modules, str), name)
    rank_pattern = _number_map(bad, "rank_pattern", raw.get("rank_pattern"), int)
    alpha_pattern = _number_map(bad, "alpha_pattern", raw.get("alpha_pattern"), float)
    use_rslora = _flag(bad, raw, "use_rslora")
    fan_in_fan_out = _flag(bad, raw, "fan_in_fan_out")
    if fan_in_fan_out:
        # PEFT warns and resets it to False for nn.Linear (every layer we serve); for GPT-2's Conv1D it
        # only transposes the merged delta. LoRA's forward, x @ A.T @ B.T, never reads it.
        logger.debug("adapter %r: fan_in_fan_out=true does not change LoRA's forward on linear layers (%s)",
                     name, file)
    _refuse_variants(bad, raw, name, path)

    ignored = tuple(sorted(k for k in raw if k not in PARSED_FIELDS and k not in REFUSED_FIELDS))
    unknown = [k for k in ignored if k not in HARMLESS_FIELDS]
    if unknown:
        logger.debug("adapter %r: ignoring keys %s in %s (they do not change the computation)", name, unknown, file)
    peft_version = raw.get("peft_version")
    return AdapterConfig(
        name=name, path=path, config_file=file, r=r, lora_alpha=float(alpha), target_modules=target_modules,
        exclude_modules=exclude_modules, layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, use_rslora=use_rslora,
        fan_in_fan_out=fan_in_fan_out, peft_version=peft_version if isinstance(peft_version, str) else None,
        ignored_keys=ignored,
    )


def read_adapter_config(name: str, path: str | os.PathLike) -> AdapterConfig:
    """Read and validate ``<path>/adapter_config.json``.

    The file is read through :func:`~lmdeploy_regex_lora.safetensors_io.read_regular_file` (non-blocking
    open, regular-file check on the descriptor, size bound), so a FIFO, device or huge file never hangs us.
    """
    path = os.fsdecode(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise AdapterError("the adapter folder does not exist.", adapter=name, file=path,
                           fix="pass --adapters NAME=PATH with the folder that holds adapter_config.json.") from None
    except OSError as exc:
        raise os_error(path, exc, "adapter folder", name) from None
    if not stat.S_ISDIR(st.st_mode):
        raise AdapterError("the adapter path is not a directory.", adapter=name, file=path,
                           fix="pass --adapters NAME=PATH with the folder that holds adapter_config.json, "
                               "not a file in it.")
    file = os.path.join(path, CONFIG_NAME)
    try:
        os.lstat(file)
    except FileNotFoundError:
        raise AdapterError(f"{CONFIG_NAME} is missing.", adapter=name, file=file,
                           fix="point --adapters at the checkpoint folder PEFT or ms-swift wrote "
                               "(it holds adapter_config.json and adapter_model.safetensors).") from None
    except OSError as exc:  # EACCES here: the folder itself may not be searched
        raise os_error(path, exc, "adapter folder", name) from None
    # A PEFT config is a few kB; 16 MiB only stops a huge or endless file early.
    data = read_regular_file(file, what=CONFIG_NAME, adapter=name, limit=16 << 20)
    try:
        raw = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise AdapterError("nests JSON too deeply to be an adapter config.", adapter=name, file=file,
                           fix="restore the adapter_config.json written by the training run.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"is not valid JSON ({exc}).", adapter=name, file=file,
                           fix="restore the adapter_config.json written by the training run.") from None
    return parse_adapter_config(name, path, raw)
