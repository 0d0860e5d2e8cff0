"""Run LMDeploy's real LoRA forward (Triton kernel, interpreted on CPU) on plugin-loaded slots.

Usage: TRITON_INTERPRET=1 python tests/scripts/kernel.py SPEC.json  (written by tests/test_kernel.py).
For every LoRA-carrying linear it feeds a packed batch whose sequences use different adapter ids
(and none), through the module's own forward (base GEMM + ``TritonLoRAImpl``), and compares each
sequence's rows with the same rows through the natively loaded merged model (or the base model for
id 0). Prints one JSON line of results; exits 1 on any mismatch.
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

TOL = 2e-5


def main() -> int:
    spec = json.load(open(sys.argv[1]))
    assert lmdeploy_regex_lora.install()
    from lmdeploy.pytorch.kernels.cuda import fused_lora as fl
    from lmdeploy.pytorch.models import patch
    from lmdeploy.pytorch.nn.linear.base import LinearBase

    # The autotuner would time configs on a GPU driver; with one config it just launches.
    fl._fused_lora_kernel.configs = fl._fused_lora_kernel.configs[:1]

    served = build_lmdeploy_model(spec["base"])
    patch.add_adapters(served, spec["adapters"], dtype=torch.float32, device=torch.device("cpu"))
    refs = {0: build_lmdeploy_model(spec["base"])}
    refs.update({int(k): build_lmdeploy_model(v) for k, v in spec["merged"].items()})
    ref_modules = {aid: dict(m.named_modules()) for aid, m in refs.items()}

    gen = torch.Generator().manual_seed(0)
    layouts = [
        # prefill: packed sequences of different lengths, adapters mixed with no adapter
        dict(seqlens=[3, 2, 5, 1, 4], ids=spec["prefill_ids"], decoding=False),
        # decoding: one token per sequence
        dict(seqlens=[1] * len(spec["prefill_ids"]), ids=spec["prefill_ids"][::-1], decoding=True),
    ]
    results = {"modules": 0, "max_err": 0.0, "failures": []}
    with torch.inference_mode():
        for name, mod in served.named_modules():
            if not isinstance(mod, LinearBase) or len(mod.lora_adapters) == 0:
                continue
            results["modules"] += 1
            for lay in layouts:
                seqlens = torch.tensor(lay["seqlens"])
                starts = torch.cumsum(seqlens, 0) - seqlens
                ids = torch.tensor(lay["ids"])
                x = torch.randn(1, int(seqlens.sum()), mod.in_features, generator=gen)
                ctx = SimpleNamespace(q_start_loc=starts, q_seqlens=seqlens, local_adapter_ids=ids,
                                      is_decoding=lay["decoding"])
                served.ctx_mgr.set_context(ctx)
                try:
                    out = mod(x.clone())[0]
                finally:
                    served.ctx_mgr.set_context(None)
                for s, n, aid in zip(starts.tolist(), seqlens.tolist(), ids.tolist(), strict=True):
                    ref = ref_modules[aid][name](x[:, s:s + n].clone())[0]
                    err = float((out[s:s + n] - ref).abs().max())
                    results["max_err"] = max(results["max_err"], err)
                    if err > TOL:
                        results["failures"].append([name, aid, lay["decoding"], err])
    print(json.dumps(results))
    return 1 if results["failures"] or results["modules"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
