"""Per-request vision/projector LoRA through LMDeploy's own image path (run by tests/test_vision.py).

Usage: TRITON_INTERPRET=1 python tests/scripts/vision.py SPEC.json

The adapters are loaded through LMDeploy's ``add_adapters`` with the plugin installed; the batch of
``lmdeploy_regex_lora.testing.vision_check.BATCHES`` (adapter a: one image of 2 units, no adapter: two
images, adapter b: one image) runs through the model's ``build_context``, ``prepare_inputs_for_generation``
and ``forward`` (tower + projector, LMDeploy's Triton LoRA kernel interpreted on CPU); each request's image
embeddings must equal its merged (or the base) model's run alone, "no adapter" rows bit-identical.

Then deliberately wrong row maps (``steps.image_row_runs`` replaced) must make that comparison fail: rows
split by sequence instead of by image, one share per image ignoring its tiles/patches, images in reverse
order. For Qwen2.5-VL the batch's window reordering must be real (not the identity) and stay inside each
image. For Qwen3-VL and Qwen3.5 a second batch mixes videos (items of the same 'mm_data' list) with images.
Qwen and GLM towers get tests/support/cpu_standins.py (TEST-ONLY: their attention has no CPU path), and
every model the zeroing of biases LMDeploy builds but never loads (GLM-4.1V's vision attention proj), the same
on every side of each comparison.
Prints one JSON line; exits 1 when anything fails.
"""

from __future__ import annotations

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before Triton is imported"

import torch  # noqa: E402

# Run as a file: put the repository root (two folders up) first, for the package and ``tests.support``.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import lmdeploy_regex_lora  # noqa: E402
from lmdeploy_regex_lora.serve import steps  # noqa: E402
from lmdeploy_regex_lora.testing import vision_check as vc  # noqa: E402
from tests.support import cpu_standins  # noqa: E402


def _floor_runs(groups, adapter_ids, num_rows):
    """Rows split over ``groups`` [(sequence, share)] in order, rounded down: a wrong map that never raises."""
    total, before, runs = sum(u for _, u in groups), 0, []
    for seq, units in groups:
        lo, hi = before * num_rows // total, (before + units) * num_rows // total
        before += units
        runs.append((lo, hi - lo, int(adapter_ids[seq])))
    return runs


#: adapter b: a video of 2 frames (2 x 4 x 4 patches); no adapter: an image; adapter a: an image, then a video
VIDEO_BATCH = [(2, [(2, 4, 4)]), (0, [(1, 2, 2)]), (1, [(1, 4, 2), (2, 2, 4)])]

MUTATIONS = {
    "rows by sequence, not by image": lambda images: [(s, 1) for s in dict.fromkeys(s for s, _ in images)],
    "one share per image, ignoring its tiles/patches": lambda images: [(s, 1) for s, _ in images],
    "images in reverse order": lambda images: list(reversed(images)),
}


def mutation_results(served, refs, requests) -> dict:
    out = {}
    correct = steps.image_row_runs
    for label, mutate in MUTATIONS.items():
        images = steps.image_units(vc.model_inputs(requests).vision_inputs.input_multimodals, requests[0].key)
        if mutate(images) == images or (label.startswith("one share") and all(u == 1 for _, u in images)):
            out[label] = "the same map as the right one for this model (one unit per image)"
            continue
        steps.image_row_runs = lambda imgs, ids, n, mutate=mutate: _floor_runs(mutate(imgs), ids, n)
        try:
            result = vc.check_requests(served, refs, requests)
        finally:
            steps.image_row_runs = correct
        out[label] = {"max_err_per_request": result["max_err_per_request"], "caught": not result["ok"]}
    return out


def window_reordering(model, requests) -> dict:
    """Qwen2.5-VL: the tower's window_index over this batch permutes rows, each image's only among its own."""
    grids = torch.cat([m.meta["grid_thw"] for r in requests for m in r.images])
    window_index, _ = model.visual.get_window_index(grids)
    unit = model.visual.spatial_merge_unit
    within, identity, start = [], True, 0
    for t, h, w in grids.tolist():
        n = t * h * w // unit
        part = window_index[start:start + n]
        within.append(bool(torch.equal(part.sort().values, torch.arange(start, start + n))))
        identity = identity and bool(torch.equal(part, torch.arange(start, start + n)))
        start += n
    return {"each_image_keeps_its_rows": within, "is_identity": identity}


def main() -> int:
    spec = json.load(open(sys.argv[1]))
    assert lmdeploy_regex_lora.install()
    vc.use_interpreted_kernel()
    served, models = vc.served_and_references(spec["base"], spec["adapters"], spec["merged"])
    standins = [cpu_standins.apply(m) for m in (served, *(m for m, _ in models.values()))]
    zeroed = [cpu_standins.zero_unloaded_biases(m, d) for m, d in ((served, spec["base"]), *models.values())]
    runner = vc.VisionRunner(served, spec["base"])
    refs = {aid: vc.VisionRunner(m, d) for aid, (m, d) in models.items()}
    requests = vc.make_requests(served)
    result = vc.check_requests(runner, refs, requests)
    result["cpu_attention_standins"] = standins[0]
    result["unloaded_biases_zeroed"] = zeroed[0]
    ok_zeroed = all(z == zeroed[0] for z in zeroed)
    result["units_per_image"] = [[steps.image_units([{"image": [m]}])[0][1] for m in r.images] for r in requests]
    result["mutations"] = mutation_results(runner, refs, requests)
    ok = result["ok"] and ok_zeroed and all(m["caught"] for m in result["mutations"].values() if isinstance(m, dict))
    if requests[0].key == "mm_data":  # Qwen3-VL / Qwen3.5: videos are items of the same list, through the tower
        mixed = vc.make_requests(served, VIDEO_BATCH, seed=1)
        result["with_videos"] = vc.check_requests(runner, refs, mixed)
        ok = ok and result["with_videos"]["ok"]
    if vc.family(served) == "qwen2_5_vl":
        result["window_index"] = window_reordering(served, requests)
        ok = ok and all(result["window_index"]["each_image_keeps_its_rows"]) and not result["window_index"][
            "is_identity"]
    result["ok"] = ok
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
