"""TEST-ONLY CPU stand-ins for the few LMDeploy kernels of the Qwen2-VL / Qwen2.5-VL vision towers that cannot
run on a machine without a GPU, not even under TRITON_INTERPRET=1 (tests/scripts/vision.py, benchmarks).

* ``FlashAttention`` (the towers' varlen attention) asks for a CUDA driver: :class:`CPUVarlenAttention`
  computes the same non-causal attention per segment ``[q_start_loc, +q_seqlens)`` with torch.
* Qwen2.5-VL's Triton ``SiluAndMul`` calls ``tl.math.exp`` through a module-level alias, which the
  interpreter rejects: :class:`CPUSiluAndMul` is the same math in torch.
* LMDeploy's Triton RMSNorm asks CUDA for the SM count to size its grid: :func:`answer_device_props`
  answers for CPU (the answer only spreads rows over programs; every row is still computed, interpreted).

They are applied to the served, the merged and the base models alike, so every comparison runs the same
code on both sides; LoRA itself always runs through LMDeploy's own kernel.
"""

from __future__ import annotations

import sys

import torch


class CPUVarlenAttention(torch.nn.Module):
    """Non-causal attention over each segment ``[q_start_loc, q_start_loc + q_seqlens)``, as FlashAttention."""

    def forward(self, q, k, v, q_start_loc, q_seqlens, kv_start_loc=None, kv_seqlens=None, max_q_seqlen=None):
        out = torch.empty_like(q)
        for s, n in zip(q_start_loc.tolist(), q_seqlens.tolist(), strict=True):
            qs, ks, vs = (t[s:s + n].transpose(0, 1) for t in (q, k, v))  # (heads, n, dim)
            out[s:s + n] = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1)
        return out


class CPUSiluAndMul(torch.nn.Module):
    """silu(gate) in float32, cast back, times up: what LMDeploy's SiluAndMul kernel computes."""

    def forward(self, x):
        gate, up = x.chunk(2, -1)
        return torch.nn.functional.silu(gate.float()).to(x.dtype) * up


def answer_device_props() -> None:
    """LMDeploy's Triton norm kernels size their grid from CUDA's SM count; give them an answer on CPU."""
    props = dict(multi_processor_count=4, compute_capability=(9, 0), warps_per_sm=64, blocks_per_sm=32)
    for name, mod in list(sys.modules.items()):
        if name.startswith("lmdeploy.pytorch.kernels.cuda") and hasattr(mod, "get_device_props"):
            mod.get_device_props = lambda device=None: props


def apply(model: torch.nn.Module) -> int:
    """Put the stand-ins into ``model`` (vision attention, SiluAndMul); returns how many attentions."""
    count = 0
    for mod in model.modules():
        if type(getattr(mod, "act_fn", None)).__name__ == "SiluAndMul":
            mod.act_fn = CPUSiluAndMul()
        if type(getattr(mod, "attention", None)).__name__ == "FlashAttention":
            mod.attention = CPUVarlenAttention()
            count += 1
    answer_device_props()
    return count
