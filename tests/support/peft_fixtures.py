"""Real PEFT adapters (and PEFT's own merged reference) for the tiny models of ``tiny_models``.

The plugin must reproduce exactly what PEFT computes, so the tests need adapters written by PEFT
itself on a module tree whose names are the HF model's, and the merged weights PEFT produces from
them. ms-swift's regex adapters are emulated the way swift made them (see ``make_peft_adapter``).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
from collections.abc import Iterable
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmdeploy_regex_lora.testing.tiny_archs import detect_new_arch
from lmdeploy_regex_lora.testing.tiny_models import EMBEDDING_LEAVES
from lmdeploy_regex_lora.testing.tiny_models import detect_arch as _detect_old_arch

__all__ = [
    "NAMINGS",
    "NormParams",
    "hf_name",
    "build_hf_module_tree",
    "make_peft_adapter",
    "merge_adapter_checkpoint",
    "resolve_regex_targets",
]

NAMINGS: tuple[str, ...] = ("checkpoint", "tf452", "tf5")

# Layer types PEFT 0.14's LoRA accepts; a regex that fullmatches anything else makes PEFT raise.
_PEFT_LORA_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# What swift's ``_create_and_replace_hook`` (v2.x-v3.12) kept when target_modules was a str.
_SWIFT_KEPT_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.Conv2d)

# internvl_hf: checkpoint prefix (what transformers 5 save_pretrained writes, and the InternVL3-hf
# checkpoints) -> module prefix of InternVLForConditionalGeneration in transformers >= 4.52.
_TF452_PREFIXES: tuple[tuple[str, str], ...] = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head", "lm_head"),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
# Qwen2-VL / Qwen2.5-VL: the LLM and the vision tower moved under ``model.``; ``lm_head`` stayed.
_QWEN_VL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.", "model.language_model."),
    ("visual.", "model.visual."),
)
# LLaVA in transformers 5: CLIPVisionModel lost its ``vision_model`` level (4.52-4.57 still had it).
_LLAVA_TF5_PREFIXES: tuple[tuple[str, str], ...] = (
    ("vision_tower.vision_model.", "model.vision_tower."),
    *_TF452_PREFIXES,
)
# Gemma 3 VL in transformers 5: the checkpoint's language_model.model / vision_tower / projector under model., and
# its SigLIP tower without the vision_model level (Gemma3Model.vision_tower.encoder.*, checked on 5.24), as LLaVA's.
_GEMMA3_TF5_PREFIXES: tuple[tuple[str, str], ...] = (
    ("language_model.model.", "model.language_model."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
# (arch, naming) -> first-match prefix rules from checkpoint names; pairs not listed are the identity.
_RENAMES: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("internvl3_hf_qwen3", "tf5"): _TF452_PREFIXES,
    ("gemma3_vl", "tf5"): _GEMMA3_TF5_PREFIXES,
    ("internvl_hf", "tf452"): _TF452_PREFIXES,
    ("internvl_hf", "tf5"): _TF452_PREFIXES,
    ("qwen2_vl", "tf452"): _QWEN_VL_PREFIXES,
    ("qwen2_vl", "tf5"): _QWEN_VL_PREFIXES,
    ("qwen2_5_vl", "tf452"): _QWEN_VL_PREFIXES,
    ("qwen2_5_vl", "tf5"): _QWEN_VL_PREFIXES,
    ("llava", "tf452"): _TF452_PREFIXES,
    ("llava", "tf5"): _LLAVA_TF5_PREFIXES,
}
# Archs whose tree is always the real transformers class (re-parented into the older layouts).
_VLM_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
}


class NormParams(nn.Module):
    """Stands in for an HF norm (RMSNorm / LayerNorm): holds its weight (and bias), is not a LoRA target."""

    def __init__(self, size: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size)) if bias else None


# transformers 5 holds routed experts as fused parameters and routers as *Router classes: not nn.Linear, so
# neither swift's nor PEFT's rules target them. In the ``tf5`` tree of issue 11's architectures routers are plain
# parameter holders and each expert's weight a parameter of its ``experts`` module (no module per expert); in
# the ``checkpoint`` tree (transformers 4.x: one nn.Linear per expert, an nn.Linear router) both are linears.
_TF5_NOT_LINEAR = re.compile(r".*\.(mlp|block_sparse_moe)\.gate|.*\.feed_forward\.router")
_PER_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)\.(weight|bias)")


def tree_key(folder, arch: str, key: str, naming: str) -> str:
    """The name of checkpoint tensor ``key`` in the module tree of ``naming`` (see :data:`_PER_EXPERT`)."""
    name = hf_name(arch, key, naming)
    if naming == "tf5" and detect_new_arch(folder):
        name = _PER_EXPERT.sub(r"\1.expert\2_\3_\4", name)
    return name


def detect_arch(model_dir) -> str:
    """The tiny-model name of a folder written by ``tiny_models`` or ``tiny_archs``."""
    return detect_new_arch(model_dir) or _detect_old_arch(model_dir)


def hf_name(arch: str, checkpoint_name: str, naming: str = "checkpoint") -> str:
    """Translate a checkpoint key / module name into the module name under ``naming``.

    Which transformers version's module names an adapter was trained under decides its tensor keys.
    ``'checkpoint'`` is the identity: transformers < 4.52 module names are the checkpoint keys.
    ``'tf452'`` are the names of transformers 4.52-4.57, ``'tf5'`` those of transformers 5.x (checked
    on 5.24 by instantiating the classes); they differ only for LLaVA's CLIP tower:

    ==============  =================================  ==================================  ===========================
    arch            checkpoint (transformers < 4.52)   tf452 (4.52-4.57)                   tf5 (5.x)
    ==============  =================================  ==================================  ===========================
    internvl_hf     ``language_model.model.X``         ``model.language_model.X``          = tf452
                    ``language_model.lm_head``         ``lm_head``
                    ``vision_tower.X``                 ``model.vision_tower.X``
                    ``multi_modal_projector.X``        ``model.multi_modal_projector.X``
    qwen2_vl,       ``model.X`` (LLM)                  ``model.language_model.X``          = tf452
    qwen2_5_vl      ``visual.X``                       ``model.visual.X``
                    ``lm_head``                        ``lm_head``
    llava           ``language_model.model.X``         ``model.language_model.X``          as tf452, except
                    ``language_model.lm_head``         ``lm_head``                         ``model.vision_tower.X``
                    ``vision_tower.vision_model.X``    ``model.vision_tower.vision_model.X``
                    ``multi_modal_projector.X``        ``model.multi_modal_projector.X``
    ==============  =================================  ==================================  ===========================

    The remote-code InternVL chat models and plain LLMs have one naming only. Transformers 5 still
    *saves* the checkpoint names (LLaVA's tower as ``vision_tower.X``; the Hub checkpoints and LMDeploy
    use ``vision_tower.vision_model.X``).
    """
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}")
    for old, new in _RENAMES.get((arch, naming), ()):
        if checkpoint_name == old or checkpoint_name.startswith(old if old.endswith(".") else old + "."):
            return new + checkpoint_name[len(old):]
    return checkpoint_name


def _uses_transformers_class(arch: str, naming: str) -> bool:
    """Real transformers classes load these folders offline, with exactly the wanted module names."""
    return arch in ("qwen2", "llama") or (arch == "internvl_hf" and naming in ("tf452", "tf5")) or \
        (arch == "qwen3" and naming == "tf5")


def _load_transformers_model(model_dir: pathlib.Path, arch: str) -> nn.Module:
    """Instantiate the transformers class for a transformers-native tiny model (float32, eval)."""
    if arch == "internvl_hf":
        from transformers import InternVLForConditionalGeneration

        model = InternVLForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval()


class _Container(nn.Module):
    """A plain module holding given children, to rebuild an older transformers layout around real layers."""

    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


class _LegacyRoot(_Container):
    """Top of a pre-4.52 layout. Like the PreTrainedModel it stands for, it names its embeddings: PEFT's
    save then also writes the base ``lm_head`` weight when ``lm_head`` is a target, as it did then."""

    def __init__(self, input_embeddings: str, output_embeddings: str, **children: nn.Module) -> None:
        super().__init__(**children)
        self._embedding_paths = (input_embeddings, output_embeddings)

    def get_input_embeddings(self) -> nn.Module:
        return self.get_submodule(self._embedding_paths[0])

    def get_output_embeddings(self) -> nn.Module:
        return self.get_submodule(self._embedding_paths[1])


def _vlm_tree(model_dir: pathlib.Path, arch: str, naming: str) -> nn.Module:
    """The real transformers 5 VLM, re-parented into ``naming``'s layout, holding the checkpoint weights.

    Built from the config (not ``from_pretrained``, whose key conversion would decide the names for us)
    and loaded with ``strict=True`` through :func:`hf_name`, so every checkpoint key must land on
    exactly one parameter of the tree and vice versa. The layers keep their real classes (activations,
    Conv3d patch embedding, CLIP's position Embedding), which PEFT's and swift's regex rules look at.
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(model_dir))
    model = getattr(transformers, _VLM_CLASSES[arch])(config).to(torch.float32)
    root: nn.Module = model
    if arch == "llava":
        tower = model.model.vision_tower  # transformers 5: no vision_model level
        if naming == "checkpoint":
            root = _LegacyRoot(
                "language_model.model.embed_tokens", "language_model.lm_head",
                vision_tower=_Container(vision_model=tower),
                multi_modal_projector=model.model.multi_modal_projector,
                language_model=_Container(model=model.model.language_model, lm_head=model.lm_head),
            )
        elif naming == "tf452":
            model.model.vision_tower = _Container(vision_model=tower)
    elif naming == "checkpoint":  # Qwen2-VL / Qwen2.5-VL before 4.52: visual, model (the LLM), lm_head
        root = _LegacyRoot("model.embed_tokens", "lm_head", visual=model.model.visual,
                           model=model.model.language_model, lm_head=model.lm_head)
    state = {hf_name(arch, k, naming): v for k, v in _load_checkpoint(model_dir).items()}
    root.load_state_dict(state, strict=True)
    return root.eval()


def _child(root: nn.Module, path: str) -> nn.Module:
    """Get (creating plain containers as needed) the submodule at dotted ``path``."""
    module = root
    if not path:
        return module
    for part in path.split("."):
        if part not in module._modules:
            module.add_module(part, nn.Module())
        module = module._modules[part]
    return module


def _generic_tree(state: dict[str, torch.Tensor], loose: re.Pattern | None = None) -> nn.Module:
    """nn.Module tree whose names are the (already renamed) keys of ``state``, loaded with it; modules whose name
    fullmatches ``loose`` hold their tensors as plain parameters (no nn.Linear)."""
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        mod, _, leaf = key.rpartition(".")
        by_module.setdefault(mod, {})[leaf] = tensor
    parents = {key.rsplit(".", 1)[0] for key in by_module if "." in key}
    root = nn.Module()
    for path in sorted(by_module, key=lambda p: (p.count("."), p)):
        params = by_module[path]
        typed_leaf = (path not in parents and "weight" in params and set(params) <= {"weight", "bias"}
                      and params["weight"].dim() in (1, 2, 4) and not (loose and loose.fullmatch(path)))
        if not typed_leaf:
            holder = _child(root, path)
            for leaf, tensor in params.items():
                holder.register_parameter(leaf, nn.Parameter(torch.empty_like(tensor)))
            continue
        weight, has_bias = params["weight"], "bias" in params
        leaf_name = path.rsplit(".", 1)[-1]
        if weight.dim() == 2 and leaf_name in EMBEDDING_LEAVES:
            layer: nn.Module = nn.Embedding(weight.shape[0], weight.shape[1])
        elif weight.dim() == 2:
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
        elif weight.dim() == 4:
            kernel = tuple(weight.shape[2:])
            layer = nn.Conv2d(weight.shape[1], weight.shape[0], kernel, stride=kernel, bias=has_bias)
        elif weight.dim() == 1:
            layer = NormParams(weight.shape[0], bias=has_bias)
        else:
            raise ValueError(f"cannot tell the module type of {path!r} (weight shape {tuple(weight.shape)})")
        parent, _, name = path.rpartition(".")
        _child(root, parent).add_module(name, layer)
    root.load_state_dict(state, strict=True)
    return root.eval()


def build_hf_module_tree(model_dir: str | os.PathLike, naming: str = "checkpoint") -> nn.Module:
    """The HF model's module tree, with the checkpoint weights, as PEFT sees it.

    * ``qwen2`` / ``llama``: the real transformers class (all namings are the same).
    * ``qwen2_vl`` / ``qwen2_5_vl`` / ``llava``, every naming: the real transformers 5 class, its
      submodules re-parented into the older layouts (see :func:`hf_name` for the names).
    * ``internvl_hf`` with ``naming='tf452'`` / ``'tf5'``: the real ``InternVLForConditionalGeneration`` of the
      installed transformers (5.x), whose module names are the >=4.52 ones
      (``model.language_model.layers.N...``, ``model.vision_tower.encoder.layer.N...``,
      ``model.multi_modal_projector.linear_1``, ``lm_head``); transformers 5 still *writes* the older
      names to the checkpoint (``language_model.model.*``, ``language_model.lm_head``, ...), which is
      what ``naming='checkpoint'`` gives.
    * everything else (InternLM2 and InternVL chat remote code, ``internvl_hf`` checkpoint naming):
      a generic tree built from the checkpoint keys: ``nn.Linear`` (bias where the checkpoint has
      one), ``nn.Embedding`` for ``tok_embeddings`` / ``embed_tokens``, ``nn.Conv2d`` for the patch
      embedding, :class:`NormParams` for norms, loose tensors (``class_embedding``, ``ls1``) as
      parameters of their container.
    """
    folder = pathlib.Path(model_dir)
    arch = detect_arch(folder)
    hf_name(arch, "", naming)  # validates naming
    if arch in _VLM_CLASSES:
        return _vlm_tree(folder, arch, naming)
    if _uses_transformers_class(arch, naming):
        return _load_transformers_model(folder, arch)
    state = _load_checkpoint(folder)
    loose = _TF5_NOT_LINEAR if naming == "tf5" and detect_new_arch(folder) else None
    return _generic_tree({tree_key(folder, arch, k, naming): v for k, v in state.items()}, loose)


def _load_checkpoint(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder's safetensors file(s)."""
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    if not state:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    return state


def resolve_regex_targets(tree: nn.Module, regex: str, types: Iterable[type[nn.Module]] | None = None) -> list[str]:
    """Full names of the modules of ``types`` (default: nn.Linear) whose name ``re.fullmatch``-es ``regex``."""
    kinds = tuple(types) if types is not None else (nn.Linear,)
    pattern = re.compile(regex)
    return [name for name, mod in tree.named_modules() if name and isinstance(mod, kinds) and pattern.fullmatch(name)]


def _peft_would_reject(tree: nn.Module, regex: str) -> bool:
    """True when PEFT's own str matching (``re.fullmatch`` on every module name) hits a non-LoRA-able module."""
    pattern = re.compile(regex)
    return any(
        name and pattern.fullmatch(name) and not isinstance(mod, _PEFT_LORA_TYPES)
        for name, mod in tree.named_modules()
    )


def _swift_targets(tree: nn.Module, regex: str) -> list[str]:
    """What swift's hook injected for a str target: Linear-like classes, plus Embedding / Conv2d."""
    pattern = re.compile(regex)
    names = []
    for name, mod in tree.named_modules():
        if not name or not pattern.fullmatch(name):
            continue
        if "linear" in type(mod).__name__.lower() or isinstance(mod, _SWIFT_KEPT_TYPES):
            names.append(name)
    return names


def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"lora:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def _randomise_lora(model: nn.Module, seed: int) -> None:
    """Deterministic O(0.1) values for every LoRA tensor (lora_B included, so the delta is non-zero)."""
    for name, param in model.named_parameters():
        if "lora_" in name:
            gen = torch.Generator().manual_seed(_seed_for(seed, name))
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype) * 0.1)


def make_peft_adapter(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    target_modules: str | list[str],
    r: int = 8,
    lora_alpha: int = 16,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, int] | None = None,
    seed: int = 0,
    swift_style: bool | None = None,
    naming: str = "checkpoint",
    safe_serialization: bool = True,
    extra_config: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Write a real PEFT LoRA adapter for the tiny model in ``model_dir``; return ``out_dir``.

    ``swift_style`` (only for a str ``target_modules``): old ms-swift regexes also fullmatch
    non-Linear modules, on which vanilla PEFT raises "Target module ... is not supported"; swift's
    hook skipped those. Emulation injects the explicit list of matching Linear modules (plus
    Embedding / Conv2d, which swift's hook also kept) and writes the regex string back into
    ``adapter_config.json``, as swift's saved config has it. ``None`` emulates only when PEFT would
    reject the regex, ``True`` always, ``False`` never.

    ``extra_config``: keys that are ``LoraConfig`` fields are passed to it (real PEFT behaviour,
    e.g. ``modules_to_save``, ``use_dora``); any other key is written verbatim into
    ``adapter_config.json`` to mimic configs from other PEFT / swift versions.
    """
    from peft import LoraConfig, get_peft_model

    tree = build_hf_module_tree(model_dir, naming)
    regex = target_modules if isinstance(target_modules, str) else None
    emulate = False
    if regex is not None:
        emulate = _peft_would_reject(tree, regex) if swift_style is None else swift_style
    inject: str | list[str] = _swift_targets(tree, regex) if emulate and regex is not None else target_modules
    if emulate and not inject:
        raise ValueError(f"regex {regex!r} matches no LoRA-able module of {model_dir}")

    lora_fields = set(LoraConfig.__dataclass_fields__)
    extra = dict(extra_config or {})
    lora_extra = {k: v for k, v in extra.items() if k in lora_fields}
    json_extra = {k: v for k, v in extra.items() if k not in lora_fields}
    kwargs: dict[str, Any] = {"lora_dropout": 0.0, "bias": "none"}
    kwargs.update(lora_extra)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=inject,
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        init_lora_weights=False,
        **kwargs,
    )
    peft_model = get_peft_model(tree, config)
    _randomise_lora(peft_model, seed)
    out = pathlib.Path(out_dir)
    peft_model.save_pretrained(str(out), safe_serialization=safe_serialization)

    cfg_path = out / "adapter_config.json"
    saved = json.loads(cfg_path.read_text())
    if emulate:
        saved["target_modules"] = regex
    if not saved.get("base_model_name_or_path"):
        saved["base_model_name_or_path"] = str(model_dir)
    saved.update(json_extra)
    cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return out


def _detect_naming(arch: str, model_dir: pathlib.Path, adapter_dir: pathlib.Path) -> str:
    """The first of :data:`NAMINGS` under which every LoRA module of the adapter is a module of the model.

    Only archs with several namings need this; an adapter whose modules fit several (e.g. LLaVA's LLM
    only, under ``tf452`` and ``tf5``) names the same layers under each of them.
    """
    if not any(a == arch for a, _ in _RENAMES):
        return "checkpoint"
    files = sorted(adapter_dir.glob("adapter_model.safetensors"))
    if files:
        keys = list(load_file(str(files[0])))
    else:
        keys = list(torch.load(str(adapter_dir / "adapter_model.bin"), map_location="cpu", weights_only=True))
    prefix = "base_model.model."
    lora = {k[len(prefix):].split(".lora_", 1)[0] for k in keys if k.startswith(prefix) and ".lora_" in k}
    checkpoint_modules = {k.rsplit(".", 1)[0] for k in _load_checkpoint(model_dir)}
    for naming in NAMINGS:
        if lora <= {hf_name(arch, m, naming) for m in checkpoint_modules}:
            return naming
    return "checkpoint"


def merge_adapter_checkpoint(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    naming: str | None = None,
) -> pathlib.Path:
    """PEFT's reference merge: ``PeftModel.from_pretrained(tree).merge_and_unload()`` written as a model folder.

    The merged tensors are saved under the original checkpoint keys in ``out_dir/model.safetensors``
    and every non-weight file (config.json, remote-code ``*.py``, generation_config.json, ...) is
    copied, so LMDeploy loads the folder natively. A str ``target_modules`` that vanilla PEFT would
    reject (old swift regex) is resolved the way swift injected it. ``naming=None`` reads it from
    the adapter's keys.
    """
    from peft import LoraConfig, PeftModel

    src = pathlib.Path(model_dir)
    adapter = pathlib.Path(adapter_dir)
    arch = detect_arch(src)
    naming = naming or _detect_naming(arch, src, adapter)
    tree = build_hf_module_tree(src, naming)
    config = LoraConfig.from_pretrained(str(adapter))
    if isinstance(config.target_modules, str) and _peft_would_reject(tree, config.target_modules):
        config.target_modules = _swift_targets(tree, config.target_modules)
    peft_model = PeftModel.from_pretrained(tree, str(adapter), config=config)
    merged = peft_model.merge_and_unload()
    merged_state = merged.state_dict()

    original = _load_checkpoint(src)
    out_state: dict[str, torch.Tensor] = {}
    for key, tensor in original.items():
        name = tree_key(src, arch, key, naming)
        if name not in merged_state:
            raise KeyError(f"merged model has no {name!r} (checkpoint key {key!r})")
        out_state[key] = merged_state[name].detach().to(tensor.dtype).contiguous().clone()

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".safetensors.index.json", ".bin")):
            shutil.copy2(item, out / item.name)
    save_file(out_state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
