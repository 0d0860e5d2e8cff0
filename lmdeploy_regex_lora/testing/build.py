"""LMDeploy's model for a checkpoint folder, built as the engine builds it: on ``meta`` (layout only) or on CPU.

Mirrors ``BaseModelAgent._build_model`` (lmdeploy 0.18): ``ModelConfig.from_pretrained`` with
``trust_remote_code``, ``build_patched_model`` with a ``BuildModelContext`` carrying the config's quant /
LM-head settings, then ``load_model_weights`` (which also runs ``update_weights`` hooks). On ``meta`` no
parameter has storage, so ``inspect --model`` resolves an adapter on the very module tree the engine
serves, in well under a second, without reading weights; tests, the demo and ``verify`` build on CPU.

LMDeploy builds under ``torch.inference_mode()``, so every parameter is an *inference tensor*: reading
works anywhere, but in-place edits must happen inside ``torch.inference_mode()`` and autograd cannot
use them; :func:`release_inference_tensors` turns them into ordinary tensors when a caller needs that.
"""

from __future__ import annotations

import os

import torch

from ..errors import AdapterError
from ..serve.naming import is_model_folder


def build_lmdeploy_model(model_dir: str | os.PathLike, device: str = "cpu", dtype: str = "float32"
                         ) -> torch.nn.Module:
    """LMDeploy's model for ``model_dir``: ``device='meta'`` the module tree only, ``'cpu'`` with its weights.

    ``device_type='cpu'`` keeps LMDeploy from asking CUDA whether it supports bfloat16 (it does for every
    config that records ``dtype: bfloat16``, and fails on a machine without a GPU). Raises
    :class:`AdapterError` for a folder LMDeploy cannot build.
    """
    path = os.fspath(model_dir)
    if not is_model_folder(path):
        raise AdapterError("is not a model folder (no config.json).", file=path,
                           fix="pass the base model's local folder (the one LMDeploy serves), not a Hub id.")
    from lmdeploy.pytorch.config import ModelConfig
    from lmdeploy.pytorch.model_inputs import BuildModelContext
    from lmdeploy.pytorch.models.patch import build_patched_model

    try:
        cfg = ModelConfig.from_pretrained(path, trust_remote_code=True, dtype=dtype, device_type="cpu")
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
    return model


def release_inference_tensors(model: torch.nn.Module) -> torch.nn.Module:
    """Replace inference-tensor parameters/buffers by ordinary copies, keeping their attributes.

    LMDeploy hangs ``weight_loader`` / ``weight_spliter`` on its Parameters, so each new Parameter
    gets the old one's ``__dict__``. Returns ``model`` (changed in place).
    """
    import torch

    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.is_inference():
                continue
            new = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
            new.__dict__.update(param.__dict__)
            setattr(module, name, new)
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_inference():
                module._buffers[name] = buf.clone()
    return model
