"""``lmdeploy-regex-lora demo``: a tiny InternVL2-shaped model, ms-swift-style regex adapters, LMDeploy's
real build path with and without the plugin, and a check against the merged weights.

Everything is generated in a temporary folder; nothing is downloaded. Exit status 0 means every
LoRA-carrying linear of LMDeploy's model equals the merged checkpoint for every adapter.
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

# Two adapters an InternVL2-8B user gets from ms-swift's defaults (swift-adapters.md §1). The first is
# v3.0.3-v3.2.x's (prefix + negative look-ahead, which also matches norms and the embedding: only linear
# layers count). The second is v3.4.1+'s, which also matches InternLM2's LM head `language_model.output`
# (served per request: each logits row uses its own sequence's adapter).
ADAPTERS = {
    "swift-v3.0-default": dict(
        target_modules=r"(?!^(mlp1))^(language_model)(?!.*(lora_A|lora_B|base_layer|emb|wte|shared|lm_head|output"
                       r"|score|v_head|classifier)).*",
        r=8, lora_alpha=32, use_rslora=False, seed=1),
    "swift-v3.4-default": dict(
        target_modules=r"^(language_model.*\.(output|w2|w3|w1|wo|wqkv))$", r=24, lora_alpha=48, use_rslora=True,
        seed=2),
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


def run(workdir: Path) -> int:
    import torch

    import lmdeploy_regex_lora

    from ..merge.writer import merge_checkpoint
    from ..serve import hook
    from ..testing.build import build_lmdeploy_model
    from ..testing.compare import Mismatch, compare
    from ..testing.tiny_models import make_tiny_model

    cpu = torch.device("cpu")
    _say(f"work folder: {workdir}")
    model_dir = make_tiny_model("internvl2_internlm2", workdir / "InternVL2-tiny", num_layers=2)
    _say(f"1. tiny InternVL2-8B-shaped model (vision_model, mlp1, language_model=InternLM2): {model_dir}")
    adapters, deltas = {}, {}
    # LMDeploy numbers adapters by sorted name; id 0 is "no adapter".
    for i, name in enumerate(sorted(ADAPTERS), start=1):
        spec = ADAPTERS[name]
        folder = workdir / f"checkpoint-{name}"
        deltas[i] = write_swift_adapter(model_dir, folder, spec)
        adapters[name] = str(folder)
        _say(f"2. adapter {name!r}: target_modules={spec['target_modules']!r} r={spec['r']} "
             f"alpha={spec['lora_alpha']} rslora={spec['use_rslora']} ({len(deltas[i])} linear layers)")

    from lmdeploy.pytorch.models import patch

    _say("3. LMDeploy alone (plugin uninstalled) on the same adapters:")
    lmdeploy_regex_lora.uninstall()
    native = build_lmdeploy_model(model_dir)
    try:
        patch.add_adapters(native, adapters, dtype=torch.float32, device=cpu)
        _say("   loaded (unexpected for a regex target_modules)")
    except Exception as exc:  # LMDeploy's own failure is what we show
        import traceback

        last = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{last.filename.split('site-packages/')[-1]}:{last.lineno}"
        _say(f"   fails: {type(exc).__name__}: {str(exc)[:160]} (at {where}: {last.line})")
    del native

    if not lmdeploy_regex_lora.install():
        _say("   the plugin stands aside here (see the log line above); cannot continue")
        return 2
    origin = "the installed .pth hook" if _PTH_ACTIVE else "lmdeploy_regex_lora.install()"
    _say(f"4. with the plugin (activated by {origin}), through LMDeploy's build_patched_model -> "
         "load_model_weights -> add_adapters:")
    served = build_lmdeploy_model(model_dir)
    start = time.perf_counter()
    import logging

    plugin_log = logging.getLogger("lmdeploy.regex_lora")
    level = plugin_log.level
    plugin_log.setLevel(logging.WARNING)  # the plan is printed below; LMDeploy's log would show it twice
    try:
        plan = patch.add_adapters(served, adapters, dtype=torch.float32, device=cpu)
    finally:
        plugin_log.setLevel(level)
    _say(f"   loaded in {time.perf_counter() - start:.2f} s")
    if plan is None:  # the hook returns LMDeploy's value; read the plan again for printing
        from ..serve.loader import resolve

        plan = resolve(served, adapters).plan
    _say("\n" + plan.render() + "\n")
    assert hook.is_installed()

    _say("5. check against the merged checkpoints (`lmdeploy-regex-lora merge`), loaded by LMDeploy natively:")
    base = build_lmdeploy_model(model_dir)
    merged = {}
    for i, name in enumerate(sorted(adapters), start=1):
        out = merge_checkpoint(model_dir, adapters[name], workdir / f"merged-{i}", name=name, progress=False)["out"]
        merged[i] = build_lmdeploy_model(out)
    try:
        stats = compare(served, base, merged)
    except Mismatch as exc:
        _say(f"   MISMATCH: {exc}")
        return 1
    _say(f"   {stats['targeted']} (module, adapter) pairs equal within float32 rounding "
         f"(largest error {stats['max_err']:.2e}); {stats['untargeted']} untargeted pairs exactly zero; "
         f"{stats['slots']} slots give 'no adapter' exactly zero.")
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
