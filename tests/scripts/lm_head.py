"""LM-head LoRA per request, through LMDeploy's own code paths (run by tests/test_lm_head.py).

Usage: TRITON_INTERPRET=1 python tests/scripts/lm_head.py SPEC.json

The step's rows are described by a real ``ModelInputs`` passed through the served model's real
``ctx_mgr.build_context`` (where the plugin records them); the LM-head rows are cut by LMDeploy's
own ``BaseModelAgent._postprocess_forward_output`` (last token per sequence, via
``ARModelAgentStrategy.slice_outputs``) and ``BaseModelAgent._get_input_logits`` (``logits_indices``),
or left whole (``return_logits``); logits come from the served model's ``get_logits`` (LM head +
LMDeploy's Triton LoRA kernel, interpreted on CPU). Each row must equal the row through the merged
model of its own adapter (the base model for "no adapter"). Prints a JSON line; exit 1 on mismatch.
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before Triton is imported"

import torch  # noqa: E402

# Run as a file: put the repository root (two folders up) first, for the package and ``tests.support``.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import lmdeploy_regex_lora  # noqa: E402
from lmdeploy_regex_lora.testing.build import build_lmdeploy_model  # noqa: E402

TOL = 5e-5


def model_inputs(seqlens, ids, decoding, logits_indices=None):
    from lmdeploy.pytorch.model_inputs import ModelInputs

    n = len(seqlens)
    seq = torch.tensor(seqlens)
    total = int(seq.sum())
    return ModelInputs(
        input_ids=torch.arange(total)[None], seq_length=seq,
        history_lengths=torch.full((n,), 4 if decoding else 0, dtype=torch.long),
        block_offsets=torch.zeros(n, 1, dtype=torch.long), is_decoding=decoding,
        num_ignored_history=torch.zeros(n, dtype=torch.long), max_q_seqlen=max(seqlens),
        max_kv_seqlen=max(seqlens) + (4 if decoding else 0), sum_kv_seqlen=total,
        local_adapter_ids=torch.tensor(ids),
        logits_indices=None if logits_indices is None else torch.tensor(logits_indices),
        seq_logit_length=None if logits_indices is None else seq.clone())


def main() -> int:
    spec = json.load(open(sys.argv[1]))
    assert lmdeploy_regex_lora.install()
    from lmdeploy.pytorch.config import CacheConfig, ModelConfig
    from lmdeploy.pytorch.engine.model_agent.agent import BaseModelAgent
    from lmdeploy.pytorch.kernels.cuda import fused_lora as fl
    from lmdeploy.pytorch.model_inputs import step_ctx_manager
    from lmdeploy.pytorch.models import patch
    from lmdeploy.pytorch.strategies.ar.model_agent import ARModelAgentStrategy

    fl._fused_lora_kernel.configs = fl._fused_lora_kernel.configs[:1]  # no GPU timing in the autotuner
    served = build_lmdeploy_model(spec["base"])
    patch.add_adapters(served, spec["adapters"], dtype=torch.float32, device=torch.device("cpu"))
    refs = {0: build_lmdeploy_model(spec["base"])}
    refs.update({int(k): build_lmdeploy_model(v) for k, v in spec["merged"].items()})
    model_config = ModelConfig.from_pretrained(spec["base"], trust_remote_code=True, dtype="float32")
    cache_config = CacheConfig(max_batches=8, block_size=16, num_cpu_blocks=0, num_gpu_blocks=16)
    strategy = ARModelAgentStrategy()
    agent = SimpleNamespace(  # only what LMDeploy's two agent methods read from `self`
        _slice_outs=strategy.slice_outputs, get_logits=served.get_logits,
        _is_prefill_input_logprobs=BaseModelAgent._is_prefill_input_logprobs)

    cases = {
        "prefill-last-token": dict(seqlens=[3, 2, 4, 1, 2], ids=[1, 0, 2, 1, 2], decoding=False),
        "prefill-return-logits": dict(seqlens=[3, 2, 4, 1, 2], ids=[2, 1, 0, 2, 1], decoding=False, whole=True),
        "prefill-input-logprobs": dict(seqlens=[3, 2, 4], ids=[1, 2, 0], decoding=False,
                                       logits_indices=[0, 1, 3, 5, 6, 7]),
        "decoding": dict(seqlens=[1, 1, 1, 1], ids=[2, 0, 1, 2], decoding=True),
        "one-adapter-batch": dict(seqlens=[2, 3], ids=[2, 2], decoding=False),
    }
    gen = torch.Generator().manual_seed(0)
    results = {"cases": {}, "failures": []}
    hidden_size = served.get_input_embeddings().weight.shape[1]
    with torch.inference_mode():
        for label, case in cases.items():
            inputs = model_inputs(case["seqlens"], case["ids"], case["decoding"], case.get("logits_indices"))
            with step_ctx_manager(served.ctx_mgr):
                served.ctx_mgr.build_context(inputs=inputs, model_config=model_config, cache_config=cache_config)
            hidden = torch.randn(1, int(inputs.seq_length.sum()), hidden_size, generator=gen)
            token_ids = torch.repeat_interleave(inputs.local_adapter_ids, inputs.seq_length)
            if case.get("logits_indices") is not None:
                logits = BaseModelAgent._get_input_logits(agent, hidden, inputs)
                rows = hidden[0].index_select(0, inputs.logits_indices)
                row_ids = token_ids.index_select(0, inputs.logits_indices)
            elif case.get("whole"):
                logits = served.get_logits(hidden)[0]
                rows, row_ids = hidden[0], token_ids
            else:
                out = BaseModelAgent._postprocess_forward_output(agent, {"hidden_states": hidden}, inputs)
                logits = served.get_logits(out["hidden_states"])[0]
                rows, row_ids = out["hidden_states"][0], inputs.local_adapter_ids
            assert logits.shape[0] == rows.shape[0] == row_ids.numel()
            err = 0.0
            for i, aid in enumerate(row_ids.tolist()):
                ref = refs[aid].get_logits(rows[i:i + 1][None])[0, 0]
                err = max(err, float((logits[i] - ref).abs().max()))
            results["cases"][label] = {"rows": int(rows.shape[0]), "max_err": err}
            if err > TOL:
                results["failures"].append(label)
    print(json.dumps(results))
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
