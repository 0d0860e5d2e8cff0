"""Checking served LoRA against merged weights, module by module, as LMDeploy itself loads them.

For every LoRA-carrying LMDeploy linear and every adapter id, the delta the plugin's slots add
(``scaling * B @ A`` placed at the slot's output rows) must equal ``W_merged - W_base`` as LMDeploy
itself loads the two checkpoints. Modules without slots must have ``W_merged == W_base`` exactly.
"""

from __future__ import annotations

import torch

from .tiny_models import build_lmdeploy_model

# float32 rounding: PEFT merges W + s*(B@A) in float32; we rebuild s*(B@A) in float64.
ATOL = 2e-6


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from lmdeploy.pytorch.nn.linear.base import LinearBase

    return {n: m for n, m in model.named_modules() if isinstance(m, (LinearBase, torch.nn.Linear))}


def dense_weight(mod: torch.nn.Module) -> torch.Tensor:
    """The (out, in) weight LMDeploy applies, in float64."""
    return mod.weight.detach().to(torch.float64)


def slot_delta(mod: torch.nn.Module, adapter_id: int) -> torch.Tensor:
    """What the plugin's slots on ``mod`` add for ``adapter_id``, as an (out, in) matrix."""
    out_features = mod.weight.shape[0]
    delta = torch.zeros(out_features, mod.in_features, dtype=torch.float64)
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


class Mismatch(AssertionError):
    """The served model differs from the merged one; the message names the module and adapter id."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise Mismatch(msg)


def _close(got: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float, float]:
    err = float((got - ref).abs().max())
    scale = float(ref.abs().max())
    return err <= ATOL * max(1.0, scale), err, scale


def compare(plugin_model: torch.nn.Module, base_model: torch.nn.Module, merged: dict[int, torch.nn.Module],
            folded: set[str] | frozenset[str] = frozenset()) -> dict:
    """Raise :class:`Mismatch` unless every linear matches for every adapter id.

    ``folded`` names LMDeploy modules whose delta the plan folded into the base weight (vision tower,
    projector): there the served weight must equal the folding adapter's merged weight, and for an
    adapter without a delta there it is allowed to differ by exactly that fold (counted in
    ``folded_shared``: the documented cost of folding).
    Returns {'targeted', 'untargeted', 'folded', 'folded_shared', 'slots', 'max_err', 'per_module'}.
    """
    plugin_lin = linear_modules(plugin_model)
    base_lin = linear_modules(base_model)
    _check(plugin_lin.keys() == base_lin.keys(), "the served and base models have different linear layers")
    stats = {"targeted": 0, "untargeted": 0, "folded": 0, "folded_shared": 0, "max_err": 0.0,
             "slots": check_slot_zero(plugin_model), "per_module": {}}
    for adapter_id, merged_model in merged.items():
        merged_lin = linear_modules(merged_model)
        for name, mod in plugin_lin.items():
            if name in folded:
                ok, err, scale = _close(dense_weight(mod), dense_weight(merged_lin[name]))
                if ok:
                    stats["folded"] += 1
                    stats["max_err"] = max(stats["max_err"], err)
                else:
                    _check(torch.equal(merged_lin[name].weight, base_lin[name].weight),
                           f"adapter {adapter_id}: folded {name} differs by {err:.3g} from its merged weight")
                    stats["folded_shared"] += 1
                continue
            ref = dense_weight(merged_lin[name]) - dense_weight(base_lin[name])
            # The plugin must leave base weights untouched.
            _check(torch.equal(mod.weight, base_lin[name].weight), f"{name}: base weight changed")
            got = slot_delta(mod, adapter_id)
            if torch.count_nonzero(got) == 0:
                _check(torch.count_nonzero(ref) == 0, f"adapter {adapter_id}: {name} has no LoRA but merged differs")
                stats["untargeted"] += 1
                continue
            ok, err, scale = _close(got, ref)
            _check(ok, f"adapter {adapter_id}: {name} differs by {err:.3g} (largest delta {scale:.3g})")
            stats["targeted"] += 1
            stats["per_module"][name] = max(stats["per_module"].get(name, 0.0), err)
            stats["max_err"] = max(stats["max_err"], err)
    return stats


def load_models(base_dir, merged_dirs: dict[int, object]):
    base = build_lmdeploy_model(base_dir)
    merged = {aid: build_lmdeploy_model(d) for aid, d in merged_dirs.items()}
    return base, merged
