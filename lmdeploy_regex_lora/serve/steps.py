"""Which request every row of a step belongs to, recorded when LMDeploy builds the step context.

LMDeploy's LoRA kernel takes its rows from the step context: one run of rows per sequence. Slots on
layers whose rows are not the step's token rows (the LM head) work out each row's adapter themselves,
from the step's inputs. :func:`record_step` is the handler of the ``StepContextManager.build_context``
row of the patch table: for a context manager whose model has such slots (:func:`record_steps`), it
keeps a :class:`StepRows` of each step's inputs (references to LMDeploy's tensors, nothing copied).

This module is imported by the patch table as soon as LMDeploy's ``model_inputs`` has loaded, while
LMDeploy is still importing itself: it must not import LMDeploy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STEP_ATTR = "_lmdeploy_regex_lora_step"
RECORDING_ATTR = "_lmdeploy_regex_lora_recording"


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
