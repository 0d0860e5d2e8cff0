"""The files the run serves: tiny random base models, swift-style regex adapters and their merged checkpoints.

Two architectures (``ARCHS``: Qwen2- and InternLM2-shaped LLMs at ``Dims``), two adapters each (``ADAPTERS``),
and each adapter merged into its base as ``W + scaling * B @ A`` in float64 (``write_merged``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import shutil
from collections.abc import Sequence
from typing import Any

from .tokenizer import SPECIAL_TOKENS, write_tokenizer

ARCHS: tuple[str, ...] = ("qwen2", "internlm2")


@dataclasses.dataclass(frozen=True)
class Dims:
    """Model sizes (GQA: 4 query heads share 2 key/value heads; head_dim = hidden / heads)."""

    vocab: int = 512
    hidden: int = 256
    intermediate: int = 512
    heads: int = 4
    kv_heads: int = 2
    layers: int = 4

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """One swift-style regex adapter: ``target_modules`` is a regex string, as ms-swift >= 3.4.1 writes it."""

    name: str
    regex: str
    r: int
    alpha: int
    seed: int
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


#: Two adapters per model: different targets and ranks; one of rank 24 (not a power of two), one on the LM head.
ADAPTERS: dict[str, tuple[AdapterSpec, AdapterSpec]] = {
    "qwen2": (
        AdapterSpec("attn-r24", r"^(model.*\.(q_proj|k_proj|v_proj|o_proj))$", r=24, alpha=48, seed=101),
        AdapterSpec("mlp-head-r8", r"^(model.*\.(gate_proj|up_proj|down_proj)|lm_head)$", r=8, alpha=16, seed=102,
                    use_rslora=True),
    ),
    "internlm2": (
        AdapterSpec("attn-r24", r"^(model.*\.(wqkv|wo))$", r=24, alpha=48, seed=201),
        AdapterSpec("mlp-head-r8", r"^(model.*\.(w1|w2|w3)|output)$", r=8, alpha=16, seed=202, use_rslora=True),
    ),
}
LM_HEAD = {"qwen2": "lm_head", "internlm2": "output"}


@dataclasses.dataclass(frozen=True)
class ModelSet:
    """The folders written for one architecture."""

    arch: str
    base: pathlib.Path
    adapters: dict[str, pathlib.Path]  # adapter name -> adapter folder
    merged: dict[str, pathlib.Path]  # adapter name -> merged model folder
    targets: dict[str, list[str]]  # adapter name -> HF module names it trains

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "base": str(self.base), "adapters": {k: str(v) for k, v in self.adapters.items()},
                "merged": {k: str(v) for k, v in self.merged.items()}, "targets": self.targets}


# Random values come from the package's tiny-model generator (``lmdeploy_regex_lora.testing.tiny_models``): the same
# per-(seed, name) seeds (``tensor_seed``) and, for the base weights, the same tensors (``random_tensor``: norms
# ~1, biases std 0.02, the token embedding's padding row zero). Only the scale of the matrices is this run's own.

#: The std ``tiny_models.random_tensor`` draws matrices with; ``_base_tensor`` rescales from it (a test pins the
#: stds of the written weights, so a change there cannot go unnoticed).
TINY_STD = 0.02


def _randn(shape: tuple[int, ...], seed: int, name: str, std: float):
    """Normal values of std ``std`` that depend on (seed, name) only, seeded as the package's tiny models are."""
    import torch

    from lmdeploy_regex_lora.testing.tiny_models import tensor_seed

    gen = torch.Generator().manual_seed(tensor_seed(seed, name))
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


def checkpoint_shape(arch: str, key: str, d: Dims) -> tuple[int, ...]:
    """Shape of checkpoint tensor ``key`` of a Qwen2 / InternLM2 causal LM of sizes ``d``."""
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    leaf, kind = key.rsplit(".", 2)[-2:]
    if kind == "bias":
        return ({"q_proj": q, "k_proj": kv, "v_proj": kv}[leaf],)
    table: dict[str, tuple[int, ...]] = {
        # qwen2
        "embed_tokens": (d.vocab, d.hidden), "q_proj": (q, d.hidden), "k_proj": (kv, d.hidden),
        "v_proj": (kv, d.hidden), "o_proj": (d.hidden, q), "gate_proj": (d.intermediate, d.hidden),
        "up_proj": (d.intermediate, d.hidden), "down_proj": (d.hidden, d.intermediate), "lm_head": (d.vocab, d.hidden),
        # internlm2
        "tok_embeddings": (d.vocab, d.hidden), "wqkv": (q + 2 * kv, d.hidden), "wo": (d.hidden, q),
        "w1": (d.intermediate, d.hidden), "w3": (d.intermediate, d.hidden), "w2": (d.hidden, d.intermediate),
        "output": (d.vocab, d.hidden),
    }
    if leaf in table:
        return table[leaf]
    if "norm" in leaf:
        return (d.hidden,)
    raise KeyError(f"{arch}: no shape rule for checkpoint key {key!r}")


def _base_tensor(key: str, shape: tuple[int, ...], seed: int):
    """The package's tiny-model tensor for ``key`` (norms ~1, biases std 0.02; the padding row of the embedding
    zero, as LMDeploy loads it) with the matrices rescaled: embeddings std 1, linears std 1/sqrt(fan_in), the
    LM head 2/sqrt(hidden) (log-probabilities spread over a few units)."""
    from lmdeploy_regex_lora.testing.tiny_models import random_tensor

    tensor = random_tensor(key, shape, seed)
    if len(shape) == 1:
        return tensor
    leaf = key.rsplit(".", 2)[-2]
    if leaf in ("embed_tokens", "tok_embeddings"):
        std = 1.0
    else:
        std = (2.0 if leaf in ("lm_head", "output") else 1.0) / math.sqrt(shape[1])
    return tensor * (std / TINY_STD)


def write_model(arch: str, out: pathlib.Path, d: Dims, seed: int = 0) -> pathlib.Path:
    """A complete model folder of ``arch`` at sizes ``d``.

    ``lmdeploy_regex_lora.testing.tiny_models.make_tiny_model`` writes the folder (its config conventions, InternLM2's
    remote-code config, generation config, checkpoint key names); this rescales the config, writes the weights
    again at ``d``'s sizes (``checkpoint_shape``; ``make_tiny_model``'s sizes are fixed) with the same generator,
    rescaled (``_base_tensor``), and adds the tokenizer.
    """
    from safetensors.torch import save_file

    from lmdeploy_regex_lora.testing.tiny_models import checkpoint_shapes, make_tiny_model

    make_tiny_model(arch, out, seed=seed, num_layers=d.layers)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(vocab_size=d.vocab, hidden_size=d.hidden, intermediate_size=d.intermediate,
               num_attention_heads=d.heads, num_key_value_heads=d.kv_heads, num_hidden_layers=d.layers,
               max_position_embeddings=2048)
    if arch == "qwen2":
        cfg.update(head_dim=d.head_dim, max_window_layers=d.layers)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    keys = sorted(checkpoint_shapes(out))
    tensors = {k: _base_tensor(k, checkpoint_shape(arch, k, d), seed).contiguous() for k in keys}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(out, d.vocab)
    return out


def write_adapter(model_dir: pathlib.Path, out: pathlib.Path, spec: AdapterSpec) -> list[str]:
    """A PEFT-format LoRA adapter as ms-swift saves it (regex ``target_modules``); returns the trained modules.

    ``lora_A`` has std 1/sqrt(in); ``lora_B`` is sized so that ``scaling * B A x`` is about half of ``W x``:
    each adapter changes the model's outputs clearly.
    """
    from safetensors.torch import save_file

    from lmdeploy_regex_lora.testing.tiny_models import checkpoint_linear_names

    linears = checkpoint_linear_names(model_dir)
    pattern = re.compile(spec.regex)
    targets = [name for name in linears if pattern.fullmatch(name)]
    if not targets:
        raise ValueError(f"{spec.name}: {spec.regex!r} matches no linear of {model_dir}")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    b_std = 0.5 / (spec.scaling * math.sqrt(spec.r))
    for name in targets:
        n_out, n_in = linears[name]
        tensors[f"base_model.model.{name}.lora_A.weight"] = _randn((spec.r, n_in), spec.seed, name + ".A",
                                                                   1 / math.sqrt(n_in))
        tensors[f"base_model.model.{name}.lora_B.weight"] = _randn((n_out, spec.r), spec.seed, name + ".B", b_std)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir), "revision": None,
        "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": 0.0, "target_modules": spec.regex, "bias": "none",
        "use_rslora": spec.use_rslora, "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "layers_pattern": None, "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return targets


def write_merged(model_dir: pathlib.Path, adapter_dir: pathlib.Path, spec: AdapterSpec,
                 out: pathlib.Path) -> pathlib.Path:
    """``W + scaling * B @ A`` (float64, saved float32) under the checkpoint's own keys; every other file copied.

    For InternLM2's ``wqkv`` the merge happens in the checkpoint's interleaved row order, as PEFT merges it;
    LMDeploy re-orders base and LoRA rows alike when it loads them.

    A reference written independently of the package's ``merge`` (which the demo and ``verify`` use), so the
    GPU run does not check the plugin against the plugin's own tool; PEFT's own merge checks this one
    (``tests/test_gpu_e2e_models.py``).
    """
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(model_dir / "model.safetensors"))
    lora = load_file(str(adapter_dir / "adapter_model.safetensors"))
    prefix = "base_model.model."
    modules = sorted({k[len(prefix):].rsplit(".lora_", 1)[0] for k in lora})
    for name in modules:
        a = lora[f"{prefix}{name}.lora_A.weight"].to(torch.float64)
        b = lora[f"{prefix}{name}.lora_B.weight"].to(torch.float64)
        w = state[f"{name}.weight"]
        state[f"{name}.weight"] = (w.to(torch.float64) + spec.scaling * (b @ a)).to(w.dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy2(item, out / item.name)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def prepare_models(work: pathlib.Path, archs: Sequence[str], d: Dims, seed: int = 0) -> dict[str, ModelSet]:
    """Write base model, adapters and merged checkpoints of each architecture under ``work``."""
    sets = {}
    for arch in archs:
        root = work / arch
        if root.exists():
            shutil.rmtree(root)
        base = write_model(arch, root / "base", d, seed)
        adapters, merged, targets = {}, {}, {}
        for spec in ADAPTERS[arch]:
            adapters[spec.name] = root / f"adapter-{spec.name}"
            targets[spec.name] = write_adapter(base, adapters[spec.name], spec)
            merged[spec.name] = write_merged(base, adapters[spec.name], spec, root / f"merged-{spec.name}")
        sets[arch] = ModelSet(arch, base, adapters, merged, targets)
    return sets


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of distinct lengths (5 .. 5 + 6(n-1) tokens) of ordinary tokens (no specials)."""
    import torch

    from lmdeploy_regex_lora.testing.tiny_models import tensor_seed

    gen = torch.Generator().manual_seed(tensor_seed(seed, "prompts"))
    prompts = []
    for i in range(n):
        length = 5 + 6 * i
        prompts.append([int(t) for t in torch.randint(len(SPECIAL_TOKENS), vocab, (length,), generator=gen)])
    return prompts
