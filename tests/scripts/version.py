"""Run the plugin's checks against whichever LMDeploy release this python imports.

Usage: python tests/scripts/version.py SPEC.json  (run by tests/test_versions.py and scripts/version_matrix.py with
the python of an overlay venv: an older ``lmdeploy`` installed ahead of the dev venv's 0.18.0, and our
wheel, activated by its ``.pth``). Prints one ``RESULT {json}`` line.

SPEC: {"cases": {arch: {"base": dir, "adapters": {name: dir}, "merged": {id: dir}}}, "mode": ...,
       "kernel_arch": arch or null}
* mode "plugin": the plugin must be active; for each case, LMDeploy's ``add_adapters`` (as the model agent
  binds it) loads the adapters and every linear is compared with the PEFT-merged checkpoint loaded natively
  by the same release (``verify.compare``). With ``kernel_arch``, a few LoRA linears of that case also run
  their real forward (LMDeploy's ``TritonLoRAImpl`` and Triton kernel, interpreted on CPU) on a batch mixing
  adapters, against the merged model's linears.
* mode "observe": report what ``add_adapters`` does (the exception, or a digest of every LoRA tensor it
  created) without judging; run with and without ``LMDEPLOY_REGEX_LORA_DISABLE=1`` to show that outside its
  supported range the plugin leaves LMDeploy exactly as it is.

Releases before 0.17 import ``lmdeploy.pytorch.kernels.cuda`` with a Triton driver query at import time
(``supports_tma()``), which has no driver to ask on a CPU machine; only when Triton has no active driver,
it gets a stand-in that reports a non-CUDA target (nothing else of Triton is touched).
"""

from __future__ import annotations

import sys

AT_START = sorted(m for m in sys.modules if m.startswith("lmdeploy_regex_lora"))

import hashlib  # noqa: E402
import importlib.metadata  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

OUR_LOGGER = "lmdeploy.regex_lora"


def cpu_triton_driver() -> bool:
    """Give Triton a stand-in driver when it has none (CPU machine); True when one was installed."""
    import triton
    from triton.backends.compiler import GPUTarget

    try:
        triton.runtime.driver.active  # noqa: B018 - the property raises without a driver
        return False
    except RuntimeError:
        pass

    class CpuStandIn:
        def get_current_target(self):
            return GPUTarget("cpu", 0, 0)

        def get_current_device(self):
            return 0

    triton.runtime.driver.set_active(CpuStandIn())
    return True


def build(path: str, tp: int = 1):
    """LMDeploy's model for ``path`` on CPU, built the way this release's ``BaseModelAgent._build_model`` does.

    With ``tp`` > 1 the caller holds a ``DistContext`` for one rank (see :func:`rank_context`).
    """
    import torch
    from lmdeploy.pytorch.config import ModelConfig
    from lmdeploy.pytorch.models.patch import build_patched_model
    from lmdeploy.pytorch.weight_loader.model_weight_loader import load_model_weights

    extra = {}
    if tp > 1:
        from lmdeploy.pytorch.distributed import get_dist_manager

        extra["dist_config"] = get_dist_manager().current_context().dist_config
    cfg = ModelConfig.from_pretrained(path, trust_remote_code=True, dtype="float32", **extra)
    kwargs = {}
    if "build_model_ctx" in inspect.signature(build_patched_model).parameters:
        from dataclasses import fields

        from lmdeploy.pytorch.model_inputs import BuildModelContext

        names = {f.name for f in fields(BuildModelContext)}
        ctx_args = {k: getattr(cfg, k) for k in ("quant_config", "fp32_lm_head", "tie_word_embeddings")
                    if k in names and hasattr(cfg, k)}
        kwargs["build_model_ctx"] = BuildModelContext(**ctx_args)
    model = build_patched_model(cfg, device=torch.device("cpu"), **kwargs)
    load_model_weights(model, path, device=torch.device("cpu"))
    return model


def rank_context(tp: int, rank: int):
    """One TP rank's ``DistContext`` without process groups (as tests/test_tp.py; building needs no collective)."""
    from lmdeploy.pytorch.config import DistConfig
    from lmdeploy.pytorch.distributed import DistContext, DistGroup, get_dist_manager

    groups = {f"{k}_group": DistGroup(rank=rank) for k in ("tp", "attn_tp", "mlp_tp", "moe_tp")}
    return get_dist_manager().context(DistContext(rank=rank, dist_config=DistConfig(tp=tp), **groups))


def cli_wrapped() -> dict:
    """Whether the commands that pick an engine hold our backend-choice wrappers."""
    from lmdeploy.cli import chat
    from lmdeploy.cli.serve import SubCliServe

    mark = "_lmdeploy_regex_lora_wrapper"
    return {"serve": getattr(type(SubCliServe.api_server), mark, False) is True,
            "chat": getattr(type(chat.main), mark, False) is True}


def agent_add_adapters():
    """``add_adapters`` as the model agent calls it (package module since 0.12, flat module before)."""
    try:
        from lmdeploy.pytorch.engine.model_agent import agent
    except ImportError:
        from lmdeploy.pytorch.engine import model_agent as agent
    return agent


def lora_digest(model) -> dict:
    out = {}
    for name, param in model.named_parameters():
        if ".lora_adapters." in name:
            out[name] = hashlib.sha256(param.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]
    return out


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == OUR_LOGGER and record.levelno >= logging.INFO:
            self.lines.append(f"{record.levelname}: {record.getMessage().splitlines()[0]}")


def kernel_forward(served, refs: dict, max_modules: int = 3) -> dict:
    """Real LoRA forward of a few plugin-served linears on a mixed batch, against merged/base linears."""
    from lmdeploy.pytorch.kernels.cuda import fused_lora as fl
    from lmdeploy.pytorch.nn.linear.base import LinearBase

    fl._fused_lora_kernel.configs = fl._fused_lora_kernel.configs[:1]  # the autotuner would time on a GPU
    import torch

    ref_modules = {aid: dict(m.named_modules()) for aid, m in refs.items()}
    ids = sorted(refs)
    seqlens = torch.tensor([3, 2, 4, 1][: len(ids)] + [2] * max(0, len(ids) - 4))
    starts = torch.cumsum(seqlens, 0) - seqlens
    adapter_ids = torch.tensor(ids)
    gen = torch.Generator().manual_seed(0)
    result = {"modules": [], "max_err": 0.0}
    picked = [(n, m) for n, m in served.named_modules() if isinstance(m, LinearBase) and len(m.lora_adapters)]
    with torch.inference_mode():
        for name, mod in picked[:max_modules]:
            x = torch.randn(1, int(seqlens.sum()), mod.in_features, generator=gen)
            ctx = SimpleNamespace(q_start_loc=starts, q_seqlens=seqlens, local_adapter_ids=adapter_ids,
                                  is_decoding=False)
            served.ctx_mgr.set_context(ctx)
            try:
                out = mod(x.clone())[0]
            finally:
                served.ctx_mgr.set_context(None)
            for s, n, aid in zip(starts.tolist(), seqlens.tolist(), ids, strict=True):
                ref = ref_modules[aid][name](x[:, s:s + n].clone())[0]
                result["max_err"] = max(result["max_err"], float((out[s:s + n] - ref).abs().max()))
            result["modules"].append(name)
    return result


def main() -> int:
    spec = json.load(open(sys.argv[1]))
    standin = cpu_triton_driver()
    records = Records()
    logging.getLogger("lmdeploy").addHandler(records)  # ours propagates to LMDeploy's logger
    logging.getLogger(OUR_LOGGER).setLevel(logging.INFO)

    import torch

    agent = agent_add_adapters()
    from lmdeploy.pytorch.models import patch

    result = {
        "lmdeploy": importlib.metadata.version("lmdeploy"),
        "lmdeploy_file": sys.modules["lmdeploy"].__file__,
        "triton_standin": standin,
        "at_start": AT_START,
        "agent_module": agent.__name__,
        "signature": str(inspect.signature(inspect.unwrap(getattr(agent.add_adapters, "__wrapped__",
                                                                  agent.add_adapters)))),
        "agent_wrapped": getattr(type(agent.add_adapters), "_lmdeploy_regex_lora_wrapper", False) is True,
        "patch_wrapped": getattr(type(patch.add_adapters), "_lmdeploy_regex_lora_wrapper", False) is True,
        "disabled_env": os.environ.get("LMDEPLOY_REGEX_LORA_DISABLE"),
        "cases": {},
    }
    start = time.perf_counter()
    for arch, case in spec["cases"].items():
        entry: dict = {}
        served = build(case["base"])
        try:
            ret = agent.add_adapters(served, case["adapters"], dtype=torch.float32, device=torch.device("cpu"))
            entry["returned"] = type(ret).__name__
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        entry["lora"] = lora_digest(served)
        if spec["mode"] == "plugin" and "error" not in entry:
            from lmdeploy_regex_lora.testing.compare import compare

            base = build(case["base"])
            merged = {int(k): build(v) for k, v in case["merged"].items()}
            stats = compare(served, base, merged)
            entry["compare"] = {k: v for k, v in stats.items() if k != "per_module"}
            if spec.get("kernel_arch") == arch:
                entry["kernel"] = kernel_forward(served, {0: base, **merged})
            if spec.get("tp_arch") == arch:
                tp, rank = spec["tp"]
                with rank_context(tp, rank):
                    served_r = build(case["base"], tp)
                    agent.add_adapters(served_r, case["adapters"], dtype=torch.float32, device=torch.device("cpu"))
                    merged_r = {int(k): build(v, tp) for k, v in case["merged"].items()}
                    stats = compare(served_r, build(case["base"], tp), merged_r)
                entry["tp"] = {"tp": tp, "rank": rank, **{k: v for k, v in stats.items() if k != "per_module"}}
            entry.pop("lora")
        result["cases"][arch] = entry
    result["cli_wrapped"] = cli_wrapped()
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["our_log"] = records.lines
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
