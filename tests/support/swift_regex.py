"""ms-swift's multimodal LoRA target regex with the vision tower and aligner unfrozen, for issue 11's VLMs.

``get_multimodal_target_regex(freeze_llm=False, freeze_vit=False, freeze_aligner=False)`` writes one alternative per
module prefix of the family's ``ModelArch`` (LLM, vision tower, aligners), each ending in the linear leaf names
``find_all_linears`` finds under that prefix; an aligner nested under the vision tower is kept out of the tower's
alternative by a negative look-ahead (unescaped, as swift writes it). swift 4.x (and >= 3.12.6) escapes the prefix
and adds ``(?=\\.)``; 3.4.1 - 3.12.5 wrote the bare prefix. Prefixes: /work/proto11b/REPORT.md (swift's
``model_arch.py``); leaves: swift's ``find_layers`` rules applied to transformers 5.24's module trees (a leaf whose
name ends another, non-linear module's name gets its parent's name in front: ``attn.proj`` beside the patch
embedding's conv ``proj``). swift builds the leaves from a set, so their order varies; sorted here.
"""

from __future__ import annotations

import re

FC12 = "linear_fc1|linear_fc2"
QWEN3_VIT = "attn.proj|linear_fc1|linear_fc2|qkv"

#: arch -> [(prefix, leaves)] of the vision tower and aligners, and which of those prefixes are aligners.
VISION_PARTS: dict[str, tuple[list[tuple[str, str]], tuple[str, ...]]] = {
    "qwen3_vl": ([("model.visual", QWEN3_VIT), ("model.visual.merger", FC12),
                  ("model.visual.deepstack_merger_list", FC12)],
                 ("model.visual.merger", "model.visual.deepstack_merger_list")),
    "qwen3_5": ([("model.visual", QWEN3_VIT), ("model.visual.merger", FC12)], ("model.visual.merger",)),
    # merger.proj: swift's leaf for GLM's merger projection (patch_embed.proj is a conv); the merger's own alternative
    # (model\.visual\.merger(?=\.).*\.merger\.proj) cannot match it and the tower's excludes the merger: swift's
    # unfrozen form leaves that plain nn.Linear untrained
    "glm4_1v": ([("model.visual", "attn.proj|down_proj|gate_proj|merger.proj|qkv|up_proj"),
                 ("model.visual.merger", "down_proj|gate_proj|merger.proj|up_proj")], ("model.visual.merger",)),
    # the projector (mm_input_projection_weight) has no linear: swift writes no alternative for it
    "gemma3_vl": ([("model.vision_tower", "fc1|fc2|k_proj|out_proj|q_proj|v_proj")], ("model.multi_modal_projector",)),
    # linear: the patch embedding's nn.Linear (Llama4UnfoldConvolution)
    "llama4": ([("vision_model", "fc1|fc2|k_proj|linear|o_proj|q_proj|v_proj"), ("multi_modal_projector", "linear_1")],
               ("multi_modal_projector",)),
}
VISION_PARTS["qwen3_vl_moe"] = VISION_PARTS["qwen3_vl"]
VISION_PARTS["qwen3_5_moe"] = VISION_PARTS["qwen3_5"]


def swift_unfrozen(arch: str, llm_prefix: str, llm_leaves: str, version: int = 4) -> str:
    """The regex swift ``version`` (3: 3.4.1 - 3.12.5, 4: 4.x) writes for ``arch`` with every part unfrozen."""
    parts, aligners = VISION_PARTS[arch]
    res = []
    for prefix, leaves in [(llm_prefix, llm_leaves), *parts]:
        rejected = [a for a in aligners if a.startswith(prefix + ".")]
        look = f"(?!({'|'.join(rejected)}))" if rejected else ""
        head = re.escape(prefix) + r"(?=\.)" if version >= 4 else prefix
        res.append(rf"{look}{head}.*\.({leaves})")
    return rf"^({'|'.join(res)})$"
