"""Start LMDeploy's worker processes the way LMDeploy does and ask each whether the plugin is active there.

Usage: python tests/scripts/topology.py {mp_engine,mp_executor,ray} MODEL_DIR ADAPTER_DIR REPORT_DIR
(run by tests/test_topologies.py with the python of a venv where our wheel is installed; this script
never imports ``lmdeploy_regex_lora``: the ``.pth`` start-up hook alone must bring it into every process).

What is LMDeploy's and what is not:
* mp_engine: ``ZMQMPEngine._start_mp_proc`` (``serve api_server``'s engine process: ``mp.Manager``, a
  ``spawn`` context, ``Process(name='mp_engine_proc')``) runs as LMDeploy wrote it; only the process
  target ``_mp_proc`` is replaced, because the real one starts a CUDA engine.
* mp_executor: ``ExecutorProc.start`` (``MPExecutor``'s ``spawn`` workers, ``ExecutorProc-<rank>``,
  daemon) runs as LMDeploy wrote it; only ``_main_loop`` is replaced (the real one calls
  ``torch.cuda.set_device`` first).
* ray: a local Ray instance on CPU; LMDeploy's own ``init_ray_cluster`` makes its placement group of
  one ``GPU`` bundle per rank (Ray is told the machine has 2 logical GPUs, there are none) and the actors
  are created with the options of ``RayExecutor._init_workers_ray`` (``num_gpus=0.01``, the placement
  group strategy, ``_update_runtime_envs``); the actor class is ours, since LMDeploy's
  ``RayWorkerWrapper`` needs a CUDA device to build a model.
In every process the probe does what ``BaseModelAgent._build_model`` does on CPU: build the model with
LMDeploy's ``build_patched_model`` and ``load_model_weights``, then call ``add_adapters`` through the name
the agent module bound, with an ms-swift regex adapter that LMDeploy's own ``add_adapters`` cannot load.
"""

from __future__ import annotations

import sys

# Recorded before this script imports anything else; a spawn child re-runs this module as __mp_main__.
AT_START = sorted(m for m in sys.modules if m.startswith("lmdeploy_regex_lora"))

import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

from lmdeploy.pytorch.engine.executor.mp_executor import ExecutorProc  # noqa: E402
from lmdeploy.pytorch.engine.mp_engine.zmq_engine import ZMQMPEngine  # noqa: E402


def probe(where: str, model_dir: str, adapter_dir: str, at_start: list[str]) -> dict:
    """Report the hook's state in this process and load the adapter as the model agent would."""
    import multiprocessing

    import torch
    from lmdeploy.pytorch.config import ModelConfig
    from lmdeploy.pytorch.engine.model_agent import agent
    from lmdeploy.pytorch.model_inputs import BuildModelContext
    from lmdeploy.pytorch.models import patch
    from lmdeploy.pytorch.weight_loader.model_weight_loader import load_model_weights

    wrapper = agent.add_adapters
    info = {
        "where": where,
        "pid": os.getpid(),
        "process_name": multiprocessing.current_process().name,
        "executable": sys.executable,
        "at_start": at_start,
        "agent_wrapped": getattr(type(wrapper), "_lmdeploy_regex_lora_wrapper", False) is True,
        "same_as_patch": wrapper is patch.add_adapters,
        "package_file": getattr(sys.modules.get("lmdeploy_regex_lora"), "__file__", None),
    }
    cfg = ModelConfig.from_pretrained(model_dir, trust_remote_code=True, dtype="float32")
    ctx = BuildModelContext(quant_config=cfg.quant_config, fp32_lm_head=cfg.fp32_lm_head,
                            tie_word_embeddings=cfg.tie_word_embeddings)
    model = patch.build_patched_model(cfg, device=torch.device("cpu"), build_model_ctx=ctx)
    load_model_weights(model, model_dir, device=torch.device("cpu"))
    try:
        result = agent.add_adapters(model, {"swift": adapter_dir}, dtype=torch.float32, device=torch.device("cpu"))
        info["add_adapters"] = type(result).__name__
    except Exception as exc:  # what LMDeploy alone does with a regex target_modules
        info["add_adapters"] = f"{type(exc).__name__}: {exc}"
    info["lora_slots"] = sum(len(m.lora_adapters) for m in model.modules() if hasattr(m, "lora_adapters"))
    return info


def write(report: str, info: dict) -> None:
    Path(report).write_text(json.dumps(info))


class ProbeMPEngine(ZMQMPEngine):
    """LMDeploy's ZMQ engine process start; the child reports instead of starting a CUDA engine."""

    @staticmethod
    def _mp_proc(shared_dict, condition, model_path, engine_config=None, log_level="WARNING",
                 speculative_config=None, **kwargs):
        # The real target publishes its RPC port, then builds the engine. The probe reports first: once the
        # port is published the parent leaves its mp.Manager block, and on a busy machine the manager can be
        # gone before this process's release of the condition reaches it (EOFError, seen under load).
        write(kwargs["report"], probe("mp_engine", model_path, kwargs["adapter_dir"], AT_START))
        try:
            with condition:
                shared_dict["rpc_server_port"] = 0
                condition.notify()
        except (EOFError, BrokenPipeError, ConnectionError):
            pass


class ProbeExecutorProc(ExecutorProc):
    """LMDeploy's mp-executor worker start; the worker reports instead of entering its CUDA main loop."""

    def _main_loop(self, proc_id, model_path, adapter_dir, report):
        write(report, probe(f"mp_executor rank {proc_id}", model_path, adapter_dir, AT_START))


def run_ray(model_dir: str, adapter_dir: str, report_dir: Path, world_size: int = 2) -> None:
    import ray
    from lmdeploy.pytorch.engine.executor.ray_executor import _update_runtime_envs
    from lmdeploy.pytorch.ray import init_ray_cluster
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.init(num_cpus=1, num_gpus=world_size, include_dashboard=False, log_to_driver=False)
    try:
        placement_group, _ = init_ray_cluster(world_size, device_type="cuda")

        class ProbeActor:
            def probe(self, rank: int) -> dict:
                at_start = sorted(m for m in sys.modules if m.startswith("lmdeploy_regex_lora"))
                return probe(f"ray actor rank {rank}", model_dir, adapter_dir, at_start)

        actors = [
            ray.remote(num_cpus=0, num_gpus=0.01,
                       scheduling_strategy=PlacementGroupSchedulingStrategy(
                           placement_group=placement_group, placement_group_capture_child_tasks=True,
                           placement_group_bundle_index=rank),
                       runtime_env=_update_runtime_envs({}))(ProbeActor).remote()
            for rank in range(world_size)
        ]
        for rank, info in enumerate(ray.get([a.probe.remote(r) for r, a in enumerate(actors)], timeout=600)):
            write(str(report_dir / f"ray-{rank}.json"), info)
    finally:
        ray.shutdown()


def main() -> int:
    topology, model_dir, adapter_dir, report_dir = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    parent = {"pid": os.getpid(), "at_start": AT_START}
    if topology == "mp_engine":
        from lmdeploy.messages import PytorchEngineConfig

        engine = ProbeMPEngine.__new__(ProbeMPEngine)  # only its process start, not the RPC client
        engine._start_mp_proc(model_dir, PytorchEngineConfig(adapters={"swift": adapter_dir}),
                              adapter_dir=adapter_dir, report=str(report_dir / "mp_engine.json"))
        engine.proc.join(timeout=600)
        parent["exitcodes"] = [engine.proc.exitcode]
    elif topology == "mp_executor":
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")  # as MPExecutor.__init__
        procs = [ProbeExecutorProc(proc_id=rank, mp_ctx=ctx) for rank in range(2)]
        for rank, proc in enumerate(procs):
            proc.start(proc_id=rank, model_path=model_dir, adapter_dir=adapter_dir,
                       report=str(report_dir / f"mp_executor-{rank}.json"))
        for proc in procs:
            proc.join()
        parent["exitcodes"] = [proc._proc.exitcode for proc in procs]
    elif topology == "ray":
        run_ray(model_dir, adapter_dir, report_dir)
    else:
        raise SystemExit(f"unknown topology {topology!r}")
    # the parent (user code) never imported the plugin's loader: only the start-up hook and the wrapper
    parent["modules_now"] = sorted(m for m in sys.modules if m.startswith("lmdeploy_regex_lora"))
    print("PARENT " + json.dumps(parent), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
