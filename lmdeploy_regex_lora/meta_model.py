"""LMDeploy's model for a base checkpoint, built as the engine builds it: on ``meta`` (layout only) or on CPU.

``inspect --model`` must resolve an adapter exactly as serving does (same module map, same naming
scheme, same refusals), but must not read gigabytes of weights to do it. LMDeploy's
``build_patched_model`` builds its module tree on any device; on ``meta`` no parameter has storage,
so :class:`~lmdeploy_regex_lora.model_map.ModelMap` and :func:`~lmdeploy_regex_lora.plan.resolve_adapter`
run on the same tree the engine serves, in well under a second. ``verify`` builds the same way on CPU,
with the weights loaded by LMDeploy's own loader.
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace

import torch

from .errors import AdapterError
from .model_map import PER_REQUEST, ModelMap


def build_model(model_dir: str | os.PathLike, device: str = "meta") -> tuple[torch.nn.Module, object]:
    """LMDeploy's model for ``model_dir`` in float32, as the engine builds it (``BaseModelAgent._build_model``).

    ``device='meta'``: the module tree only, no weight read. ``device='cpu'``: the weights loaded by
    LMDeploy's own loader. ``device_type='cpu'`` keeps LMDeploy from asking CUDA whether it supports
    bfloat16 (it does for every config that records ``dtype: bfloat16``, and fails on a machine without
    a GPU); the dtype is float32 either way. Returns (model, LMDeploy ``ModelConfig``) or raises
    :class:`AdapterError` for a folder LMDeploy cannot build.
    """
    path = os.fspath(model_dir)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise AdapterError("is not a model folder (no config.json).", file=path,
                           fix="pass the base model's local folder (the one LMDeploy serves), not a Hub id.")
    from lmdeploy.pytorch.config import ModelConfig
    from lmdeploy.pytorch.model_inputs import BuildModelContext
    from lmdeploy.pytorch.models.patch import build_patched_model

    try:
        cfg = ModelConfig.from_pretrained(path, trust_remote_code=True, dtype="float32", device_type="cpu")
        ctx = BuildModelContext(quant_config=cfg.quant_config, fp32_lm_head=cfg.fp32_lm_head,
                                tie_word_embeddings=cfg.tie_word_embeddings)
        model = build_patched_model(cfg, device=torch.device(device), build_model_ctx=ctx)
    except AdapterError:
        raise
    except Exception as exc:  # LMDeploy raises many types for configs it does not support
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise AdapterError(f"LMDeploy cannot build this model ({type(exc).__name__}: {first}).", file=path,
                           fix="check that LMDeploy's PyTorch engine supports the architecture in config.json."
                           ) from None
    if device != "meta":
        from lmdeploy.pytorch.weight_loader.model_weight_loader import load_model_weights

        load_model_weights(model, path, device=torch.device(device))
    return model, cfg


def build_meta_model(model_dir: str | os.PathLike) -> tuple[torch.nn.Module, object]:
    """LMDeploy's model for ``model_dir`` on ``meta``: its layout, no weights. See :func:`build_model`."""
    return build_model(model_dir, "meta")


def meta_model_map(model_dir: str | os.PathLike) -> tuple[ModelMap, object]:
    """The :class:`ModelMap` of ``model_dir`` as the engine would build it, without reading weights."""
    model, cfg = build_meta_model(model_dir)
    return ModelMap(model), cfg


def servable_everywhere(model_map: ModelMap) -> ModelMap:
    """A copy of ``model_map`` in which every linear takes LoRA per request.

    ``inspect`` uses it to still list the modules of an adapter that serving refuses only for where its
    layers are (the vision tower or projector of an interleaved layout): everything else the plan
    checks (naming, targets against tensors, ranks, shapes) stays as strict as serving.
    """
    permissive = copy.copy(model_map)
    permissive.sites = {name: replace(site, serving=PER_REQUEST, lora_capable=True)
                        for name, site in model_map.sites.items()}
    return permissive
