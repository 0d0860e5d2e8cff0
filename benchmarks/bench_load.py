"""Adapter load time: the plugin's loader against LMDeploy's own ``add_adapters`` on the same adapter.

LMDeploy's loader only handles list ``target_modules`` of one rank, so the adapter is the list form:
rank 64 on all seven linears of every decoder layer of a Qwen2-0.5B-shaped model built by LMDeploy on
CPU (float16). The plugin also loads the same tensors under the ms-swift regex config. Only the
``add_adapters`` call is timed (wall and process CPU time); the model is built once and its LoRA slots
removed after each load. LMDeploy's function is reached by ``uninstall()`` and the plugin's by
``install()``, both outside the timed part. Before timing, the slots each loader makes are checked to
hold the same tensors.

    python -m benchmarks.bench_load [--reps 7]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from . import common


def snapshot(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {f"{n}[{k}]": (lora.lora_A.detach().clone(), lora.lora_B.detach().clone())
            for n, k, lora in common.lora_modules(model)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--cache", default=str(common.DEFAULT_CACHE))
    args = parser.parse_args(argv)
    cache = common.pathlib.Path(args.cache)
    logging.getLogger("lmdeploy.regex_lora").setLevel(logging.WARNING)  # the plan text is still built

    common.print_machine()
    base = common.make_base_model(cache)
    list_adapter = common.make_adapter(base, targets="list", cache=cache)
    regex_adapter = common.make_adapter(base, targets="regex", cache=cache)
    model = common.build_model(base)
    print(f"model: {common.num_params() / 1e6:.0f}M parameters (Qwen2-0.5B shape), float16, "
          f"adapter: r=64 on {len(common.linear_shapes())} linears, "
          f"{common.folder_bytes(list_adapter) / 2**20:.0f} MiB float32 safetensors")

    from lmdeploy.pytorch.models import patch

    import lmdeploy_regex_lora as plugin

    cpu_device = torch.device("cpu")

    def load(use_plugin: bool, adapter) -> float:
        if use_plugin:
            assert plugin.install()
        else:
            plugin.uninstall()
        fn = patch.add_adapters
        assert getattr(type(fn), "_lmdeploy_regex_lora_wrapper", False) is use_plugin
        wall, cpu_start = time.perf_counter(), time.process_time()
        fn(model, {"a": str(adapter)}, dtype=torch.float16, device=cpu_device)
        result = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu_start}
        common.clear_lora(model)
        return result

    # Same work: both loaders must leave identical slots.
    plugin.uninstall()
    patch.add_adapters(model, {"a": str(list_adapter)}, dtype=torch.float16, device=cpu_device)
    theirs = snapshot(model)
    common.clear_lora(model)
    assert plugin.install()
    patch.add_adapters(model, {"a": str(regex_adapter)}, dtype=torch.float16, device=cpu_device)
    ours = snapshot(model)
    common.clear_lora(model)
    assert theirs.keys() == ours.keys(), (sorted(theirs.keys() ^ ours.keys())[:5])
    for key in theirs:
        assert all(torch.equal(x, y) for x, y in zip(theirs[key], ours[key], strict=True)), key
    print(f"check: both loaders fill the same {len(ours)} slots with identical tensors")

    results = common.interleave({
        "LMDeploy add_adapters (list config)": lambda: load(False, list_adapter),
        "plugin (list config)": lambda: load(True, list_adapter),
        "plugin (ms-swift regex config)": lambda: load(True, regex_adapter),
    }, reps=args.reps)
    plugin.uninstall()

    rows = []
    for metric in ("wall", "cpu"):
        ref = common.median(r[metric] for r in results["LMDeploy add_adapters (list config)"])
        for name, runs in results.items():
            values = [r[metric] for r in runs]
            q1, q3 = common.quartiles(values)
            med = common.median(values)
            rows.append([name, metric, common.fmt_seconds(med),
                         f"{common.fmt_seconds(q1)} - {common.fmt_seconds(q3)}", f"{med / ref:.2f}x"])
    for name, runs in results.items():  # every run, in order: shows a noisy phase hitting all contenders
        print(f"{name}: cpu " + " ".join(f"{r['cpu'] * 1000:.0f}" for r in runs) + " ms")
    print(f"\n{args.reps} interleaved runs each (after one warm-up), add_adapters only; cpu = process CPU time "
          "(all threads), less sensitive to other work on the machine than wall time:\n")
    print(common.table(rows, ["loader", "time", "median", "IQR", "vs LMDeploy"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
