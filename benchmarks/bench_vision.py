"""Vision forward of a batch of images: per-request vision/projector LoRA against the folded form, on CPU.

An InternVL chat model with a mid-size vision tower (InternViT hidden 256, 4 heads, MLP 1024, 4 layers,
224x224 tiles = 257 tokens; ``mlp1`` 1024 -> 256), written by the package's tiny-model generator with its
vision sizes raised. Two ms-swift-style adapters: a (r=8) on every InternViT linear and ``mlp1``, b (r=24)
on ``mlp1`` only: 18 image-row slots. One batch, requests (adapter, tiles) (a,2) (none,1) (b,3) (a,2)
(none,1) (b,3) = 12 tiles, goes through ``build_context``, ``prepare_inputs_for_generation`` and the
model's forward up to the text decoder (testing/vision_check.py) of:

* ``base``: the base model, no LoRA;
* ``folded``: adapter a's merge as the model (what ``LMDEPLOY_REGEX_LORA_FOLD_VISION=1`` serves, to every
  request: the same cost as the base by construction, measured anyway);
* ``per-request``: the base model with both adapters loaded by the plugin, the batch mixed as above; then
  every request on adapter a (the most LoRA work), then no request on an adapter (every run skipped).

LMDeploy's LoRA kernel is Triton, which on a CPU only runs interpreted (seconds per call: that measures the
interpreter). So the image-row slots here run a torch implementation of exactly the kernel's work per run,
``out[s:s+n] += scaling * (x[s:s+n] @ A^T) @ B`` over the runs the slot hands the kernel; everything else
(the run map, the slot's skipping, the base layers) is the plugin's and LMDeploy's code. Interleaved
repetitions, medians and ratios to ``folded`` are printed; nothing is asserted.

    python -m benchmarks.bench_vision [--reps 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
from pathlib import Path

import torch

from . import common

# Vision sizes of the benchmark model (the tiny generator's constants, raised while it writes the folder).
MID_SIZE = dict(VIT_HIDDEN=256, VIT_HEADS=4, VIT_INTERMEDIATE=1024, IMAGE_SIZE=224, PATCH_SIZE=14,
                NUM_POSITIONS=(224 // 14) ** 2 + 1, PROJ_IN=256 * 4, HIDDEN=256, HEAD_DIM=256 // 4)
REQUESTS = [(1, [2]), (0, [1]), (2, [3]), (1, [2]), (0, [1]), (2, [3])]
ADAPTERS = {
    "a": dict(target_modules=r"^(vision_model.*\.(fc1|fc2|proj|qkv)|mlp1.*\.(1|3))$", r=8, lora_alpha=32,
              use_rslora=False, seed=300),
    "b": dict(target_modules=r".*mlp1\.(1|3)$", r=24, lora_alpha=48, use_rslora=False, seed=301),
}


class TorchRunsImpl:
    """The LoRA kernel's computation in torch, run by run (the CPU stand-in for timing; see the module doc)."""

    def __init__(self, lora) -> None:
        info = lora.adapter_info
        self.ranks, self.offsets = info.ranks.tolist(), info.rank_offsets.tolist()
        self.scalings = info.scalings.tolist()

    def forward(self, x, lora_A, lora_B, base_output, adapter_info, ctx_mgr, colwise, is_tp=True):
        ctx = ctx_mgr.current_context()
        rows = x.reshape(-1, x.size(-1))
        out = base_output.view(-1, base_output.size(-1))[:, adapter_info.base_slice]
        for s, n, a in zip(ctx.q_start_loc.tolist(), ctx.q_seqlens.tolist(), ctx.local_adapter_ids.tolist(),
                           strict=True):
            r, off = self.ranks[a], self.offsets[a]
            out[s:s + n] += ((rows[s:s + n] @ lora_A[off:off + r].t()) * self.scalings[a]) @ lora_B[off:off + r]
        return base_output


@contextlib.contextmanager
def mid_size():
    """The tiny-model generator's vision constants raised to :data:`MID_SIZE` while it writes a folder."""
    from lmdeploy_regex_lora.testing import tiny_configs, tiny_models

    saved = [(mod, key, getattr(mod, key)) for mod in (tiny_configs, tiny_models) for key in MID_SIZE
             if hasattr(mod, key)]
    for mod, key, _ in saved:
        setattr(mod, key, MID_SIZE[key])
    try:
        yield
    finally:
        for mod, key, value in saved:
            setattr(mod, key, value)


def make_models(work: Path):
    """(base, folded, served) LMDeploy models and the base folder; the served one's image-row slots on torch."""
    import lmdeploy_regex_lora
    from lmdeploy_regex_lora.cli.demo import write_swift_adapter
    from lmdeploy_regex_lora.merge.writer import merge_checkpoint
    from lmdeploy_regex_lora.serve.vision import ImageRowLoRA
    from lmdeploy_regex_lora.testing.build import build_lmdeploy_model
    from lmdeploy_regex_lora.testing.tiny_models import make_tiny_model

    with mid_size():
        base_dir = make_tiny_model("internvl2_internlm2", work / "base", num_layers=4)
    adapters = {}
    for name, spec in ADAPTERS.items():
        write_swift_adapter(base_dir, work / name, spec)
        adapters[name] = str(work / name)
    merged = merge_checkpoint(base_dir, adapters["a"], work / "a-merged", name="a", progress=False)["out"]
    assert lmdeploy_regex_lora.install()
    from lmdeploy.pytorch.models import patch

    served = build_lmdeploy_model(base_dir)
    logging.getLogger("lmdeploy.regex_lora").setLevel(logging.WARNING)
    patch.add_adapters(served, adapters, dtype=torch.float32, device=torch.device("cpu"))
    slots = [m for m in served.modules() if isinstance(m, ImageRowLoRA)]
    for lora in slots:
        lora.impl = TorchRunsImpl(lora)
    return build_lmdeploy_model(base_dir), (build_lmdeploy_model(merged), merged), served, base_dir, len(slots)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lmdeploy_regex_lora.testing import vision_check as vc

    common.print_machine()
    with tempfile.TemporaryDirectory(prefix="bench-vision-") as tmp:
        base, (folded, merged_dir), served, base_dir, num_slots = make_models(Path(tmp))
        runners = {"base": vc.VisionRunner(base, base_dir), "folded": vc.VisionRunner(folded, merged_dir),
                   "served": vc.VisionRunner(served, base_dir)}
        mixed = vc.make_requests(served, REQUESTS)
        every_a = vc.make_requests(served, [(1, tiles) for _, tiles in REQUESTS])
        none = vc.make_requests(served, [(0, tiles) for _, tiles in REQUESTS])
        variants = {"base (no LoRA)": ("base", mixed), "folded (adapter a merged)": ("folded", mixed),
                    "per-request, a / none / b mixed": ("served", mixed),
                    "per-request, every request on a": ("served", every_a),
                    "per-request, no request on an adapter": ("served", none)}
        times = common.interleave({label: common.timed(lambda r=r, q=q: runners[r].embeddings(q))
                                   for label, (r, q) in variants.items()}, args.reps)
        got = runners["served"].embeddings(mixed)
        want = {0: runners["base"].embeddings(mixed), 1: runners["folded"].embeddings(mixed)}
    sanity = {f"adapter {aid} rows vs {'base' if aid == 0 else 'folded'}, max error":
              max(float((g - want[aid][i]).abs().max()) for i, g in enumerate(got) if mixed[i].adapter_id == aid)
              for aid in (0, 1)}
    sanity["largest value in those rows"] = max(float(g.abs().max()) for g in got)
    folded_median = common.median(times["folded (adapter a merged)"])
    rows = [[label, common.fmt_seconds(common.median(t)), f"{common.median(t) / folded_median:.3f}"]
            for label, t in times.items()]
    tiles = sum(int(m.data.shape[0]) for r in mixed for m in r.images)
    print(f"{tiles} tiles of 224x224 ({tiles * MID_SIZE['NUM_POSITIONS']} InternViT rows per layer), "
          f"{num_slots} image-row slots, {args.reps} interleaved repetitions, {args.threads} thread(s)")
    print(common.table(rows, ["variant", "median", "ratio to folded"]))
    print(json.dumps({"sanity": sanity, "median_s": {k: common.median(t) for k, t in times.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
