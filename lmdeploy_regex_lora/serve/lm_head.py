"""LoRA on the LM head, per request.

LMDeploy's LoRA kernel takes its rows from the step context (``q_start_loc``/``q_seqlens``: one
run of rows per sequence). The LM head never sees those rows: the model agent calls
``get_logits`` after the forward, on hidden states already cut to the last token of each sequence
(prefill), one row per sequence (decoding), all token rows (``return_logits``) or the rows picked
by ``logits_indices`` (input log-probs). So the LM head's slot, a :class:`RowLoRA`, works out the
adapter of every row itself, from the step's inputs recorded when LMDeploy builds the step context
(:mod:`.steps`), and hands LMDeploy's own kernel one run per row group.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from lmdeploy.pytorch.nn.linear import LoRA

from .steps import STEP_ATTR, recorder_active


class _FixedContext:
    """A stand-in ctx_mgr whose current context describes LM-head rows, for ``TritonLoRAImpl``."""

    def __init__(self, context) -> None:
        self._context = context

    def current_context(self):
        return self._context


class RowLoRA(LoRA):
    """LMDeploy's ``LoRA`` slot for a layer whose rows are not the step's token rows (the LM head)."""

    def forward(self, x, base_output=None):
        if not recorder_active(self.ctx_mgr):
            raise RuntimeError(
                "[lmdeploy-regex-lora] LoRA on the LM head needs the plugin's record of each step's rows, and the "
                "plugin was uninstalled after the adapters were loaded; rather than serve every row as 'no "
                "adapter', this step is refused. Keep the plugin installed while the engine runs.")
        step = getattr(self.ctx_mgr, STEP_ATTR, None)
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
