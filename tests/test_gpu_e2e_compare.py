"""benchmarks/gpu_e2e: the tolerance, the comparison of served against reference results, and the table."""

from __future__ import annotations

import pytest

from benchmarks.gpu_e2e.compare import TOLERANCE, Seq, compare_many, compare_rows, evaluate
from benchmarks.gpu_e2e.report import format_table


def test_tolerance_grows_with_unit_roundoff():
    fp16, bf16 = TOLERANCE["float16"], TOLERANCE["bfloat16"]
    assert fp16.allow(0.0) == pytest.approx(0.05) and fp16.allow(-10.0) == pytest.approx(0.1)
    assert bf16.allow(-10.0) == pytest.approx(8 * fp16.allow(-10.0))  # 2**-8 / 2**-11


def _seq(tokens, lps):
    return Seq(list(tokens), [dict(d) for d in lps])


def test_identical_sequences_pass_and_report_the_largest_difference():
    ref = _seq([5, 6], [{5: -0.5, 9: -1.5}, {6: -0.2, 7: -3.0}])
    got = _seq([5, 6], [{5: -0.52, 9: -1.5}, {6: -0.2, 7: -3.01}])
    res = compare_many([got], [ref])
    assert res["ok"] and res["identical"] == 1 and res["max_lp_diff"] == pytest.approx(0.02)


def test_a_near_tie_is_accepted_a_real_divergence_is_not():
    ref = _seq([5, 6, 8], [{5: -0.5}, {6: -0.70, 7: -0.72}, {8: -0.1}])
    tie = _seq([5, 7, 9], [{5: -0.5}, {7: -0.69, 6: -0.71}, {9: -0.1}])
    res = compare_many([tie], [ref])
    assert res["ok"] and res["identical"] == 0 and res["near_tie"] == 1
    assert res["diffs"][0]["step"] == 1
    wide = _seq([5, 7, 9], [{5: -0.5}, {7: -0.2, 6: -2.5}, {9: -0.1}])  # served prefers 7 by 2.3
    res = compare_many([wide], [ref])
    assert not res["ok"] and res["near_tie"] == 0


def test_log_probabilities_out_of_tolerance_fail():
    ref = _seq([5], [{5: -1.0, 6: -2.0}])
    assert not compare_many([_seq([5], [{5: -1.0, 6: -2.2}])], [ref])["ok"]
    rows_ref = [[{3: -1.0}, {4: -8.0}]]
    assert compare_rows([[{3: -1.04}, {4: -8.08}]], rows_ref)["ok"]  # 0.04 <= 0.055, 0.08 <= 0.09
    assert not compare_rows([[{3: -1.04}, {4: -8.2}]], rows_ref)["ok"]
    with pytest.raises(ValueError):
        compare_rows([[{3: -1.0}]], rows_ref)


def _engine(gen, score, tps=None):
    return {"gen": gen, "score": score, "tps": tps or {}}


def test_evaluate_rows_flag_an_adapter_the_plugin_did_not_apply():
    """Served == base while merged differs: tokens and log-probabilities mismatch, the row fails."""
    base_seq = [_seq([5, 6], [{5: -0.1, 7: -3.0}, {6: -0.1, 7: -3.0}])]
    merged_seq = [_seq([7, 7], [{7: -0.1, 5: -3.0}, {7: -0.1, 6: -3.0}])]
    base_rows, merged_rows = [[{3: -1.0}]], [[{3: -4.0}]]
    engines = {
        "plugin": _engine({"a": base_seq, "base": base_seq}, {"a": base_rows, "base": base_rows},
                          {"a": {"tokens_per_s": 90.0}}),
        "merged:a": _engine({"base": merged_seq}, {"base": merged_rows}, {"base": {"tokens_per_s": 100.0}}),
        "base": _engine({"base": base_seq}, {"base": base_rows}),
    }
    rows = evaluate("qwen2", engines, {"gen": {"a": merged_seq, "base": base_seq}})
    by = {(r["path"], r["adapter"]): r for r in rows}
    assert not by[("pipeline", "a")]["ok"] and by[("pipeline", "base")]["ok"]
    assert by[("pipeline", "a")]["tps"]["ratio"] == pytest.approx(0.9)
    assert by[("api_server", "a")]["ok"] and by[("api_server", "base")]["ok"]
    table = format_table(rows)
    assert "| qwen2 " in table and "0.900" in table and "NO" in table
