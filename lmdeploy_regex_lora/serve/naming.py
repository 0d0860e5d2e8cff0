"""Adapter module names -> the checkpoint names LMDeploy loads, whichever transformers trained the adapter.

An adapter names modules as the trainer's model did. Up to transformers 4.51 those were the checkpoint
names; since 4.52 a VLM's names differ (``model.language_model.*``, ``model.visual.*``, ...), while the
checkpoints keep the old ones. transformers itself knows both directions: ``from_pretrained`` renames
checkpoint keys with the model's conversion mapping and ``save_pretrained`` reverses it. So the names
are taken as they are when every tensor names a checkpoint module, and otherwise translated with the
installed transformers' own conversion mapping for the model (its class instantiated on ``meta``,
about 0.1 s). No per-model table: a rename the installed transformers does not know is refused with
the names that did not resolve.

This module imports neither torch nor transformers until a translation is needed, so ``merge``
keeps its small footprint for adapters in checkpoint names.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass

from ..errors import AdapterError, describe_names

CHECKPOINT_NAMES = "checkpoint names"


@dataclass(frozen=True)
class Naming:
    """How one adapter's module names map onto the checkpoint's."""

    label: str
    to_checkpoint: dict[str, str]  # every module the adapter has tensors for -> its checkpoint name
    trainer_name: Callable[[str], str]  # a checkpoint module name -> its name under this naming

    def trainer(self, checkpoint_module: str) -> str:
        """The name of ``checkpoint_module`` under this naming (the adapter's own spelling where it has one)."""
        own = next((n for n, c in self.to_checkpoint.items() if c == checkpoint_module), None)
        return own or self.trainer_name(checkpoint_module)

    def names(self, checkpoint_modules: Collection[str]) -> dict[str, str]:
        """{name under this naming: checkpoint name} for ``checkpoint_modules``; the adapter's own spelling wins."""
        own = {ckpt: name for name, ckpt in self.to_checkpoint.items()}
        return {own.get(c) or self.trainer_name(c): c for c in checkpoint_modules}


def _same(name: str) -> str:
    return name


def choose_naming(adapter: str, file: str, tensor_modules: Collection[str], checkpoint_modules: Collection[str],
                  model_dir: str | None) -> Naming:
    """The naming under which every module the adapter has tensors for is a module of the checkpoint."""
    known = set(checkpoint_modules)
    missing = [m for m in tensor_modules if m not in known]
    if not missing:
        return Naming(CHECKPOINT_NAMES, {m: m for m in tensor_modules}, _same)
    translated = None
    if model_dir is not None:
        mapping = transformers_mapping(model_dir)
        if mapping is not None:
            label, forward, reverse = mapping
            back = {m: reverse(m) for m in tensor_modules}
            unresolved = [m for m, c in back.items() if c not in known]
            if not unresolved:
                return Naming(label, back, forward)
            translated = (label, unresolved)
    if translated is not None and len(translated[1]) < len(missing):
        label, missing = translated
        closest = f"closest naming: {label}"
    else:
        closest = f"closest naming: {CHECKPOINT_NAMES}"
    raise AdapterError(
        f"{len(missing)} of its {len(tensor_modules)} LoRA tensors name modules this model does not have in its "
        f"checkpoint ({describe_names(missing, 3)}; {closest}).", adapter=adapter, file=file, module=sorted(missing)[0],
        fix="check that the adapter was trained on this base model; an adapter for another architecture or size "
            "cannot be served on it.")


def is_model_folder(path: str) -> bool:
    """A model folder is one with a config.json: what LMDeploy builds from and what a merge copies."""
    return os.path.isfile(os.path.join(path, "config.json"))


def model_config(model_dir: str) -> dict:
    """The model folder's config.json as a dict; empty when it cannot be read (callers then know nothing)."""
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _config_model_type(model_dir: str) -> str | None:
    cfg = model_config(model_dir)
    return cfg.get("model_type") if "auto_map" not in cfg else None


@functools.lru_cache(maxsize=8)
def transformers_mapping(model_dir: str) -> tuple[str, Callable[[str], str], Callable[[str], str]] | None:
    """(label, checkpoint -> in-memory name, in-memory -> checkpoint name) from the installed transformers'
    conversion mapping for the model in ``model_dir``; None when it has none (remote code, older transformers).

    Names are module names (no ``.weight``). The reverse is what ``save_pretrained`` applies, so it also
    maps the names of transformers 4.52-4.57 (LLaVA's CLIP tower still had its ``vision_model`` level).
    """
    if _config_model_type(model_dir) is None:  # remote code: transformers' conversions skip custom code
        return None
    try:
        import torch
        import transformers
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        config = transformers.AutoConfig.from_pretrained(model_dir)
        cls = getattr(transformers, (config.architectures or [""])[0], None)
        if cls is None:
            return None
        with torch.device("meta"):
            model = cls._from_config(config)
        conv = get_model_conversion_mapping(model, add_legacy=False)
    except Exception:  # an older transformers (no conversion_mapping) or a class it cannot build
        return None
    if not conv:
        return None
    ren = [c for c in conv if isinstance(c, WeightRenaming)]
    cvt = [c for c in conv if isinstance(c, WeightConverter)]
    rev = [c.reverse_transform() for c in conv[::-1]]
    rev_ren = [c for c in rev if isinstance(c, WeightRenaming)]
    rev_cvt = [c for c in rev if isinstance(c, WeightConverter)]

    def forward(name: str) -> str:
        return rename_source_key(name + ".weight", ren, cvt)[0].removesuffix(".weight")

    def reverse(name: str) -> str:
        return rename_source_key(name + ".weight", rev_ren, rev_cvt, reverse=True)[0].removesuffix(".weight")

    label = f"transformers>=4.52 names ({type(model).__name__}; reversed with transformers " \
            f"{transformers.__version__}'s conversion mapping)"
    return label, forward, reverse
