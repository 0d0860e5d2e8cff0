"""Served against reference: the tolerance, generated sequences and prompt log-probabilities compared, and the
report's rows (``evaluate``) with each adapter's effect, so that an adapter silently left out cannot pass."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Tol:
    """A log-probability passes when ``|served - reference| <= atol + rtol * |reference|``."""

    atol: float
    rtol: float

    def allow(self, ref: float) -> float:
        return self.atol + self.rtol * abs(ref)


#: float16 (u = 2**-11) as argued in the module docstring; bfloat16 has 8 times its unit roundoff (u = 2**-8).
TOLERANCE = {"float16": Tol(0.05, 0.005), "bfloat16": Tol(0.4, 0.04)}
FP16 = TOLERANCE["float16"]
#: An adapter's largest effect on a log-probability must exceed this many times the largest served-vs-merged error.
EFFECT_FACTOR = 10.0


@dataclasses.dataclass
class Seq:
    """One generated sequence: its tokens and, per step, the top-k log-probabilities (token id -> logprob)."""

    tokens: list[int]
    logprobs: list[dict[int, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "logprobs": [{str(k): v for k, v in d.items()} for d in self.logprobs]}


def _common_diff(a: dict[int, float], b: dict[int, float]) -> float:
    """Largest |a[t] - b[t]| over the tokens both top-k dicts hold (0.0 when none)."""
    common = a.keys() & b.keys()
    return max((abs(a[t] - b[t]) for t in common), default=0.0)


def _excess(a: dict[int, float], b: dict[int, float], tol: Tol) -> float:
    """Largest |a[t] - b[t]| minus its allowance over the common tokens (> 0: out of tolerance)."""
    common = a.keys() & b.keys()
    return max((abs(a[t] - b[t]) - tol.allow(b[t]) for t in common), default=-tol.atol)


def compare_seq(got: Seq, ref: Seq, tol: Tol = FP16) -> dict[str, Any]:
    """Compare one served sequence with its reference.

    Returns ``identical`` (tokens equal), ``near_tie`` (tokens differ first at a step where both runs saw the two
    tokens within twice the tolerance of each other), ``max_lp_diff`` over the common prefix (and the first
    differing step), ``lp_ok`` and ``first_diff`` (step index or None).
    """
    n = min(len(got.tokens), len(ref.tokens))
    first = next((i for i in range(n) if got.tokens[i] != ref.tokens[i]), None)
    if first is None and len(got.tokens) != len(ref.tokens):
        first = n
    steps = range((first + 1) if first is not None else n)
    steps = [i for i in steps if i < len(got.logprobs) and i < len(ref.logprobs)]
    max_diff = max((_common_diff(got.logprobs[i], ref.logprobs[i]) for i in steps), default=0.0)
    lp_ok = all(_excess(got.logprobs[i], ref.logprobs[i], tol) <= 0 for i in steps)
    near_tie = False
    detail = None
    if first is not None and first < n:
        g, r = got.tokens[first], ref.tokens[first]
        glp, rlp = got.logprobs[first] if first < len(got.logprobs) else {}, ref.logprobs[first] if first < len(
            ref.logprobs) else {}
        margin_ref = rlp[r] - rlp[g] if g in rlp and r in rlp else math.inf
        margin_got = glp[g] - glp[r] if g in glp and r in glp else math.inf
        near_tie = max(margin_ref, margin_got) <= 2 * tol.allow(rlp.get(r, 0.0))
        detail = {"step": first, "served": g, "reference": r, "margin_reference": margin_ref,
                  "margin_served": margin_got}
    return {"identical": first is None, "near_tie": near_tie, "first_diff": detail, "max_lp_diff": max_diff,
            "lp_ok": lp_ok}


def compare_many(got: Sequence[Seq], ref: Sequence[Seq], tol: Tol = FP16) -> dict[str, Any]:
    """Aggregate :func:`compare_seq` over prompts; ``ok`` when every sequence is identical or a near tie and
    every compared log-probability is within tolerance."""
    if len(got) != len(ref):
        raise ValueError(f"{len(got)} served sequences against {len(ref)} references")
    per = [compare_seq(g, r, tol) for g, r in zip(got, ref, strict=True)]
    identical = sum(p["identical"] for p in per)
    near = sum((not p["identical"]) and p["near_tie"] for p in per)
    ok = all((p["identical"] or p["near_tie"]) and p["lp_ok"] for p in per)
    return {"n": len(per), "identical": identical, "near_tie": near, "ok": ok,
            "max_lp_diff": max((p["max_lp_diff"] for p in per), default=0.0),
            "diffs": [p["first_diff"] for p in per if p["first_diff"] is not None]}


def compare_rows(got: Sequence[Sequence[dict[int, float]]], ref: Sequence[Sequence[dict[int, float]]],
                 tol: Tol = FP16) -> dict[str, Any]:
    """Teacher-forced prompt log-probabilities (one dict per scored position): largest difference, tolerance."""
    max_diff, ok, rows = 0.0, True, 0
    for g_rows, r_rows in zip(got, ref, strict=True):
        if len(g_rows) != len(r_rows):
            raise ValueError(f"{len(g_rows)} scored positions against {len(r_rows)}")
        for g, r in zip(g_rows, r_rows, strict=True):
            max_diff = max(max_diff, _common_diff(g, r))
            ok = ok and _excess(g, r, tol) <= 0
            rows += 1
    return {"rows": rows, "max_lp_diff": max_diff, "ok": ok}


def effect(a: Sequence[Sequence[dict[int, float]]], b: Sequence[Sequence[dict[int, float]]]) -> float:
    """Largest |a - b| over common tokens of teacher-forced rows: how much an adapter moves the model."""
    return max((_common_diff(x, y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True)),
               default=0.0)


def evaluate(arch: str, engines: dict[str, dict[str, Any]], server: dict[str, Any] | None,
             tol: Tol = FP16) -> list[dict[str, Any]]:
    """Rows of the report for one architecture: the plugin engine's adapters and base against the merged and
    base engines (pipeline), then the api_server's answers against the same references."""
    rows = []
    plugin = engines["plugin"]
    refs = {name: engines[f"merged:{name}"] for name in plugin["gen"] if name != "base"}
    refs["base"] = engines["base"]
    for name, ref in refs.items():
        gen = compare_many(plugin["gen"][name], ref["gen"]["base"], tol)
        score = compare_rows(plugin["score"][name], ref["score"]["base"], tol)
        row: dict[str, Any] = {"arch": arch, "path": "pipeline", "adapter": name, "gen": gen, "score": score}
        if name != "base":
            row["effect"] = effect(ref["score"]["base"], engines["base"]["score"]["base"])
            error = max(gen["max_lp_diff"], score["max_lp_diff"])
            row["discriminative"] = row["effect"] > EFFECT_FACTOR * max(error, tol.atol / EFFECT_FACTOR)
        served_tps = plugin["tps"].get(name, {}).get("tokens_per_s")
        merged_tps = ref["tps"].get("base", {}).get("tokens_per_s")
        if served_tps and merged_tps:
            row["tps"] = {"served": served_tps, "merged": merged_tps, "ratio": served_tps / merged_tps}
        row["ok"] = gen["ok"] and score["ok"] and row.get("discriminative", True)
        rows.append(row)
    if server is not None:
        for name, seqs in server["gen"].items():
            gen = compare_many(seqs, refs[name]["gen"]["base"], tol)
            rows.append({"arch": arch, "path": "api_server", "adapter": name, "gen": gen, "ok": gen["ok"]})
    return rows
