"""Planning a merge on the checkpoint's own headers, with the serving path's rules.

Which modules, with which scaling, and under which checkpoint names is decided by the serving path's
own config reader, matcher, naming schemes and checks (:func:`~lmdeploy_regex_lora.serve.plan.resolve_adapter`),
run on the checkpoint's weights as its safetensors headers list them
(:class:`~lmdeploy_regex_lora.serve.model_map.CheckpointMap`). Neither torch nor LMDeploy is imported for a
safetensors adapter: the adapter's tensors are header entries, read one at a time when they are merged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..errors import AdapterError, Blame
from ..safetensors_io import MERGEABLE_CODES, Entry, Header, check_layout, read_header, read_range
from . import rounding

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD = "checkpoint shard"


def read_shard_header(file: str) -> Header:
    """A base checkpoint shard's header, checked exactly as an adapter's is; no tensor data is read."""
    header = read_header(file, what=SHARD)
    check_layout(header)
    return header


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
    headers: dict[str, Header] = field(repr=False, default_factory=dict)
    pairs: dict = field(repr=False, default_factory=dict)  # checkpoint key -> LoraPair (specs or tensors)


_LM_HEAD_LEAVES = ("lm_head", "output")


def _ties_lm_head(base: str) -> bool | None:
    """``tie_word_embeddings`` from config.json (top level, or a VLM's text/LLM config); None when unset."""
    from ..serve.naming import model_config

    cfg = model_config(base)
    for section in (cfg, cfg.get("text_config"), cfg.get("llm_config")):
        if isinstance(section, dict) and isinstance(section.get("tie_word_embeddings"), bool):
            return section["tie_word_embeddings"]
    return None


def plan_merge(base: str, name: str, adapter_path: str) -> MergePlan:
    """Resolve the adapter on the checkpoint's own weights (headers only) and map it onto checkpoint keys."""
    from ..serve.config import read_adapter_config
    from ..serve.model_map import CheckpointMap
    from ..serve.naming import is_model_folder
    from ..serve.plan import resolve_adapter
    from ..serve.weights import AdapterTensors, read_adapter_specs, read_adapter_tensors

    base = os.fspath(base)
    if not is_model_folder(base):
        raise AdapterError("is not a model folder (no config.json).", file=base,
                           fix="pass the base model's local folder, not a Hub id.")
    shards, index = checkpoint_shards(base)
    cfg = read_adapter_config(name, adapter_path)
    tensors = read_adapter_specs(name, adapter_path) or read_adapter_tensors(name, adapter_path)
    headers = {s: read_shard_header(os.path.join(base, s)) for s in shards}
    where = {key: s for s, h in headers.items() for key in h.entries}
    model_map = CheckpointMap.from_shapes({key: e.shape for h in headers.values() for key, e in h.entries.items()},
                                          model_dir=base)
    _refuse_tied_lm_head(base, name, tensors.pairs, model_map)
    bare = AdapterTensors(file=tensors.file, pairs=tensors.pairs, base_copies={})
    # Every check of the adapter's content (naming, targets against tensors, ranks, shapes) is serving's.
    resolved = resolve_adapter(cfg, bare, 1, model_map)

    targets: dict[str, MergeTarget] = {}
    pairs = {}
    bad = Blame(name, base)
    for site_name, (m, pair) in sorted(resolved.by_site.items()):
        key = f"{site_name}.weight"
        dtype = headers[where[key]].entries[key].dtype
        if dtype not in MERGEABLE_CODES:
            raise bad(f"checkpoint tensor {key!r} is {dtype} (quantized?); a LoRA delta can only be merged into "
                      "floating point weights.", "merge into the unquantized base model, then quantize the merge.",
                      module=m.hf_name)
        for half, half_key in ((pair.a, pair.a_key), (pair.b, pair.b_key)):
            _check_readable(tensors.file, half, name, m.hf_name, half_key)  # refused before anything is written
        targets[key] = MergeTarget(key, m.hf_name, where[key], m.rank, m.alpha, m.scaling)
        pairs[key] = pair
    _check_base_copies(name, tensors, resolved.naming, headers, where)
    return MergePlan(base=base, adapter=name, adapter_path=os.path.abspath(adapter_path), weights_file=tensors.file,
                     naming=resolved.plan.naming, shards=shards, index=index, targets=targets, headers=headers,
                     pairs=pairs)


def _refuse_tied_lm_head(base: str, name: str, pairs: dict, model_map) -> None:
    """LoRA on an LM head that shares the embedding's weight cannot be merged without changing the embedding."""
    tied = _ties_lm_head(base)
    for module in pairs:
        leaf = module.rsplit(".", 1)[-1]
        if leaf not in _LM_HEAD_LEAVES:
            continue
        # A head of its own is a checkpoint weight of that leaf name, whichever transformers named the adapter.
        present = any(c.rsplit(".", 1)[-1] == leaf for c in model_map.candidates)
        if tied or (not present and tied is None):
            raise AdapterError("the LM head shares its weight with the input embedding (tie_word_embeddings), "
                               "so merging a LoRA on it would change the embedding too.", adapter=name, file=base,
                               module=module, fix="serve this adapter unmerged with the plugin.")


def _check_base_copies(name: str, tensors, naming, headers: dict[str, Header], where: dict[str, str]) -> None:
    """Full weights saved beside the LoRA tensors must equal the checkpoint's (else the adapter changed them)."""
    from ..serve.plan import check_base_copies

    def same(module: str, copy) -> bool:
        key = f"{module}.weight"
        if key not in where:
            return False
        entry = headers[where[key]].entries[key]
        array = values(tensors.file, copy, name, module, key)
        if tuple(entry.shape) != tuple(array.shape) or entry.dtype not in MERGEABLE_CODES:
            return False
        base_bytes = read_range(headers[where[key]].file, entry.offset, entry.nbytes, what=SHARD)
        return rounding.encode(entry.dtype, array.ravel()).tobytes() == base_bytes

    check_base_copies(name, tensors, naming, same, against="the base checkpoint's",
                      consequence="a LoRA merge would drop it",
                      fix="merge with PEFT on the transformers model (merge_and_unload), which applies it.")


# -- values -----------------------------------------------------------------------------------------------

def _check_readable(file: str, tensor, adapter: str, module: str, key: str) -> None:
    """Refuse an adapter tensor in a dtype :mod:`.rounding` cannot decode (float8), naming it."""
    if isinstance(tensor, Entry) and tensor.dtype not in MERGEABLE_CODES:
        raise AdapterError(f"tensor {key!r} is {tensor.dtype}; merge reads F64, F32, F16 and BF16 LoRA weights.",
                           adapter=adapter, file=file, module=module,
                           fix="save the adapter in float32 or bfloat16, or serve it with the plugin.")


def values(file: str, tensor, adapter: str, module: str, key: str):
    """One adapter tensor as a float64 numpy array: read at its header offsets, or converted from torch
    (a ``.bin`` adapter); NaN or Inf is refused, naming the tensor."""
    import numpy as np

    from ..serve.weights import NON_FINITE_FIX, NON_FINITE_PROBLEM

    _check_readable(file, tensor, adapter, module, key)
    if isinstance(tensor, Entry):
        data = read_range(file, tensor.offset, tensor.nbytes, what="adapter weights file", adapter=adapter)
        array = rounding.decode(tensor.dtype, data).reshape(tensor.shape)
    else:
        array = tensor.detach().to("cpu").double().numpy()
    if not np.isfinite(array).all():
        raise AdapterError(f"tensor {key!r} {NON_FINITE_PROBLEM}", adapter=adapter, file=file, module=module,
                           fix=NON_FINITE_FIX)
    return array

