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
    """A stand-in ctx_mgr whose current context describes a slot's own runs of rows, for ``TritonLoRAImpl``."""

    def __init__(self, context) -> None:
        self._context = context

    def current_context(self):
        return self._context


def forward_runs(lora: LoRA, x: torch.Tensor, base_output: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor,
                 ids: torch.Tensor) -> torch.Tensor:
    """LMDeploy's own LoRA forward (``lora.impl``, its kernel) on the given runs of rows instead of the step's."""
    context = SimpleNamespace(q_start_loc=starts, q_seqlens=counts, local_adapter_ids=ids, is_decoding=False)
    return lora.impl.forward(x, lora.lora_A, lora.lora_B, base_output, lora.adapter_info,
                             ctx_mgr=_FixedContext(context), colwise=lora.colwise, is_tp=lora.is_tp)


def recorded_step(lora: LoRA, layer: str):
    """The step the ``build_context`` patch point recorded for ``lora``'s model; refuses when it stopped recording."""
    if not recorder_active(lora.ctx_mgr):
        raise RuntimeError(
            f"[lmdeploy-regex-lora] LoRA on the {layer} needs the plugin's record of each step's rows, and the "
            "plugin was uninstalled after the adapters were loaded; rather than serve every row as 'no "
            "adapter', this step is refused. Keep the plugin installed while the engine runs.")
    return getattr(lora.ctx_mgr, STEP_ATTR, None)


class RowLoRA(LoRA):
    """LMDeploy's ``LoRA`` slot for a layer whose rows are not the step's token rows (the LM head)."""

    def forward(self, x, base_output=None):
        step = recorded_step(self, "LM head")
        num_rows = x.numel() // x.size(-1)
        ids = step.row_adapter_ids(num_rows) if step is not None else None
        if ids is None or num_rows == 0:
            return base_output  # no adapter ids in this step: every row is "no adapter"
        ids = ids.to(device=x.device, dtype=torch.long)
        # One run per group of consecutive rows with the same adapter.
        values, counts = torch.unique_consecutive(ids, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        return forward_runs(self, x, base_output, starts, counts, values)
