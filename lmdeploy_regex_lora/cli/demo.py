"""``lmdeploy-regex-lora demo``: the case this project started from, on a tiny InternVL2-8B-shaped model.

Two task adapters in ms-swift 2.2.5's default form for InternVL2 (LLM and projector), LMDeploy failing on
them alone, then both served side by side through LMDeploy's real build path with the plugin: each request's
image embeddings (vision tower + projector, LoRA through LMDeploy's own Triton kernel, interpreted on CPU)
equal its own adapter's merged model, and every LoRA-carrying linear equals the merged checkpoints.

Everything is generated in a temporary folder; nothing is downloaded. Exit status 0 means both checks passed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

# Set before this module imports the plugin's hook: True only when the installed .pth activated it.
_PTH_ACTIVE = "lmdeploy_regex_lora_boot" in sys.modules

# ms-swift 2.2.4 - 2.2.5's default target_modules for InternVL2 (swift-adapters.md §1): every LLM linear and
# the projector mlp1.1 / mlp1.3. Two task adapters trained that way (swift 2.x: r=8, alpha=32; the second one
# with another rank) change the same projector layers differently: folding could serve only one of them.
SWIFT_225_DEFAULT = r".*(wqkv|wo|w[123]|mlp1\.(1|3))$"
ADAPTERS = {
    "task-a": dict(target_modules=SWIFT_225_DEFAULT, r=8, lora_alpha=32, use_rslora=False, seed=1),
    "task-b": dict(target_modules=SWIFT_225_DEFAULT, r=16, lora_alpha=32, use_rslora=False, seed=2),
}


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def write_swift_adapter(model_dir: Path, out: Path, spec: dict) -> dict[str, tuple]:
    """Write an adapter folder as ms-swift saves it (PEFT layout); return {module: (A, B, scaling)}."""
    import torch
    from safetensors.torch import save_file

    from ..testing.tiny_models import checkpoint_linear_names

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(spec["seed"])
    r, alpha = spec["r"], spec["lora_alpha"]
    scaling = alpha / math.sqrt(r) if spec["use_rslora"] else alpha / r
    tensors, deltas = {}, {}
    for name, (out_f, in_f) in checkpoint_linear_names(model_dir).items():
        if re.fullmatch(spec["target_modules"], name) is None:
            continue
        a = torch.randn(r, in_f, generator=gen) * 0.1
        b = torch.randn(out_f, r, generator=gen) * 0.1
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
        deltas[name] = (a, b, scaling)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir),
        "r": r, "lora_alpha": alpha, "lora_dropout": 0.05, "target_modules": spec["target_modules"],
        "use_rslora": spec["use_rslora"], "use_dora": False, "bias": "none", "modules_to_save": None,
        "init_lora_weights": True, "fan_in_fan_out": False, "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (out / "additional_config.json").write_text(json.dumps({"lora_dtype": None, "lorap_lr_ratio": None}))
    return deltas


def _make_inputs(workdir: Path) -> tuple[Path, dict[str, str]]:
    from ..testing.tiny_models import make_tiny_model

    _say(f"work folder: {workdir}")
    model_dir = make_tiny_model("internvl2_internlm2", workdir / "InternVL2-tiny", num_layers=2)
    _say(f"1. tiny InternVL2-8B-shaped model (vision_model, mlp1, language_model=InternLM2): {model_dir}")
    adapters = {}
    for name in sorted(ADAPTERS):  # LMDeploy numbers adapters by sorted name; id 0 is "no adapter"
        spec = ADAPTERS[name]
        folder = workdir / f"checkpoint-{name}"
        deltas = write_swift_adapter(model_dir, folder, spec)
        adapters[name] = str(folder)
        projector = sorted(m for m in deltas if m.startswith("mlp1."))
        _say(f"2. adapter {name!r} in ms-swift 2.2.5's default form: target_modules={spec['target_modules']!r} "
             f"r={spec['r']} alpha={spec['lora_alpha']} ({len(deltas)} linear layers, projector {projector})")
    return model_dir, adapters


def _show_native_failure(model_dir: Path, adapters: dict[str, str]) -> None:
    import traceback

    import torch

    import lmdeploy_regex_lora

    from ..testing.build import build_lmdeploy_model

    _say("3. LMDeploy alone (plugin uninstalled) on the same adapters:")
    lmdeploy_regex_lora.uninstall()
    from lmdeploy.pytorch.models import patch

    native = build_lmdeploy_model(model_dir)
    try:
        patch.add_adapters(native, adapters, dtype=torch.float32, device=torch.device("cpu"))
        _say("   loaded (unexpected for a regex target_modules)")
    except Exception as exc:  # LMDeploy's own failure is what we show
        last = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{last.filename.split('site-packages/')[-1]}:{last.lineno}"
        _say(f"   fails: {type(exc).__name__}: {str(exc)[:160]} (at {where}: {last.line})")


def _serve(model_dir: Path, adapters: dict[str, str]):
    """The model with both adapters loaded through LMDeploy's add_adapters and the plugin; None if it stands aside."""
    import logging

    import torch

    import lmdeploy_regex_lora

    from ..serve import hook
    from ..testing.build import build_lmdeploy_model

    if not lmdeploy_regex_lora.install():
        _say("   the plugin stands aside here (see the log line above); cannot continue")
        return None
    from lmdeploy.pytorch.models import patch

    origin = "the installed .pth hook" if _PTH_ACTIVE else "lmdeploy_regex_lora.install()"
    _say(f"4. with the plugin (activated by {origin}), both adapters side by side, through LMDeploy's "
         "build_patched_model -> load_model_weights -> add_adapters:")
    served = build_lmdeploy_model(model_dir)
    start = time.perf_counter()
    plugin_log = logging.getLogger("lmdeploy.regex_lora")
    level = plugin_log.level
    plugin_log.setLevel(logging.WARNING)  # the plan is printed below; LMDeploy's log would show it twice
    try:
        plan = patch.add_adapters(served, adapters, dtype=torch.float32, device=torch.device("cpu"))
    finally:
        plugin_log.setLevel(level)
    _say(f"   loaded in {time.perf_counter() - start:.2f} s")
    if plan is None:  # the hook returns LMDeploy's value; read the plan again for printing
        from ..serve.loader import resolve

        plan = resolve(served, adapters).plan
    _say("\n" + plan.render())
    _say("   (folded into the base weights, LMDEPLOY_REGEX_LORA_FOLD_VISION=1, this pair is refused: the projector "
         "is one weight that every request shares)\n")
    assert hook.is_installed()
    return served


def _check_images(served, model_dir: Path, merged_dirs: dict[int, str]) -> bool:
    """Step 5: each request's image embeddings against its own adapter's merged model (or the base)."""
    from ..testing import vision_check as vc
    from ..testing.build import build_lmdeploy_model

    names = {0: "no adapter", **{i: repr(n) for i, n in enumerate(sorted(ADAPTERS), start=1)}}
    _say("5. one batch of three requests through LMDeploy's image path (build_context, "
         "prepare_inputs_for_generation, InternViT + mlp1; LoRA by LMDeploy's Triton kernel, interpreted on CPU), "
         "each against its own merged model run alone:")
    refs = {0: vc.VisionRunner(build_lmdeploy_model(model_dir), model_dir)}
    refs.update({i: vc.VisionRunner(build_lmdeploy_model(d), d) for i, d in merged_dirs.items()})
    requests = vc.make_requests(served)
    result = vc.check_requests(vc.VisionRunner(served, model_dir), refs, requests)
    for i, req in enumerate(requests):
        tiles = " + ".join(str(int(m.data.shape[0])) for m in req.images)
        effect = (f"its adapter changes them by up to {result['lora_effect_per_request'][i]:.3g}" if req.adapter_id
                  else "bit-identical to the base model on the same batch" if result["no_adapter_bit_identical"]
                  else "NOT bit-identical to the base model on the same batch")
        own = "its merged" if req.adapter_id else "the base"
        _say(f"   request {i + 1}: {names[req.adapter_id]}, {len(req.images)} image(s) of {tiles} tile(s): image "
             f"embeddings within {result['max_err_per_request'][i]:.2e} of {own} model's, run alone; {effect}")
    if not result["ok"]:
        _say(f"   MISMATCH: {result}")
    return result["ok"]


def _check_weights(served, model_dir: Path, merged_dirs: dict[int, str]) -> bool:
    from ..testing.compare import Mismatch, compare, load_models

    _say("6. every LoRA-carrying linear against the merged checkpoints, loaded by LMDeploy natively:")
    base, merged = load_models(model_dir, merged_dirs)
    try:
        stats = compare(served, base, merged)
    except Mismatch as exc:
        _say(f"   MISMATCH: {exc}")
        return False
    _say(f"   {stats['targeted']} (module, adapter) pairs equal within float32 rounding "
         f"(largest error {stats['max_err']:.2e}), the projector's image-row slots included; "
         f"{stats['untargeted']} untargeted pairs exactly zero; {stats['slots']} slots give 'no adapter' exactly zero.")
    return True


def run(workdir: Path) -> int:
    from ..testing.vision_check import use_interpreted_kernel

    use_interpreted_kernel()  # before Triton is first imported: step 5 runs LMDeploy's kernel on CPU tensors
    from ..merge.writer import merge_checkpoint

    model_dir, adapters = _make_inputs(workdir)
    _show_native_failure(model_dir, adapters)
    served = _serve(model_dir, adapters)
    if served is None:
        return 2
    merged_dirs = {i: merge_checkpoint(model_dir, adapters[name], workdir / f"merged-{name}", name=name,
                                       progress=False)["out"] for i, name in enumerate(sorted(adapters), start=1)}
    _say(f"   merged checkpoints (`lmdeploy-regex-lora merge`): {', '.join(map(str, merged_dirs.values()))}")
    if not (_check_images(served, model_dir, merged_dirs) and _check_weights(served, model_dir, merged_dirs)):
        return 1
    _say("demo passed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmdeploy-regex-lora demo", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="write into this folder and keep it")
    args = parser.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        return run(args.keep)
    with tempfile.TemporaryDirectory(prefix="lmdeploy-regex-lora-demo-") as tmp:
        return run(Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
