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
    #: the entry of each sequence's ``input_multimodals`` that ``prepare_inputs_for_generation`` concatenates
    #: into the tower's input ('mm_data' on Qwen3-VL / Qwen3.5: images and videos in one list)
    key: str = "image"


#: LMDeploy classes (``module.QualName``, exact class) whose tower and projector are served per request: (class
#: under lmdeploy.pytorch.models, label, checkpoint prefixes of the tower and projector, unit[, key]). Each unit rule
#: is read from the class's prepare_inputs_for_generation and vision forward in LMDeploy 0.18; tests/test_vision.py
#: runs each one's image path on a batch mixing adapters.
VISION_MODELS: dict[str, VisionModel] = {f"lmdeploy.pytorch.models.{cls}": VisionModel(*rule) for cls, *rule in (
    # InternViT: every token of each tile, CLS included; mlp1: each tile's tokens after the pixel shuffle
    ("internvl.InternVLChatModel", "InternVL chat", ("vision_model.", "mlp1."), "tile"),
    ("internvl3_hf.InternVLForConditionalGeneration", "InternVL3-hf",
     ("vision_tower.", "multi_modal_projector."), "tile"),
    # blocks: one row per patch, merger: one per 2x2 patches; Qwen2.5-VL's window order stays inside each image
    ("qwen2_vl.Qwen2VLForConditionalGeneration", "Qwen2-VL", ("visual.",), "patch"),
    ("qwen2_5_vl.Qwen2_5_VLForConditionalGeneration", "Qwen2.5-VL", ("visual.",), "patch"),
    ("llava.LlavaForConditionalGeneration", "LLaVA", ("vision_tower.", "multi_modal_projector."), "image"),
    # 'mm_data': images and videos in one list, every item through the tower; blocks one row per patch, the merger
    # and Qwen3-VL's deepstack mergers one per 2x2 patches (of the tapped block's output)
    ("qwen3_vl.Qwen3VLForConditionalGeneration", "Qwen3-VL", ("model.visual.",), "patch", "mm_data"),
    ("qwen3_vl_moe.Qwen3VLMoeForConditionalGeneration", "Qwen3-VL-MoE", ("model.visual.",), "patch", "mm_data"),
    ("qwen3_5.Qwen3_5ForConditionalGeneration", "Qwen3.5", ("model.visual.",), "patch", "mm_data"),
    ("qwen3_5_moe.Qwen3_5MoeForConditionalGeneration", "Qwen3.5-MoE", ("model.visual.",), "patch", "mm_data"),
    # blocks: one row per patch; merger (after the 2x2 downsample conv, plain nn.Linear proj included): one per 4
    ("glm4_1v.Glm4vForConditionalGeneration", "GLM-4.1V", ("model.visual.",), "patch"),
    # SigLIP on (images, patches, width): each image's patch rows; the projector is a bare matmul weight, no linear
    ("gemma3_vl.Gemma3ForConditionalGeneration", "Gemma 3", ("vision_tower.",), "image"),
    # (tiles, patches, width) through the encoder (CLS last), the patch embedding's and the projector's plain
    # nn.Linear: each tile's rows, before and after the pixel shuffle
    ("llama4.Llama4ForConditionalGeneration", "Llama 4", ("vision_model.", "multi_modal_projector."), "tile"),
)}


def image_key(model: object) -> str:
    """The ``input_multimodals`` entry whose items are the images of ``model``'s tower (see :class:`VisionModel`)."""
    rule = VISION_MODELS.get(class_name(model))
    return rule.key if rule else "image"


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
