"""Which vision-tower and projector layers take LoRA per request, and why any other is refused.

A vision or projector linear never sees the step's token rows: it runs on the rows of the images of the
step, which LMDeploy's LoRA kernel cannot attribute to sequences by itself. They *can* be attributed:
the step's ``input_multimodals`` hold each sequence's images in batch order, the model's
``prepare_inputs_for_generation`` concatenates them in that order, and every row a tower or projector
linear sees comes from one image (steps.py works the rows out; vision.py serves them). That holds for a
model class only when its image path was checked, so :data:`VISION_MODELS` lists the LMDeploy classes
(exact class, not subclasses: LLaVA-Next subclasses LLaVA and tiles differently) whose image path is
verified by tests/scripts/vision.py, with the prefixes of their tower and projector layers.

Anything else on non-token rows is refused with the reason, unless the operator chose to fold those
layers into the base weights (:data:`ENV_FOLD_VISION`; every request then sees the delta, at most one
per layer). A model whose forward rebuilds its own step context (InternVL flash mode) is refused for
every adapter: the rows of its LLM layers and LM head no longer line up with their sequences.

Imported by plan.py, which merge runs without torch: this module imports neither torch nor LMDeploy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import AdapterError
from .model_map import FOLDED, IMAGE_ROWS, NON_TOKEN, PLAIN_LINEAR, Serving, Site

ENV_FOLD_VISION = "LMDEPLOY_REGEX_LORA_FOLD_VISION"
_ON = frozenset({"1", "true", "yes", "on"})
_OFF = frozenset({"", "0", "false", "no", "off"})

FOLD_FIX = (f"set {ENV_FOLD_VISION}=1 to fold these layers into the base weights (every request, other adapters "
            "and the base model included, then sees that delta; at most one adapter per layer), or merge the "
            "adapter into the base model (`lmdeploy-regex-lora merge`) and serve the merge.")


@dataclass(frozen=True)
class VisionModel:
    """A model class whose image rows were verified: image ``i`` of a step owns the ``i``-th block of rows,
    in proportion to its units (the leading size of its ``MultiModalData.data``)."""

    label: str
    prefixes: tuple[str, ...]  # checkpoint names of the tower and projector layers
    unit: str  # what one unit is for this model: a tile, a patch, an image


#: LMDeploy classes (``module.QualName``) whose tower and projector are served per request.
VISION_MODELS: dict[str, VisionModel] = {
    "lmdeploy.pytorch.models.internvl.InternVLChatModel":
        VisionModel("InternVL chat", ("vision_model.", "mlp1."), "tile"),
    "lmdeploy.pytorch.models.internvl3_hf.InternVLForConditionalGeneration":
        VisionModel("InternVL3-hf", ("vision_tower.", "multi_modal_projector."), "tile"),
    "lmdeploy.pytorch.models.qwen2_vl.Qwen2VLForConditionalGeneration":
        VisionModel("Qwen2-VL", ("visual.",), "patch"),
    "lmdeploy.pytorch.models.qwen2_5_vl.Qwen2_5_VLForConditionalGeneration":
        VisionModel("Qwen2.5-VL", ("visual.",), "patch"),
    "lmdeploy.pytorch.models.llava.LlavaForConditionalGeneration":
        VisionModel("LLaVA", ("vision_tower.", "multi_modal_projector."), "image"),
}


def fold_vision() -> bool:
    """Whether the operator chose folding (:data:`ENV_FOLD_VISION`); a value that is no boolean is an error."""
    value = os.environ.get(ENV_FOLD_VISION, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise AdapterError(f"{ENV_FOLD_VISION}={value!r} is neither on (1, true, yes, on) nor off (0, false, no, off).",
                       field=ENV_FOLD_VISION, fix=f"unset {ENV_FOLD_VISION} (per request, the default) or set it to 1.")


def off_token_rows(site: Site) -> bool:
    """A linear outside the text decoder and LM head: its rows are image rows on a vision-language model."""
    return site.serving in (NON_TOKEN, PLAIN_LINEAR)


def class_name(model: object) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


@dataclass(frozen=True)
class VisionPolicy:
    """How one model serves LoRA on layers outside the text decoder."""

    model_class: str
    rule: VisionModel | None
    fold: bool
    refusal: str | None  # why every adapter is refused on this model, if it is

    def serving(self, site: Site, module: object = None) -> tuple[Serving | None, str]:
        """How a vision/projector site (``NON_TOKEN`` or ``PLAIN_LINEAR``) is served, or (None, why not).

        ``module`` is LMDeploy's module of the site, when there is one (not for a checkpoint map).
        """
        assert off_token_rows(site), site
        if self.fold:
            return FOLDED, ""
        if self.rule is None:
            verified = ", ".join(m.label for m in VISION_MODELS.values())
            return None, (f"off the text decoder's token rows, and {self.model_class.rsplit('.', 1)[-1]} is not a "
                          f"model whose image rows are verified for per-request LoRA ({verified})")
        if not site.hf_name.startswith(self.rule.prefixes):
            return None, f"outside {self.rule.label}'s vision tower and projector ({', '.join(self.rule.prefixes)})"
        if getattr(module, "tp", 1) > 1 and getattr(getattr(module, "tp_mode", None), "name", "") == "DP_TP":
            # _forward_dp_tp may gather input rows from the other data-parallel ranks: not this step's images.
            return None, "built for data-parallel attention (DP_TP), whose input rows may come from other ranks"
        return IMAGE_ROWS, ""


def vision_policy(model: object | None) -> VisionPolicy:
    """The policy for LMDeploy's ``model`` (None: a checkpoint map, which has no vision layers to decide)."""
    if model is None:
        return VisionPolicy("", None, False, None)
    name = class_name(model)
    refusal = None
    if getattr(model, "flash_mode", None):
        refusal = ("this model runs in InternVL flash mode (config flash_mode), whose forward compresses visual "
                   "tokens and rebuilds the step context inside the model (update_forward_inputs): LMDeploy "
                   "then keeps the old q_start_loc, so LoRA rows of the LLM layers no longer line up with their "
                   "sequences, the LM head's record of the step loses its adapter ids, and which tiles are "
                   "compressed depends on the other requests' images. No adapter can be served exactly.")
    return VisionPolicy(name, VISION_MODELS.get(name), fold_vision(), refusal)
