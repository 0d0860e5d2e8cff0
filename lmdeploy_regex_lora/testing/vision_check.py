"""The per-request check of vision embeddings: LMDeploy's own image path on a batch mixing adapters.

A batch of requests, each with its adapter id and images (made as LMDeploy's input processors make them:
one ``MultiModalData`` per image, tiles / patches / one image as leading rows, under the entry of
``input_multimodals`` the model reads: :data:`LAYOUTS`), becomes a real
``ModelInputs`` (``vision_inputs.input_multimodals``, ``local_adapter_ids``), goes through the model's
``ctx_mgr.build_context`` (where the plugin records the step), its ``prepare_inputs_for_generation`` and
its own ``forward``, which runs the vision tower and projector and scatters the image embeddings into the
token embeddings. The text decoder that ``forward`` then calls is the one part replaced: it needs LMDeploy's
paged attention, which has no CPU path, so a stand-in returns the ``inputs_embeds`` it was given (and
Qwen3-VL's deepstack features, which the decoder adds to the image-token rows of its first layers, beside them).

Each request's image-token rows must equal those of the same request run alone through its adapter's
merged model (the base model for "no adapter"); "no adapter" rows must be bit-identical to the base model's
on the same batch. On CPU the LoRA kernel is LMDeploy's Triton kernel under ``TRITON_INTERPRET=1``, which
must be set before Triton is first imported (:func:`use_interpreted_kernel`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch

from .tiny_configs import VOCAB

IMAGE_TOKEN = VOCAB - 1  # the tiny models' image token (any id works: the mask is computed from it)
VIDEO_TOKEN = VOCAB - 2  # their video token (Qwen3-VL / Qwen3.5 mark video items with it)
TOL = 2e-5  # float32 rounding of a few layers, as tests/scripts/kernel.py allows

#: The issue's batch: adapter a (id 1) with one image of 2 units, no adapter with two images, adapter b
#: (id 2) with one image. Units: InternVL / Llama 4 tiles; Qwen / GLM (t, h, w) patch grids; LLaVA and
#: Gemma 3 one per image. Qwen2.5-VL's windows are 4x4 merged patches: a 4x10 grid (2x5 merged) spans two
#: windows, so the tower reorders that image's rows (within the image).
_TILES = [(1, [2]), (0, [1, 3]), (2, [1])]
_GRIDS = [(1, [(1, 4, 6)]), (0, [(1, 2, 2), (1, 4, 4)]), (2, [(1, 6, 4)])]
_ONE_EACH = [(1, [1]), (0, [1, 1]), (2, [1])]
BATCHES: dict[str, list[tuple[int, list]]] = {
    "internvl": _TILES,
    "qwen2_vl": _GRIDS,
    "qwen2_5_vl": [(1, [(1, 4, 10)]), (0, [(1, 2, 2), (1, 4, 4)]), (2, [(1, 4, 6)])],
    "llava": _ONE_EACH,
    "qwen3_vl": _GRIDS,
    "qwen3_5": _GRIDS,
    "glm4v": _GRIDS,
    "gemma3": _ONE_EACH,
    "llama4": _TILES,
}


@dataclass(frozen=True)
class Layout:
    """How a family's input processor lays out one image, and where its prepared inputs mark image tokens."""

    units: str  # what an image spec of BATCHES is: "tiles", "grid" (t, h, w patches) or "image" (one)
    key: str = "image"  # the entry of a sequence's input_multimodals that prepare_inputs_for_generation reads
    mask: str = "image_mask"  # the prepared input that marks the image-token rows


#: Read from each model's prepare_inputs_for_generation and input processor in LMDeploy 0.18, independently
#: of vision_policy.VISION_MODELS (whose ``key`` this check then confirms).
LAYOUTS: dict[str, Layout] = {
    "internvl": Layout("tiles"), "qwen2_vl": Layout("grid"), "qwen2_5_vl": Layout("grid"), "llava": Layout("image"),
    "qwen3_vl": Layout("grid", "mm_data", "multimodal_mask"), "qwen3_5": Layout("grid", "mm_data", "multimodal_mask"),
    "glm4v": Layout("grid"), "gemma3": Layout("image"), "llama4": Layout("tiles"),
}
#: class-name prefix -> family (first match; Qwen2_5_VL before Qwen2VL is not needed: the names differ)
_FAMILIES = (("InternVL", "internvl"), ("Qwen2_5_VL", "qwen2_5_vl"), ("Qwen2VL", "qwen2_vl"), ("Llava", "llava"),
             ("Qwen3VL", "qwen3_vl"), ("Qwen3_5", "qwen3_5"), ("Glm4v", "glm4v"), ("Gemma3", "gemma3"),
             ("Llama4", "llama4"))


def use_interpreted_kernel() -> None:
    """LMDeploy's Triton LoRA kernel on the CPU tensors these checks use: Triton's interpreter, the autotuner
    cut to one config (it would time candidates on a GPU). Must run before Triton is first imported."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton was imported before TRITON_INTERPRET=1 was set; its kernels would need a GPU")
    os.environ["TRITON_INTERPRET"] = "1"
    from lmdeploy.pytorch.kernels.cuda import fused_lora

    kernel = fused_lora._fused_lora_kernel
    kernel.configs = kernel.configs[:1]


def served_and_references(base_dir: str, adapters: dict[str, str], merged_dirs: dict) -> tuple:
    """(served model, {adapter id: (model, folder)}): the adapters loaded through LMDeploy's ``add_adapters``
    (the plugin must be installed), and LMDeploy's build of the base (id 0) and of each merged checkpoint."""
    from lmdeploy.pytorch.models import patch

    from .build import build_lmdeploy_model

    served = build_lmdeploy_model(base_dir)
    patch.add_adapters(served, adapters, dtype=torch.float32, device=torch.device("cpu"))
    refs = {0: (build_lmdeploy_model(base_dir), base_dir)}
    refs.update({int(k): (build_lmdeploy_model(v), v) for k, v in merged_dirs.items()})
    return served, refs


def family(model: torch.nn.Module) -> str:
    """Which image layout the model's input processor makes (a key of :data:`BATCHES` and :data:`LAYOUTS`)."""
    name = type(model).__name__
    for prefix, kind in _FAMILIES:
        if name.startswith(prefix):
            return kind
    raise ValueError(f"no image layout for {name}")


@dataclass
class Request:
    adapter_id: int
    images: list = field(default_factory=list)  # MultiModalData, in prompt order
    input_ids: list[int] = field(default_factory=list)
    key: str = "image"  # the entry of input_multimodals the model reads (Layout.key)


def _size(value) -> int:
    return value if isinstance(value, int) else value[0]


def _pixels_and_tokens(cfg, kind: str, spec, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    vc = cfg.vision_config
    units = LAYOUTS[kind].units
    if units == "grid":
        t, h, w = spec
        pixels = torch.randn(t * h * w, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2, generator=gen)
        return pixels, t * h * w // vc.spatial_merge_size ** 2
    size, patch = _size(vc.image_size), _size(vc.patch_size)
    pixels = torch.randn(spec, 3, size, size, generator=gen)
    if units == "image":
        per_unit = cfg.mm_tokens_per_image if kind == "gemma3" else (size // patch) ** 2
    else:  # tiles: the pixel shuffle keeps ratio**2 of each tile's patches
        ratio = vc.pixel_shuffle_ratio if kind == "llama4" else cfg.downsample_ratio
        per_unit = int((size // patch) ** 2 * ratio ** 2)
    return pixels, spec * per_unit


def make_image(model: torch.nn.Module, spec, gen: torch.Generator):
    """(MultiModalData, image tokens) for one image: ``spec`` is tiles, a (t, h, w) grid or 1 (see :data:`LAYOUTS`).

    Where the model reads 'mm_data', a grid of more than one frame is a video, as LMDeploy's Qwen3-VL input
    processor makes it (``Modality.VIDEO``, ``video_token_id``)."""
    from lmdeploy.pytorch.multimodal.data_type import MultiModalData
    from lmdeploy.vl.constants import Modality

    kind = family(model)
    meta, modality = {"image_token_id": IMAGE_TOKEN}, Modality.IMAGE
    pixels, tokens = _pixels_and_tokens(model.config, kind, spec, gen)
    if LAYOUTS[kind].units == "grid":  # Qwen2-VL / 2.5-VL concatenate (1, 3) grids, the others stack (3,) ones
        meta["grid_thw"] = torch.tensor([list(spec)] if kind.startswith("qwen2") else list(spec))
        if LAYOUTS[kind].key == "mm_data" and spec[0] > 1:
            meta, modality = {"grid_thw": meta["grid_thw"], "video_token_id": VIDEO_TOKEN}, Modality.VIDEO
    return MultiModalData(data=pixels, start=0, end=tokens, meta=meta, modality=modality), tokens


def make_requests(model: torch.nn.Module, batch: list[tuple[int, list]] | None = None, seed: int = 0
                  ) -> list[Request]:
    """Requests of ``batch`` (default: the model's entry of :data:`BATCHES`), text tokens around each image."""
    gen = torch.Generator().manual_seed(seed)
    requests = []
    kind = family(model)
    for adapter_id, specs in batch or BATCHES[kind]:
        req = Request(adapter_id, [], [5, 6, 7], LAYOUTS[kind].key)
        for spec in specs:
            image, tokens = make_image(model, spec, gen)
            image.start, image.end = len(req.input_ids), len(req.input_ids) + tokens
            req.input_ids += [image.meta.get("video_token_id", IMAGE_TOKEN)] * tokens + [8, 9]
            req.images.append(image)
        requests.append(req)
    return requests


def model_inputs(requests: list[Request]):
    """The ``ModelInputs`` LMDeploy's inputs maker builds for a prefill of these requests."""
    from lmdeploy.pytorch.model_inputs import ModelInputs, VisionModelInputs

    n = len(requests)
    seqlens = torch.tensor([len(r.input_ids) for r in requests])
    zeros = torch.zeros(n, dtype=torch.long)
    return ModelInputs(
        input_ids=torch.tensor([t for r in requests for t in r.input_ids])[None], seq_length=seqlens,
        history_lengths=zeros, block_offsets=torch.zeros(n, 1, dtype=torch.long), is_decoding=False,
        num_ignored_history=zeros, max_q_seqlen=int(seqlens.max()), max_kv_seqlen=int(seqlens.max()),
        sum_kv_seqlen=int(seqlens.sum()), local_adapter_ids=torch.tensor([r.adapter_id for r in requests]),
        vision_inputs=VisionModelInputs(history_lengths=zeros,
                                        input_multimodals=[{r.key: r.images} if r.images else {} for r in requests]))


class _DecoderInput(torch.nn.Module):
    """Stand-in for the text decoder (paged attention has no CPU path): hands back the embeddings it gets (by
    keyword, or Llama 4's first positional argument). Qwen3-VL's deepstack features, which the decoder would add to
    the image-token rows of its first layers, come back beside them: one more block of columns per feature."""

    def forward(self, *args, inputs_embeds=None, deepstack_visual_embeds=None, visual_pos_masks=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = next(a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
        extra = [torch.zeros_like(inputs_embeds).masked_scatter(visual_pos_masks, f.to(inputs_embeds))
                 for f in deepstack_visual_embeds or ()]
        return torch.cat([inputs_embeds, *extra], dim=-1)


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The text decoder the model's forward calls after scattering the image embeddings."""
    for owner in (model, getattr(model, "model", None)):  # Qwen3.5: model.model.language_model, beside the tower
        if hasattr(owner, "language_model"):
            return owner.language_model
    return model.model


def _state_caches(config) -> list[torch.Tensor] | None:
    """Qwen3.5's linear-attention state caches (prepare_inputs_for_generation hands one pair per such layer to the
    decoder, which the stand-in ignores): empty placeholders of the right count."""
    layers = getattr(getattr(config, "text_config", config), "layer_types", None) or []
    count = sum(t == "linear_attention" for t in layers)
    return [torch.zeros(1, count, 1), torch.zeros(1, count, 1)] if count else None


class VisionRunner:
    """Runs requests through one LMDeploy model's image path, as the model agent's ``model_forward`` does."""

    def __init__(self, model: torch.nn.Module, model_dir) -> None:
        from lmdeploy.pytorch.config import CacheConfig, ModelConfig

        self.model = model
        self.model_config = ModelConfig.from_pretrained(str(model_dir), trust_remote_code=True, dtype="float32",
                                                        device_type="cpu")
        self.cache_config = CacheConfig(max_batches=8, block_size=16, num_cpu_blocks=0, num_gpu_blocks=16)

    @torch.inference_mode()
    def embeddings(self, requests: list[Request]) -> list[torch.Tensor]:
        """Per request: its image-token rows of the embeddings the model's forward hands the text decoder."""
        from lmdeploy.pytorch.model_inputs import step_ctx_manager

        model, inputs = self.model, model_inputs(requests)
        decoder = _decoder(model)
        decoder.forward = _DecoderInput().forward  # an instance attribute: the class's forward is untouched
        layers = [None] * 64  # past_key_values: one entry per decoder layer (the stand-in decoder reads none)
        try:
            with step_ctx_manager(model.ctx_mgr):
                ctx = model.ctx_mgr.build_context(inputs=inputs, model_config=self.model_config,
                                                  cache_config=self.cache_config,
                                                  state_caches=_state_caches(model.config))
                with model.ctx_mgr.context(ctx):
                    prepared = model.prepare_inputs_for_generation(past_key_values=layers, context=ctx)
                    embeds = model(**prepared)
        finally:
            del decoder.forward
        if isinstance(embeds, dict):  # Qwen3.5's forward returns its outputs by name
            embeds = embeds["hidden_states"]
        mask = prepared[LAYOUTS[family(model)].mask][0]
        out, start = [], 0
        for n in inputs.seq_length.tolist():
            out.append(embeds[0, start:start + n][mask[start:start + n]])
            start += n
        return out


def max_errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[float]:
    return [float((g - w).abs().max()) if g.numel() else 0.0 for g, w in zip(got, want, strict=True)]


def check_requests(served: VisionRunner, references: dict[int, VisionRunner], requests: list[Request],
                   tol: float = TOL) -> dict:
    """Each request against its own reference run alone; id-0 rows bit-identical to the base on the same batch.

    ``references`` maps adapter id -> runner of its merged model (0: the base). Returns the errors, whether
    each adapter changes its rows at all (else the check proves nothing) and ``ok``.
    """
    got = served.embeddings(requests)
    alone = [references[r.adapter_id].embeddings([r])[0] for r in requests]
    base_batch = references[0].embeddings(requests)
    errors = max_errors(got, alone)
    effect = max_errors(got, base_batch)
    base_exact = all(torch.equal(g, b) for r, g, b in zip(requests, got, base_batch, strict=True)
                     if r.adapter_id == 0)
    changed = all(e > 100 * tol for r, e in zip(requests, effect, strict=True) if r.adapter_id)
    return {"max_err_per_request": errors, "lora_effect_per_request": effect, "no_adapter_bit_identical": base_exact,
            "every_adapter_changes_its_rows": changed, "columns": int(got[0].shape[-1]),
            "ok": all(e <= tol for e in errors) and base_exact and changed}
