"""TEST-ONLY CPU stand-ins for the few LMDeploy kernels of the vision towers that cannot run on a machine without a
GPU, not even under TRITON_INTERPRET=1 (tests/scripts/vision.py, benchmarks): those of Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, Qwen3.5 and GLM-4.1V (Gemma 3's SigLIP and Llama 4's tower use torch's attention and need none).

* ``FlashAttention`` (the towers' varlen attention) asks for a CUDA driver: :class:`CPUVarlenAttention`
  computes the same non-causal attention per segment ``[q_start_loc, +q_seqlens)`` with torch.
* The Triton ``SiluAndMul`` (Qwen2.5-VL's and GLM-4.1V's vision MLPs) calls ``tl.math.exp`` through a
  module-level alias, which the interpreter rejects: :class:`CPUSiluAndMul` is the same math in torch.
* LMDeploy's Triton RMSNorm asks CUDA for the SM count to size its grid: :func:`answer_device_props`
  answers for CPU (the answer only spreads rows over programs; every row is still computed, interpreted).

They are applied to the served, the merged and the base models alike, so every comparison runs the same
code on both sides; LoRA itself always runs through LMDeploy's own kernel.

Not a kernel, but test-only as well: :func:`zero_unloaded_biases`. LMDeploy 0.18 builds GLM-4.1V's vision
attention ``proj`` with a bias that transformers' GLM-4.1V (and so its checkpoints) does not have; the bias is
``torch.empty`` and no checkpoint tensor is written into it, so each build of the model holds other garbage
there (on CPU sometimes 1e37). Compared models must hold the same base weights, so the scripts zero such biases
on every side and report which.

Build-time, for every test (``tests/conftest.py``): :func:`deepseek_on_cpu`. LMDeploy's DeepSeek-V2/V3 code asks
the GPU two questions while it builds the model:

* ``lmdeploy.pytorch.configurations.deepseek_v2.flash_mla_available`` calls ``torch.cuda.get_device_properties``
  ("Found no NVIDIA driver" on CPU); answered ``False``, its value on any GPU before sm90 or without the
  flash_mla package, so the model is built as on such a GPU (``kv_b_proj`` is still absorbed into kc/vc).
* ``CudaRouterGemmImpl.__init__`` (``lmdeploy.pytorch.backends.cuda.moe_router``) calls
  ``torch.cuda.current_device()`` to ask for a Hopper/Blackwell cuBLAS router GEMM; the stand-in runs the base
  ``RouterGemmImpl.__init__`` and sets ``allow_cublas_router_gemm = False``, its value on every other GPU (the
  router then uses ``F.linear``). Every parameter is built exactly as before.

Both are put back on exit.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

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


def zero_unloaded_biases(model: torch.nn.Module, model_dir) -> list[str]:
    """Zero each bias LMDeploy built beside a weight loaded under the same name but no checkpoint tensor fills
    (uninitialised memory otherwise); returns their names."""
    import pathlib

    from safetensors import safe_open

    keys = set()
    for file in pathlib.Path(model_dir).glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            keys.update(f.keys())
    rename = getattr(type(model), "rename_weight", None)
    loaded = {rename(k) for k in keys} if rename else keys
    zeroed = []
    for name, mod in model.named_modules():
        bias = getattr(mod, "bias", None)
        if isinstance(bias, torch.nn.Parameter) and f"{name}.weight" in loaded and f"{name}.bias" not in loaded:
            with torch.inference_mode():
                bias.zero_()
            zeroed.append(f"{name}.bias")
    return zeroed


@contextlib.contextmanager
def deepseek_on_cpu() -> Iterator[None]:
    """Patch the two GPU questions of LMDeploy's DeepSeek build for the ``with`` block (see the module doc)."""
    import lmdeploy.pytorch.configurations.deepseek_v2 as ds_cfg
    from lmdeploy.pytorch.backends.cuda import moe_router
    from lmdeploy.pytorch.backends.moe_router import RouterGemmImpl

    def router_gemm_init(self, out_dtype=None):
        RouterGemmImpl.__init__(self, out_dtype=out_dtype)
        self.allow_cublas_router_gemm = False

    saved = (ds_cfg.flash_mla_available, moe_router.CudaRouterGemmImpl.__init__)
    ds_cfg.flash_mla_available = lambda: False
    moe_router.CudaRouterGemmImpl.__init__ = router_gemm_init
    try:
        yield
    finally:
        ds_cfg.flash_mla_available, moe_router.CudaRouterGemmImpl.__init__ = saved
