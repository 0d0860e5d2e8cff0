"""LoRA on vision towers and projectors, per request: the image-row slot, and slots on plain ``nn.Linear``.

A tower or projector linear runs on the rows of the step's images, not on its token rows, so LMDeploy's
kernel cannot take its runs from the step context. :class:`ImageRowLoRA` hands LMDeploy's own kernel one
run of rows per image instead (consecutive images of one adapter joined; images whose adapter leaves the
layer alone, "no adapter" included, skipped, so their rows are exactly the base layer's). Which rows
belong to which image, and so to which sequence and adapter, comes from the step's inputs recorded at
``build_context`` (steps.py); that the model lays its rows out that way is what vision_policy.py's table
of verified models stands for.

Some of these layers are plain ``torch.nn.Linear`` (InternVL's ``mlp1``, the Qwen2-VL merger, LLaVA's
projector), which have no ``lora_adapters``. :func:`wrap_plain_linear` puts a :class:`LoRALinear` in their
place that holds the *same* Parameter objects (names, state-dict keys and ``isinstance`` unchanged);
:func:`unwrap_plain_linears` puts the original objects back, which a failed load (loader's snapshot) and
``uninstall()`` (:func:`unwrap_all`) do, leaving the model bit-identical.
"""

from __future__ import annotations

import logging
import weakref

import torch
from lmdeploy.pytorch.nn.linear import LoRA
from torch import nn
from torch.nn import functional as F

from .lm_head import forward_runs, recorded_step
from .steps import IMAGE, ImageRowsError

logger = logging.getLogger("lmdeploy.regex_lora")

#: Models that hold wrapped plain linears, for ``uninstall()``; weak, so a model still goes away with its owner.
_WRAPPED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class ImageRowLoRA(LoRA):
    """LMDeploy's ``LoRA`` slot on a vision/projector linear: each image's rows get its sequence's adapter."""

    def __init__(self, *args, mm_key: str = IMAGE, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._ranks = [int(r) for r in self.adapter_info.ranks.tolist()]  # host copy, made once at load
        self.mm_key = mm_key  # the input_multimodals entry the model's tower runs on (vision_policy.VisionModel.key)

    def forward(self, x, base_output=None):
        step = recorded_step(self, "vision tower / projector")
        current = self.ctx_mgr.current_context()
        if step is None or current is None or current.input_multimodals is not step.input_multimodals:
            raise ImageRowsError(
                "[lmdeploy-regex-lora] a vision/projector layer with LoRA ran outside the step whose images the "
                "plugin recorded at build_context, so the adapter of each row is unknown; the step is refused "
                "rather than served with the wrong adapter. Please report this with your LMDeploy version.")
        num_rows = x.numel() // x.size(-1)
        runs = step.image_runs(num_rows, self.mm_key) if num_rows else None
        if runs is None:
            return base_output  # no adapter ids in this step: every row is "no adapter"
        live = tuple(r for r in runs if self._ranks[r[2]])  # images whose adapter changes this layer
        if not live:
            return base_output
        key = ("image-run-tensors", live, str(x.device))
        if key not in step.cache:  # one host-to-device copy per step for every slot with the same runs
            runs_t = torch.tensor(live, dtype=torch.long).to(x.device)
            step.cache[key] = (runs_t[:, 0].contiguous(), runs_t[:, 1].contiguous(), runs_t[:, 2].contiguous())
        return forward_runs(self, x, base_output, *step.cache[key])


class LoRALinear(nn.Linear):
    """Stands in for a plain ``nn.Linear``: the same Parameter objects, plus ``lora_adapters`` as LMDeploy's
    linears have them. The original module is kept (not as a submodule: the tree gains no names but the slots)."""

    def __init__(self, base: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.lora_adapters = nn.ModuleDict()
        self.train(base.training)
        object.__setattr__(self, "original", base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # nn.Linear.forward, so "no adapter" rows are bit-identical
        for lora in self.lora_adapters.values():
            out = lora(x, out)
        return out


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf


def wrap_plain_linear(model: nn.Module, name: str) -> LoRALinear:
    """Put a :class:`LoRALinear` in place of the plain ``nn.Linear`` ``name`` (or return the one already there)."""
    parent, leaf = _parent(model, name)
    base = getattr(parent, leaf)
    if isinstance(base, LoRALinear):
        return base
    if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
        raise TypeError(f"{name} is a {type(base).__name__}{' with hooks' if type(base) is nn.Linear else ''}; "
                        "only a plain torch.nn.Linear is given LoRA slots this way")
    wrapper = LoRALinear(base)
    setattr(parent, leaf, wrapper)
    _WRAPPED.add(model)
    return wrapper


def unwrap_plain_linears(model: nn.Module) -> list[str]:
    """Put every wrapped ``nn.Linear`` of ``model`` back (the original object); returns their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, getattr(parent, leaf).original)
    _WRAPPED.discard(model)
    return names


def unwrap_all() -> None:
    """``uninstall()``: take the plugin's wrappers out of every model; their layers then serve the base weights."""
    for model in list(_WRAPPED):
        names = unwrap_plain_linears(model)
        if names:
            logger.warning("uninstall() took per-request LoRA off %d plain Linear layer(s) of a loaded model "
                           "(%s): requests for adapters that train them now get the base layer there (slots on "
                           "LMDeploy's own vision linears, if any, refuse steps without the plugin).",
                           len(names), ", ".join(names[:4]) + (" ..." if len(names) > 4 else ""))
