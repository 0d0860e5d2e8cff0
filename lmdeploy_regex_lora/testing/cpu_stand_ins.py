"""Test-only stand-ins that let LMDeploy 0.18 build DeepSeek-V2/V3 on a machine without CUDA.

Never used when serving. Two places of LMDeploy's DeepSeek code ask the GPU a question at build time:

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
from collections.abc import Iterator


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
