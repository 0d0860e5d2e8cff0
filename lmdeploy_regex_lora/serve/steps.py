"""Which request every row of a step belongs to, recorded when LMDeploy builds the step context.

LMDeploy's LoRA kernel takes its rows from the step context: one run of rows per sequence. Slots on
layers whose rows are not the step's token rows (the LM head, vision towers and projectors) work out
each row's adapter themselves, from the step's inputs. :func:`record_step` is the handler of the
``StepContextManager.build_context`` row of the patch table: for a context manager whose model has such
slots (:func:`record_steps`), it keeps a :class:`StepRows` of each step's inputs (references to
LMDeploy's objects, nothing copied).

Image rows (:func:`image_units`, :func:`image_row_runs`): the step's ``input_multimodals`` hold one dict
per sequence, in batch order, and the verified models' ``prepare_inputs_for_generation`` concatenate
``mm[key]`` of every sequence in that order (``key`` is ``'image'``, or ``'mm_data'`` for Qwen3-VL and
Qwen3.5, whose list holds images and videos alike); image ``i`` has ``units`` leading rows in its pixel
tensor (tiles, patches or 1). A tower or projector linear with ``R`` input rows then gives image ``i``
the rows ``[U_<i * R / U, U_<=i * R / U)`` (``U`` units in all). Qwen2.5-VL reorders rows by window
inside the tower, but only within each image, so each image keeps its block. The bounds must be whole
numbers; if not, the layer does not run on these images this way and the step is refused.

This module is imported by the patch table as soon as LMDeploy's ``model_inputs`` has loaded, while
LMDeploy is still importing itself: it must not import LMDeploy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

STEP_ATTR = "_lmdeploy_regex_lora_step"
RECORDING_ATTR = "_lmdeploy_regex_lora_recording"
IMAGE = "image"  # the entry most verified models' prepare_inputs_for_generation concatenate (vision_policy: key)

Run = tuple[int, int, int]  # (first row, rows, adapter id)


class ImageRowsError(RuntimeError):
    """The rows of a vision/projector layer cannot be attributed to images: the step is refused, never guessed."""


@dataclass
class StepRows:
    """What a step's inputs say about its rows (references to LMDeploy's objects, nothing copied)."""

    seq_length: torch.Tensor
    adapter_ids: torch.Tensor | None
    is_decoding: bool
    logits_indices: torch.Tensor | None
    seq_logit_length: torch.Tensor | None
    input_multimodals: list | None = None
    #: What slots work out once per step (image runs by row count, their device tensors), dropped with the step.
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_inputs(cls, inputs) -> StepRows:
        vision = getattr(inputs, "vision_inputs", None)
        return cls(
            seq_length=inputs.seq_length,
            adapter_ids=getattr(inputs, "local_adapter_ids", None),
            is_decoding=bool(inputs.is_decoding),
            logits_indices=getattr(inputs, "logits_indices", None),
            seq_logit_length=getattr(inputs, "seq_logit_length", None),
            input_multimodals=getattr(vision, "input_multimodals", None),
        )

    def row_adapter_ids(self, num_rows: int) -> torch.Tensor | None:
        """The adapter id of each of ``num_rows`` LM-head rows (None: no adapter ids in this step)."""
        ids = self.adapter_ids
        if ids is None:
            return None
        ids = ids.flatten()
        seq_length = self.seq_length.flatten().to(ids.device)
        if ids.numel() > 0 and bool((ids == ids[0]).all()):
            return ids[:1].expand(num_rows)
        num_tokens = int(seq_length.sum())
        # The input log-prob path (agent._get_input_logits) projects exactly the logits_indices rows.
        if (not self.is_decoding and self.logits_indices is not None and self.seq_logit_length is not None
                and num_rows == self.logits_indices.numel()):
            per_token = torch.repeat_interleave(ids, seq_length)
            return per_token.index_select(0, self.logits_indices.flatten().to(ids.device))
        if num_rows == num_tokens:  # every token row (return_logits, or decoding: one token each)
            return torch.repeat_interleave(ids, seq_length)
        if num_rows == ids.numel():  # last token of each sequence (agent._postprocess_forward_output)
            return ids
        raise RuntimeError(
            f"[lmdeploy-regex-lora] the LM head got {num_rows} rows in a step of {ids.numel()} sequences and "
            f"{num_tokens} tokens mixing adapters; cannot tell which adapter each row belongs to, so LM-head "
            "LoRA is not applied silently wrong. Please report this with your LMDeploy version and options.")

    def image_runs(self, num_rows: int, key: str = IMAGE) -> list[Run] | None:
        """One run per image (``input_multimodals`` entry ``key``) of a layer with ``num_rows`` image rows
        (None: no adapter ids in this step).

        Computed once per step and row count (one small host copy of the adapter ids per step).
        """
        if self.adapter_ids is None:
            return None
        cache_key = ("image-runs", key, num_rows)
        if cache_key not in self.cache:
            images = image_units(self.input_multimodals, key)
            self.cache[cache_key] = image_row_runs(images, self.adapter_ids.flatten().tolist(), num_rows)
        return self.cache[cache_key]


def _units(data) -> int:
    if isinstance(data, torch.Tensor):
        return int(data.shape[0])
    return sum(int(d.shape[0]) for d in data)  # a list of tensors, concatenated by the model


def image_units(input_multimodals: list | None, key: str = IMAGE) -> list[tuple[int, int]]:
    """``[(sequence index, units)]`` per item of entry ``key``, in the order ``prepare_inputs_for_generation``
    concatenates them."""
    return [(seq, _units(item.data)) for seq, mm in enumerate(input_multimodals or ())
            for item in (mm or {}).get(key, ())]


def image_row_runs(images: list[tuple[int, int]], adapter_ids: list[int], num_rows: int) -> list[Run]:
    """``[(first row, rows, adapter id)]``: each image's block of ``num_rows``, consecutive same-id images joined.

    Raises :class:`ImageRowsError` when the step has no images or the blocks are not whole rows.
    """
    total = sum(units for _, units in images)
    if total <= 0:
        raise ImageRowsError(
            f"[lmdeploy-regex-lora] a vision/projector layer with LoRA got {num_rows} rows in a step whose recorded "
            "inputs hold no images, so the adapter of each row is unknown; the step is refused rather than served "
            "with the wrong adapter. Please report this with your LMDeploy version and options.")
    runs: list[Run] = []
    before = 0
    for seq, units in images:
        lo, hi = before * num_rows, (before + units) * num_rows
        before += units
        if lo % total or hi % total:
            raise ImageRowsError(
                f"[lmdeploy-regex-lora] a vision/projector layer with LoRA got {num_rows} rows for {total} image "
                f"units ({[u for _, u in images]} per image): they do not split into whole rows per image, so the "
                "adapter of each row is unknown; the step is refused rather than served with the wrong adapter.")
        start, rows, aid = lo // total, (hi - lo) // total, int(adapter_ids[seq])
        if runs and runs[-1][2] == aid:
            runs[-1] = (runs[-1][0], runs[-1][1] + rows, aid)
        else:
            runs.append((start, rows, aid))
    return runs


def record_steps(ctx_mgr) -> None:
    """Ask the ``build_context`` patch point to record this ``ctx_mgr``'s step inputs (slots need them)."""
    setattr(ctx_mgr, RECORDING_ATTR, True)
    if not hasattr(ctx_mgr, STEP_ATTR):
        setattr(ctx_mgr, STEP_ATTR, None)


def record_step(wrapped, instance, args, kwargs):
    """Handler of ``StepContextManager.build_context``: keep the step's inputs where the slots read them."""
    if instance is not None and getattr(instance, RECORDING_ATTR, False):
        inputs = kwargs["inputs"] if "inputs" in kwargs else args[0]
        setattr(instance, STEP_ATTR, StepRows.from_inputs(inputs))
    return wrapped(*args, **kwargs)


def recorder_active(ctx_mgr) -> bool:
    """Whether ``build_context`` of ``ctx_mgr``'s class is still the plugin's recorder."""
    from .hook import is_wrapper

    owner = next((k for k in type(ctx_mgr).__mro__ if "build_context" in vars(k)), None)
    return owner is not None and is_wrapper(vars(owner)["build_context"])
