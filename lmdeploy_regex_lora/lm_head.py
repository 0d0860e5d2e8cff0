"""LoRA on the LM head, per request.

LMDeploy's LoRA kernel takes its rows from the step context (``q_start_loc``/``q_seqlens``: one
run of rows per sequence). The LM head never sees those rows: the model agent calls
``get_logits`` after the forward, on hidden states already cut to the last token of each sequence
(prefill), one row per sequence (decoding), all token rows (``return_logits``) or the rows picked
by ``logits_indices`` (input log-probs). So the LM head's slot, a :class:`RowLoRA`, works out the
adapter of every row itself, from the step's inputs recorded when LMDeploy builds the step context
(:func:`install_step_recorder`), and hands LMDeploy's own kernel one run per row group.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from lmdeploy.pytorch.nn.linear import LoRA


@dataclass
class StepRows:
    """What a step's inputs say about its rows (references to LMDeploy's tensors, nothing copied)."""

    seq_length: torch.Tensor
    adapter_ids: torch.Tensor | None
    is_decoding: bool
    logits_indices: torch.Tensor | None
    seq_logit_length: torch.Tensor | None

    @classmethod
    def from_inputs(cls, inputs) -> StepRows:
        return cls(
            seq_length=inputs.seq_length,
            adapter_ids=getattr(inputs, "local_adapter_ids", None),
            is_decoding=bool(inputs.is_decoding),
            logits_indices=getattr(inputs, "logits_indices", None),
            seq_logit_length=getattr(inputs, "seq_logit_length", None),
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


def install_step_recorder(ctx_mgr) -> None:
    """Record each step's inputs when LMDeploy builds its step context (once per ``ctx_mgr``)."""
    if getattr(ctx_mgr, "_lmdeploy_regex_lora_recorder", False):
        return
    original = ctx_mgr.build_context

    def build_context(*args, **kwargs):
        inputs = kwargs["inputs"] if "inputs" in kwargs else args[0]
        ctx_mgr._lmdeploy_regex_lora_step = StepRows.from_inputs(inputs)
        return original(*args, **kwargs)

    ctx_mgr.build_context = build_context
    ctx_mgr._lmdeploy_regex_lora_step = None
    ctx_mgr._lmdeploy_regex_lora_recorder = True


class _FixedContext:
    """A stand-in ctx_mgr whose current context describes LM-head rows, for ``TritonLoRAImpl``."""

    def __init__(self, context) -> None:
        self._context = context

    def current_context(self):
        return self._context


class RowLoRA(LoRA):
    """LMDeploy's ``LoRA`` slot for a layer whose rows are not the step's token rows (the LM head)."""

    def forward(self, x, base_output=None):
        step = getattr(self.ctx_mgr, "_lmdeploy_regex_lora_step", None)
        num_rows = x.numel() // x.size(-1)
        ids = step.row_adapter_ids(num_rows) if step is not None else None
        if ids is None or num_rows == 0:
            return base_output  # no adapter ids in this step: every row is "no adapter"
        ids = ids.to(device=x.device, dtype=torch.long)
        # One run per group of consecutive rows with the same adapter.
        values, counts = torch.unique_consecutive(ids, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        context = SimpleNamespace(q_start_loc=starts, q_seqlens=counts, local_adapter_ids=values, is_decoding=False)
        return self.impl.forward(x, self.lora_A, self.lora_B, base_output, self.adapter_info,
                                 ctx_mgr=_FixedContext(context), colwise=self.colwise, is_tp=self.is_tp)
