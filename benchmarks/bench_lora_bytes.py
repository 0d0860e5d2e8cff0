"""Bytes the LoRA slots take: the plugin against ``sum over targeted modules of r * (in + out) * dtype size``
and against LMDeploy's own ``add_adapters`` for the same adapters.

Same Qwen2-0.5B-shaped float16 model as bench_load. Counted: the storage behind every slot's
``lora_A`` and ``lora_B`` (``untyped_storage().nbytes()``, so a slice of a larger buffer would show);
the per-slot bookkeeping tensors (ranks, scalings, offsets) are listed apart. Cases:

1. one adapter, r=64 on all 168 decoder linears (list config);
2. that adapter plus a second, r=16 on the same linears of layers 0-11 only (``layers_to_transform``);
3. one adapter, r=24 (not a power of two) on all decoder linears.

    python -m benchmarks.bench_lora_bytes
"""

from __future__ import annotations

import argparse
import logging

import torch

from . import common

DTYPE = torch.float16


def slot_bytes(model) -> tuple[int, int, int]:
    """(lora_A + lora_B storage bytes, bookkeeping bytes, number of slots)."""
    seen: set[int] = set()
    weights = book = 0
    slots = common.lora_modules(model)
    for _, _, lora in slots:
        for t in (lora.lora_A, lora.lora_B):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                weights += storage.nbytes()
        info = lora.adapter_info
        for name in ("ranks", "scalings", "rank_offsets"):
            t = getattr(info, name, None)
            if isinstance(t, torch.Tensor):
                book += t.numel() * t.element_size()
    return weights, book, len(slots)


def expected_bytes(specs: list[tuple[int, list[int] | None]]) -> int:
    """sum over adapters and targeted modules of r * (in + out) * dtype size."""
    shapes = common.linear_shapes()
    total = 0
    for r, layers in specs:
        for module, (fan_in, fan_out) in shapes.items():
            if layers is None or int(module.split(".")[2]) in layers:
                total += r * (fan_in + fan_out) * DTYPE.itemsize
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(common.DEFAULT_CACHE))
    args = parser.parse_args(argv)
    cache = common.pathlib.Path(args.cache)
    common.print_machine()
    base = common.make_base_model(cache)
    half = list(range(12))
    cases = {
        "r=64, all 168 linears": [(64, 128, None)],
        "r=64 all + r=16 on layers 0-11 (layers_to_transform)": [(64, 128, None), (16, 32, half)],
        "r=24, all 168 linears": [(24, 48, None)],
    }
    model = common.build_model(base)
    from lmdeploy.pytorch.models import patch

    import lmdeploy_regex_lora as plugin

    logging.getLogger("lmdeploy.regex_lora").setLevel(logging.WARNING)
    cpu = torch.device("cpu")
    rows = []
    for label, specs in cases.items():
        adapters = {f"a{i}": str(common.make_adapter(base, r=r, alpha=alpha, layers=layers, cache=cache))
                    for i, (r, alpha, layers) in enumerate(specs)}
        expected = expected_bytes([(r, layers) for r, _, layers in specs])
        measured = {}
        for name, use_plugin in (("plugin", True), ("LMDeploy", False)):
            if use_plugin:
                assert plugin.install()
            else:
                plugin.uninstall()
            patch.add_adapters(model, adapters, dtype=DTYPE, device=cpu)
            measured[name] = slot_bytes(model)
            common.clear_lora(model)
        (ours, our_book, our_slots), (theirs, _, their_slots) = measured["plugin"], measured["LMDeploy"]
        rows.append([label, common.fmt_bytes(expected), f"{common.fmt_bytes(ours)} ({ours / expected:.3f}x)",
                     f"{common.fmt_bytes(theirs)} ({theirs / expected:.3f}x)", f"{our_slots} / {their_slots}",
                     common.fmt_bytes(our_book)])
        print(f"{label}: expected {expected} B, plugin {ours} B in {our_slots} slots, "
              f"LMDeploy {theirs} B in {their_slots} slots")
    plugin.uninstall()
    print(f"\nfloat16 slots on the {common.num_params() / 1e6:.0f}M-parameter model "
          f"(its weights: {common.fmt_bytes(common.num_params() * 2)}):\n")
    print(common.table(rows, ["adapters", "sum r*(in+out)*2", "plugin", "LMDeploy", "slots plugin / LMDeploy",
                              "plugin bookkeeping"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
