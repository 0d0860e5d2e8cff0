"""The one check of a served model against merged checkpoints, module by module, as LMDeploy loads them.

For every LoRA-carrying linear and every adapter id, the delta the plugin's slots add (``scaling * B @ A``
placed at the slot's output rows; token-row, LM-head and image-row slots alike, on LMDeploy's linears and
on wrapped plain ``nn.Linear`` layers) must equal ``W_merged - W_base`` as LMDeploy
itself loads the two checkpoints; modules without slots must have ``W_merged == W_base`` exactly, and
adapter id 0 ("no adapter") must add exactly nothing. :func:`compare_adapter` gives one row per module
(what ``verify`` prints); :func:`compare` raises :class:`Mismatch` on the first bad row (what the tests
and the demo use).

The tolerance: :data:`ATOL` relative to the largest delta (float32 rounding: PEFT merges in float32, the
check rebuilds ``scaling * B @ A`` in float64), plus, when the merged checkpoint was stored in a
narrower dtype (``precision`` significand bits), half a unit in its last place at each merged weight.
"""

from __future__ import annotations

import torch

ATOL = 2e-6


class Mismatch(AssertionError):
    """The served model differs from the merged one; the message names the module and adapter id."""


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from lmdeploy.pytorch.nn.linear.base import LinearBase

    return {n: m for n, m in model.named_modules() if isinstance(m, (LinearBase, torch.nn.Linear))}


def dense_weight(mod: torch.nn.Module) -> torch.Tensor:
    """The (out, in) weight LMDeploy applies, in float64."""
    return mod.weight.detach().to(torch.float64)


def slot_delta(mod: torch.nn.Module, adapter_id: int) -> torch.Tensor:
    """What the plugin's slots on ``mod`` add for ``adapter_id``, as an (out, in) matrix."""
    delta = torch.zeros(mod.weight.shape[0], mod.in_features, dtype=torch.float64)
    for lora in getattr(mod, "lora_adapters", {}).values():
        info = lora.adapter_info
        r = int(info.ranks[adapter_id])
        off = int(info.rank_offsets[adapter_id])
        if r == 0:
            continue
        a = lora.lora_A.detach()[off:off + r].to(torch.float64)
        b = lora.lora_B.detach()[off:off + r].to(torch.float64)  # stored transposed: (r, out)
        delta[info.base_slice] += float(info.scalings[adapter_id]) * (b.T @ a)
    return delta


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise Mismatch(msg)


def check_slot_zero(model: torch.nn.Module) -> int:
    """Adapter id 0 has rank 0 on every slot and the buffers hold nothing beyond the adapters' rows."""
    n = 0
    for name, mod in linear_modules(model).items():
        for key, lora in getattr(mod, "lora_adapters", {}).items():
            info = lora.adapter_info
            _check(int(info.ranks[0]) == 0, f"{name}[{key}] gives 'no adapter' rank {int(info.ranks[0])}")
            _check(lora.lora_A.shape[0] == int(info.ranks.sum()), f"{name}[{key}] has rows no adapter owns")
            _check(torch.count_nonzero(slot_delta(mod, 0)) == 0, f"{name}[{key}] is not zero for 'no adapter'")
            n += 1
    return n


def _row(module: str, kind: str, err: float, allowed: float | None, ok: bool) -> dict:
    return {"module": module, "kind": kind, "max_err": err, "allowed": allowed, "ok": ok}


def compare_adapter(served: torch.nn.Module, base: torch.nn.Module, merged: torch.nn.Module, adapter_id: int,
                    folded: frozenset[str] | set[str] = frozenset(), precision: int | None = None) -> list[dict]:
    """One row per LMDeploy linear: kind, largest error, the allowance at that element, and the verdict.

    ``folded`` names the LMDeploy modules whose delta the plan folded into the base weight (fold mode). ``allowed``
    is 0.0 where the weights must be identical and None for a layer another adapter folded (its
    ``max_err`` is then that fold's size, which this adapter's requests see too).
    """
    served_lin, base_lin, merged_lin = linear_modules(served), linear_modules(base), linear_modules(merged)
    _check(served_lin.keys() == base_lin.keys() == merged_lin.keys(),
           "the served, base and merged models do not have the same linear layers")
    rows = []
    for name, mod in served_lin.items():
        w_base, w_merged = dense_weight(base_lin[name]), dense_weight(merged_lin[name])
        if w_base.numel() == 0:  # this TP rank holds none of the layer (an uneven split)
            rows.append(_row(name, "empty on this rank", 0.0, 0.0, torch.equal(mod.weight, base_lin[name].weight)))
            continue
        ref = w_merged - w_base
        if name in folded:
            kind, got = "folded", dense_weight(mod) - w_base
            if not torch.any(ref):
                # Another adapter's delta, folded for every request: this adapter's requests see it too.
                rows.append(_row(name, "folded by another adapter", float(got.abs().max()), None, True))
                continue
        elif not torch.equal(mod.weight, base_lin[name].weight):
            rows.append(_row(name, "base weight changed", float((dense_weight(mod) - w_base).abs().max()), 0.0, False))
            continue
        else:
            got = slot_delta(mod, adapter_id)
            kind = "lora" if torch.any(got) else "untouched"
        if kind == "untouched":
            err = float(ref.abs().max())
            rows.append(_row(name, kind, err, 0.0, err == 0.0))  # bytes copied: must be identical
            continue
        diff = (got - ref).abs()
        allowed = torch.full_like(diff, ATOL * max(1.0, float(ref.abs().max())))
        if precision is not None:
            allowed += w_merged.abs() * 2.0 ** -precision
        worst = int(torch.argmax(diff / allowed))
        err, bound = float(diff.flatten()[worst]), float(allowed.flatten()[worst])
        rows.append(_row(name, kind, float(diff.max()), bound, err <= bound))
    return rows


_STATS = {"lora": "targeted", "untouched": "untargeted", "folded": "folded", "folded by another adapter":
          "folded_shared", "empty on this rank": "empty"}


def compare(plugin_model: torch.nn.Module, base_model: torch.nn.Module, merged: dict[int, torch.nn.Module],
            folded: frozenset[str] | set[str] = frozenset()) -> dict:
    """Raise :class:`Mismatch` unless every linear matches for every adapter id.

    Returns {'targeted', 'untargeted', 'folded', 'folded_shared', 'empty', 'slots', 'max_err', 'per_module'}:
    counts of (module, adapter) pairs by kind, the slots checked for id 0, the largest error, and the
    largest error per LoRA-carrying module.
    """
    stats = {"targeted": 0, "untargeted": 0, "folded": 0, "folded_shared": 0, "empty": 0, "max_err": 0.0,
             "slots": check_slot_zero(plugin_model), "per_module": {}}
    for adapter_id, merged_model in merged.items():
        for row in compare_adapter(plugin_model, base_model, merged_model, adapter_id, folded):
            _check(row["ok"], f"adapter {adapter_id}: {row['module']} ({row['kind']}) differs by {row['max_err']:.3g}"
                              f" (allowed {row['allowed']})")
            stats[_STATS[row["kind"]]] += 1
            if row["kind"] in ("lora", "folded"):
                stats["max_err"] = max(stats["max_err"], row["max_err"])
            if row["kind"] == "lora":
                stats["per_module"][row["module"]] = max(stats["per_module"].get(row["module"], 0.0), row["max_err"])
    return stats


def load_models(base_dir, merged_dirs: dict[int, object]):
    """LMDeploy's CPU build of the base checkpoint and of each merged one (by adapter id)."""
    from .build import build_lmdeploy_model

    base = build_lmdeploy_model(base_dir)
    merged = {aid: build_lmdeploy_model(d) for aid, d in merged_dirs.items()}
    return base, merged
