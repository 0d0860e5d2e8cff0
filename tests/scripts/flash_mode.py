"""What InternVL flash mode's step rebuild does to per-request LoRA (run by tests/test_vision.py).

Usage: TRITON_INTERPRET=1 python tests/scripts/flash_mode.py SPEC.json

In flash mode LMDeploy's ``InternVLChatModel.forward`` compresses the visual tokens and then calls
``update_forward_inputs``, which builds new ``ModelInputs`` (no adapter ids, no images), passes them to
``ctx_mgr.build_context`` and copies only ``q_seqlens`` back onto the live step context. The plugin
refuses flash-mode models at load for that reason; this script shows why, on the tiny (non-flash) InternVL2
with adapters loaded through LMDeploy's ``add_adapters`` (a: LLM + LM head ``output``, b: LLM): it calls that
very method inside a step, as flash mode's forward does, with the sequence lengths compression would give,
then runs an LLM LoRA layer and the LM head (LMDeploy's Triton kernel, interpreted) and compares each
sequence with its merged model. Prints one JSON line of what happened.
"""

from __future__ import annotations

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before Triton is imported"

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import lmdeploy_regex_lora  # noqa: E402
from lmdeploy_regex_lora.serve.steps import STEP_ATTR  # noqa: E402
from lmdeploy_regex_lora.testing import vision_check as vc  # noqa: E402

LAYER = "language_model.model.layers.0.attention.wqkv"
OLD, NEW, IDS = [6, 9, 7], [4, 5, 7], [1, 2, 0]  # compression shortens sequences 0 and 1


def main() -> int:
    spec = json.load(open(sys.argv[1]))
    assert lmdeploy_regex_lora.install()
    vc.use_interpreted_kernel()
    from lmdeploy.pytorch.model_inputs import ModelInputs, step_ctx_manager

    served, models = vc.served_and_references(spec["base"], spec["adapters"], spec["merged"])
    refs = {aid: model for aid, (model, _) in models.items()}
    runner = vc.VisionRunner(served, spec["base"])
    n, zeros = len(OLD), torch.zeros(len(OLD), dtype=torch.long)
    inputs = ModelInputs(input_ids=torch.arange(sum(OLD))[None], seq_length=torch.tensor(OLD), history_lengths=zeros,
                         block_offsets=torch.zeros(n, 1, dtype=torch.long), is_decoding=False,
                         num_ignored_history=zeros, max_q_seqlen=max(OLD), max_kv_seqlen=max(OLD),
                         sum_kv_seqlen=sum(OLD), local_adapter_ids=torch.tensor(IDS), model_metas=[None] * n)
    gen = torch.Generator().manual_seed(0)
    layer = served.get_submodule(LAYER)
    hidden = served.get_input_embeddings().weight.shape[1]
    out: dict = {}
    with torch.inference_mode(), step_ctx_manager(served.ctx_mgr):
        ctx = served.ctx_mgr.build_context(inputs=inputs, model_config=runner.model_config,
                                           cache_config=runner.cache_config)
        with served.ctx_mgr.context(ctx):
            served.update_forward_inputs(torch.arange(sum(NEW))[None], NEW, ctx)  # LMDeploy's own method
            step = getattr(served.ctx_mgr, STEP_ATTR)
            out["recorded_adapter_ids_after"] = None if step.adapter_ids is None else step.adapter_ids.tolist()
            out["q_start_loc_after"], out["q_seqlens_after"] = ctx.q_start_loc.tolist(), ctx.q_seqlens.tolist()
            x = torch.randn(1, sum(NEW), layer.in_features, generator=gen)
            y = layer(x.clone())
            h = torch.randn(1, sum(NEW), hidden, generator=gen)
            last = torch.tensor(NEW).cumsum(0) - 1
            logits = served.get_logits(h[:, last])[0]
        llm, head, start = [], [], 0
        for i, (length, aid) in enumerate(zip(NEW, IDS, strict=True)):
            ref = refs[aid].get_submodule(LAYER)(x[:, start:start + length].clone())
            llm.append(float((y[:, start:start + length] - ref).abs().max()))
            head.append(float((logits[i] - refs[aid].get_logits(h[:, last[i]:last[i] + 1])[0, 0]).abs().max()))
            start += length
    out["llm_layer_max_err_per_seq"], out["lm_head_max_err_per_seq"] = llm, head
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
