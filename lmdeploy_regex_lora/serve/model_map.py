"""Every checkpoint linear layer of the served model as a :class:`~.sites.Site`, read from LMDeploy's own loader.

LMDeploy loads the checkpoint it was given (``model.config._name_or_path``) with its model class's
``load_weights``, which renames, packs, splits and cuts the checkpoint's weights. :class:`ModelMap`
runs that same loader on a ``meta`` skeleton of the served model (rebuilt from ``model.config``, the
``add_adapters`` dtype and ``model.ctx_mgr.build_ctx``, in the caller's tensor-parallel context) and
records where each checkpoint row and column lands (:mod:`.weight_trace`). Only the weights an
adapter needs are traced, when it first needs them. The skeleton must equal the served model
(names and shapes after LMDeploy's post-load hooks), else the load is refused.

:class:`CheckpointMap` offers the same to ``merge`` from a checkpoint's headers (no torch, no LMDeploy).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from ..errors import AdapterError
from .naming import Naming, choose_naming, is_model_folder
from .sites import (
    FOLDED,
    IMAGE_ROWS,
    LM_HEAD,
    NON_TOKEN,
    PER_REQUEST,
    PLAIN_LINEAR,
    Serving,
    Site,
    derive_site,
    served_rows,
)

if TYPE_CHECKING:  # only ModelMap needs torch; CheckpointMap (merge) must not import it
    import torch

__all__ = ["FOLDED", "IMAGE_ROWS", "LM_HEAD", "NON_TOKEN", "PER_REQUEST", "PLAIN_LINEAR", "Serving", "Site",
           "ModelMap", "CheckpointMap", "LINEAR_KINDS"]

#: Destination kinds that are linear layers in the Hugging Face model (module_kind of weight_trace).
LINEAR_KINDS = ("lora-linear", "plain-linear", "moe-experts")
_EXPERT = re.compile(r".*\.experts\.\d+\..*")
_REBUILD_FIX = ("serve the model LMDeploy built from its folder without changing it afterwards; if it was, merge "
                "the adapter into the base model (`lmdeploy-regex-lora merge`) and serve the merge.")


class ModelLayoutError(AdapterError):
    """The served model's layout cannot be read (no checkpoint folder, a rebuild that differs): it names no
    adapter, so ``LMDEPLOY_REGEX_LORA_ON_ERROR=skip`` does not leave an adapter out for it; the load stops."""


class _Layers:
    """What :func:`~.plan.resolve_adapter` asks of a model: candidates, sites, naming, linearity."""

    model_dir: str | None = None
    candidates: dict[str, tuple[int, int] | None]

    def site(self, name: str) -> Site:
        return self.sites_for([name])[name]

    def sites_for(self, names: Iterable[str]) -> dict[str, Site]:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def sites(self) -> dict[str, Site]:
        """Every candidate's site (traces them all: for ``inspect`` and tests)."""
        return self.sites_for(self.candidates)

    def naming_for(self, adapter: str, file: str, tensor_modules: Iterable[str]) -> Naming:
        return choose_naming(adapter, file, list(tensor_modules), self.candidates, self.model_dir)

    def not_linear(self, names: Iterable[str], trained: Iterable[str] = ()) -> set[str]:
        """Of ``names`` (layers a config selects but the adapter has no tensors for), those that were no linear
        layer of the trainer's model: embeddings, routers that are bare parameters, ... and the routed experts
        when the adapter trained none (``trained``): transformers 5 holds them as fused parameters, which
        PEFT cannot target, while the checkpoint (and transformers 4.x) has one linear per expert."""
        sites = self.sites_for(names)
        experts = any(s.kind == "moe-experts" for s in self.sites_for(trained).values())
        return {n for n, s in sites.items() if s.kind not in LINEAR_KINDS or (s.kind == "moe-experts" and not experts)}

    def output_layer(self) -> str | None:  # pragma: no cover - overridden
        raise NotImplementedError


class ModelMap(_Layers):
    """The served model's checkpoint linears, by checkpoint module name, traced through LMDeploy's loader."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        self.model_dir = _checkpoint_dir(model)
        self.shapes = {k.removesuffix(".weight"): s for k, s in checkpoint_shapes(self.model_dir).items()}
        self.candidates: dict[str, tuple[int, int] | None] = dict(self.shapes)
        self.aliases = _tied_aliases(model)
        for module in self.aliases:
            self.candidates.setdefault(module, None)
        self.backbone, self.vocab, self.hidden = _token_embedding(self.modules)
        self._sites: dict[str, Site] = {}
        self._skeleton = None
        self._checked = False
        self._absorbed: dict[str, list[str]] = {}

    # -- tracing ------------------------------------------------------------------------------------

    def _fresh_skeleton(self):
        """A meta skeleton no trace has used since its post-load hooks ran (they change parameters)."""
        if self._skeleton is None:
            self._skeleton = self._build_skeleton()
        return self._skeleton

    def _post_load_check(self, skeleton) -> None:
        """Once, after the first trace: run LMDeploy's post-load hooks on that skeleton (what it absorbs) and
        check it against the served model. The skeleton is spent; a later trace builds another."""
        from .weight_trace import trace_post_load

        self._absorbed = trace_post_load(skeleton)
        self._checked = True
        self._skeleton = None
        self._check_skeleton(skeleton)

    def _build_skeleton(self):
        import copy
        from types import SimpleNamespace

        import torch
        from lmdeploy.pytorch.models.patch import build_patched_model

        config = getattr(self.model, "config", None)
        build_ctx = getattr(getattr(self.model, "ctx_mgr", None), "build_ctx", None)
        try:
            # build_model_from_hf_config may rewrite the context's quant_config: never the served model's.
            return build_patched_model(SimpleNamespace(hf_config=config, dtype=self.dtype), device=torch.device("meta"),
                                       build_model_ctx=copy.copy(build_ctx) if build_ctx is not None else None)
        except Exception as exc:
            raise ModelLayoutError(
                f"LMDeploy cannot rebuild this model from its config on the meta device ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); the plugin runs LMDeploy's own weight loader on "
                "that rebuild to place LoRA rows.", file=self.model_dir, fix=_REBUILD_FIX) from None

    def _check_skeleton(self, skeleton) -> None:
        served = {n: tuple(p.shape) for n, p in self.model.named_parameters() if ".lora_adapters." not in n}
        built = {n: tuple(p.shape) for n, p in skeleton.named_parameters() if ".lora_adapters." not in n}
        if served != built:
            diff = sorted(set(served.items()) ^ set(built.items()))
            sample = ", ".join(f"{n} {s}" for n, s in diff[:3])
            raise ModelLayoutError(
                f"the served model differs from the one LMDeploy builds from its config ({len(diff)} parameters "
                f"differ, e.g. {sample}), so where LoRA rows go cannot be read from LMDeploy's loader.",
                file=self.model_dir, fix=_REBUILD_FIX)

    def sites_for(self, names: Iterable[str]) -> dict[str, Site]:
        names = list(dict.fromkeys(names))
        todo = [n for n in names if n not in self._sites]
        if todo:
            self._trace([n for n in todo if n in self.shapes])
            for name in todo:
                if name in self.aliases and (name not in self._sites or not self._sites[name].lmdeploy_module):
                    self._sites[name] = self._alias_site(name)
        return {n: self._sites[n] for n in names}

    def _trace(self, names: list[str]) -> None:
        if not names:
            return
        from .weight_trace import trace_weights

        skeleton = self._fresh_skeleton()
        record = trace_weights(skeleton, {f"{n}.weight": self.shapes[n] for n in names})
        shapes = {n: tuple(p.shape) for n, p in skeleton.named_parameters(remove_duplicate=False)}
        if not self._checked:
            self._post_load_check(skeleton)
        for key, entry in record.entries.items():
            self._sites[key.removesuffix(".weight")] = self._classify(derive_site(entry, shapes), entry.name,
                                                                      entry.shape)

    def _alias_site(self, module: str) -> Site:
        """A layer whose weight *is* another parameter after loading (``tie_word_embeddings``): its rows are
        those of the checkpoint weight LMDeploy loads into that parameter (the vocab-sized candidates)."""
        target = self.aliases[module]
        biggest = max((s[0] for s in self.shapes.values()), default=0)
        vocab_sized = [n for n, s in self.shapes.items() if s[0] == biggest and n != module]
        for name, site in self.sites_for(vocab_sized).items():
            if f"{site.lmdeploy_module}.{site.param}" == target and site.lmdeploy_module:
                from .weight_trace import module_kind

                alias = replace(site, hf_name=module, lmdeploy_module=module, slot=module.rsplit(".", 1)[-1],
                                kind=module_kind(self.model, module), serving=PER_REQUEST, lora_capable=True,
                                detail=f"shares its weight with {name}")
                return self._classify(alias, module, (site.out_features, site.in_features))
        return self._classify(f"skipped: its weight is {target}, which no checkpoint weight is loaded into",
                              module, (0, 0))

    # -- classification -------------------------------------------------------------------------------

    def _token_rows(self, module: str) -> bool:
        return self.backbone is not None and (self.backbone == "" or module.startswith(self.backbone + "."))

    def _classify(self, site: Site | str, key: str, shape: tuple[int, ...]) -> Site:
        """How LoRA on the site can be served (see :class:`~.sites.Serving`)."""
        if isinstance(site, str):  # LMDeploy does not load it (or its writes cannot be read)
            return Site(key.removesuffix(".weight"), "", "", int(shape[1]), int(shape[0]), (0, 0), Serving.NOT_LOADED,
                        lora_capable=False, kind="not-loaded", detail=f"LMDeploy's loader {_why(site)}")
        absorbed = self._absorbed.get(f"{site.lmdeploy_module}.{site.param}")
        if absorbed:
            return replace(site, serving=Serving.ABSORBED, lora_capable=False,
                           detail=f"LMDeploy copies its weight into {', '.join(sorted(set(absorbed)))} after loading "
                                  f"and never runs {site.lmdeploy_module}")
        token = self._token_rows(site.lmdeploy_module)
        if site.kind == "lora-linear":
            serving = PER_REQUEST if token else LM_HEAD if self._vocab_head(site) else NON_TOKEN
            return replace(site, serving=serving)
        cls = type(self.modules.get(site.lmdeploy_module)).__name__
        if site.kind == "plain-linear":
            if not token:
                return replace(site, serving=PLAIN_LINEAR, lora_capable=False)
            return replace(site, serving=Serving.NO_LORA_PATH, lora_capable=False,
                           detail=f"LMDeploy builds {site.lmdeploy_module} as a plain torch.nn.Linear, which has no "
                                  "LoRA path")
        if site.kind == "moe-experts":
            moe = type(self.modules.get(site.lmdeploy_module.rpartition(".")[0])).__name__
            return replace(site, serving=Serving.MOE_EXPERTS, lora_capable=False,
                           detail=f"a routed expert of LMDeploy's fused MoE ({moe}), which has no LoRA path")
        if site.kind == "embedding":
            return replace(site, serving=Serving.EMBEDDING, lora_capable=False, detail=f"an embedding ({cls})")
        return replace(site, serving=Serving.NO_LORA_PATH, lora_capable=False,
                       detail=f"LMDeploy builds {site.lmdeploy_module} as {cls}, which has no LoRA path")

    def _vocab_head(self, site: Site) -> bool:
        """An LM head's shape: token-embedding width in, vocabulary out (a vision layer whose width happens to equal
        the vocabulary, as in tiny test models, reads image features, not the decoder's hidden states)."""
        return site.out_features == self.vocab and site.in_features == self.hidden

    def output_layer(self) -> str | None:
        """The LM head's checkpoint name (what PEFT's ``all-linear`` leaves out)."""
        biggest = max((s[0] for s in self.shapes.values()), default=0)
        names = [n for n, s in self.shapes.items() if s[0] == biggest] + list(self.aliases)
        return next((n for n, s in self.sites_for(names).items() if s.serving in (LM_HEAD, Serving.NO_LORA_PATH)
                     and s.out_features == self.vocab and not self._token_rows(s.lmdeploy_module)), None)

    def served_weight(self, site: Site) -> torch.Tensor:
        """This rank's served rows of ``site`` (base_slice of its parameter), as (out, in)."""
        return served_rows(self.modules, site)


def _why(status: str) -> str:
    if status.startswith("skipped"):
        return "skips it" + status.removeprefix("skipped")
    if status.startswith("error"):
        return "refuses it (" + status.removeprefix("error: ") + ")"
    return "writes it in a way that cannot be read back (" + status.removeprefix("untraceable: ") + ")"


def _checkpoint_dir(model) -> str:
    """The folder LMDeploy loaded ``model`` from: ``load_model_weights`` is given ``config._name_or_path``."""
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path or not is_model_folder(str(path)):
        raise ModelLayoutError(
            f"LMDeploy built this model from {path!r} (model.config._name_or_path), which is not a local model "
            "folder with a config.json here; the plugin reads that checkpoint's names to place LoRA rows.",
            file=str(path) if path else None,
            fix="serve the model from a local folder (LMDeploy downloads a Hub id into one), or load adapters into a "
                "model that LMDeploy built itself.")
    return os.fspath(path)


def checkpoint_shapes(model_dir: str) -> dict[str, tuple[int, int]]:
    """Every 2-D ``*.weight`` of the checkpoint LMDeploy loads from ``model_dir`` (its own file choice), by key.

    safetensors: headers only; ``.bin``: memory-mapped with ``weights_only``.
    """
    try:
        from lmdeploy.pytorch.weight_loader.model_weight_loader import ModelWeightLoader

        loader = ModelWeightLoader(model_dir)
        paths, kind = sorted(loader._shard_paths), loader._weight_type
    except Exception as exc:
        raise ModelLayoutError(f"holds no checkpoint LMDeploy can read ({type(exc).__name__}: {exc}).", file=model_dir,
                           fix="serve a complete model folder (model.safetensors, its index, or pytorch_model.bin)."
                           ) from None
    shapes: dict[str, tuple[int, ...]] = {}
    for path in paths:
        if kind == "safetensors":
            from ..safetensors_io import read_header

            shapes.update({k: e.shape for k, e in read_header(path, what="checkpoint shard").entries.items()})
        else:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            shapes.update({k: tuple(v.shape) for k, v in state.items()})
    return {k: (int(s[0]), int(s[1])) for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2}


def _tied_aliases(model) -> dict[str, str]:
    """{LMDeploy module: the parameter its weight is} for weights shared after loading (tied LM heads). A module
    registered twice (InternVL's ``lm_head`` is its LLM's) is one layer, not an alias."""
    from .weight_trace import _storage_key, storages_of

    first = storages_of(model)
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owner = first.get(_storage_key(p))
        if owner is None or owner == name or not name.endswith(".weight"):
            continue
        module, owner_module = name.removesuffix(".weight"), owner.rpartition(".")[0]
        if model.get_submodule(module) is not model.get_submodule(owner_module):
            out[module] = owner
    return out


def _token_embedding(modules: Mapping[str, object]) -> tuple[str | None, int | None, int | None]:
    """(the text decoder, vocabulary size, embedding width): the parent of the largest token embedding. Its linears
    run on token rows; LMDeploy's ``get_input_embeddings`` is not used (GLM-4's raises)."""
    import torch

    try:
        from lmdeploy.pytorch.nn import embedding
    except ImportError:  # older LMDeploy
        embedding = None
    # ParallelLMHead (an embedding class LMDeploy uses as DeepSeek's head) is newer than ParallelEmbedding.
    ParallelEmbedding = getattr(embedding, "ParallelEmbedding", ())  # noqa: N806
    ParallelLMHead = getattr(embedding, "ParallelLMHead", ())  # noqa: N806
    best: tuple[int, str, int] | None = None
    for name, mod in modules.items():
        if ParallelLMHead and isinstance(mod, ParallelLMHead):
            continue
        if isinstance(mod, torch.nn.Embedding):
            rows = int(mod.num_embeddings)
        elif ParallelEmbedding and isinstance(mod, ParallelEmbedding):
            rows = int(mod.vocab_size)
        else:
            continue
        if best is None or rows > best[0]:
            best = (rows, name, int(mod.weight.shape[-1]))
    if best is None:
        return None, None, None
    return best[1].rpartition(".")[0], best[0], best[2]


class CheckpointMap(_Layers):
    """The linear layers of a checkpoint as its safetensors headers list them, for ``merge``.

    A merge writes checkpoint tensors, so its sites are the checkpoint's own: every 2-D
    ``<module>.weight`` (``merge`` refuses a quantized one by name) under the checkpoint's name, with its
    full (out, in) shape, in the checkpoint's row order (InternLM2's interleaved ``wqkv`` included: the
    adapter was trained on that order). Naming, matching and every check of the adapter are serving's;
    neither LMDeploy nor torch is needed (names of another transformers version import it, see
    :mod:`.naming`). Headers cannot tell an embedding from a linear, so vocabulary-sized weights (embeddings,
    the LM head) count as not linear when an adapter leaves them alone, and ``*.experts.<n>.*`` weights are
    routed experts (every Hub MoE checkpoint names them so).
    """

    def __init__(self, sites: dict[str, Site], model_dir: str | None = None) -> None:
        self._all = sites
        self.model_dir = model_dir
        self.candidates = {n: (s.out_features, s.in_features) for n, s in sites.items()}
        self.modules: dict = {}

    @classmethod
    def from_shapes(cls, weights: Mapping[str, tuple[int, ...] | list[int]], model_dir: str | None = None
                    ) -> CheckpointMap:
        sites = {}
        for key, shape in weights.items():
            if key.endswith(".weight") and len(shape) == 2:
                name = key[: -len(".weight")]
                kind = "moe-experts" if _EXPERT.fullmatch(name) else "lora-linear"
                sites[name] = Site(name, name, name.rsplit(".", 1)[-1], int(shape[1]), int(shape[0]),
                                   (0, int(shape[0])), PER_REQUEST, kind=kind)
        return cls(sites, model_dir)

    def sites_for(self, names: Iterable[str]) -> dict[str, Site]:
        return {n: self._all[n] for n in names}

    def not_linear(self, names: Iterable[str], trained: Iterable[str] = ()) -> set[str]:
        biggest = max((s.out_features for s in self._all.values()), default=0)
        experts = any(self._all[n].kind == "moe-experts" for n in trained)
        return {n for n in names if self._all[n].out_features == biggest
                or (self._all[n].kind == "moe-experts" and not experts)}

    def output_layer(self) -> str | None:
        return None  # not told apart from the embedding: both count as not linear (not_linear)
