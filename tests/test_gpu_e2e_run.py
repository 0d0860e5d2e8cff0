"""benchmarks/gpu_e2e/cli.py: the options and ``main`` end to end, with stand-ins for the parts that need CUDA.

LMDeploy's ``pipeline`` and api_server are replaced by ``tests.support.gpu_e2e_standins`` (one deterministic
"model" answers for both); everything else of ``main`` runs: the files are written, every engine of the plan is
opened, the server is started with ``server_command``'s own arguments, and the verdict is written and printed.
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from benchmarks.gpu_e2e.cli import main, parse_args
from benchmarks.gpu_e2e.engine import engine_plan
from benchmarks.gpu_e2e.models import ARCHS
from tests.support.gpu_e2e_standins import model_set, use_standins

#: Models small enough for a CPU test (the layout is the real one; only the sizes shrink).
TINY = ["--vocab", "64", "--hidden", "32", "--intermediate", "48", "--layers", "1"]


def test_parse_args_defaults_and_refusals(capsys):
    args = parse_args([])
    assert args.models == ["qwen2", "internlm2"] and args.dtype == "float16" and not args.dry_run
    assert parse_args(["--models", " internlm2 "]).models == ["internlm2"]
    for bad in (["--models", "llama"], ["--top-logprobs", "21"], ["--prompts", "30"], ["--hidden", "258"],
                ["--bench-reps", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    assert "unknown ['llama']" in capsys.readouterr().err


def test_engine_plan_covers_plugin_merged_and_base(tmp_path):
    ms = model_set(tmp_path)
    plan = engine_plan(ms, skip_throughput=False)
    assert [p[0] for p in plan] == ["plugin", "merged:attn-r24", "merged:mlp-head-r8", "base"]
    assert plan[0][2] == {n: str(p) for n, p in ms.adapters.items()} and plan[0][3] == [*ms.adapters, None]
    assert all(p[2] is None for p in plan[1:]) and plan[1][1] == ms.merged["attn-r24"]
    assert all(not p[4] for p in engine_plan(ms, skip_throughput=True))


def test_main_without_cuda_stops_after_writing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = main(["--models", "internlm2", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"), *TINY])
    assert rc == 2 and "no CUDA device" in capsys.readouterr().err
    report = json.loads((tmp_path / "o" / "gpu_e2e.json").read_text())
    assert set(report["phases"]["models"]) == {"internlm2"}
    assert (tmp_path / "w" / "internlm2" / "merged-attn-r24" / "tokenizer.json").is_file()


@pytest.mark.parametrize("ignore_adapters", [False, True], ids=["plugin-applies-adapters", "plugin-ignores-them"])
def test_whole_run_with_stand_ins_for_the_gpu_parts(ignore_adapters, tmp_path, monkeypatch, capsys,
                                                    plugin_installed):
    """``main`` end to end with LMDeploy's engine and server replaced (they need CUDA): every engine of the plan
    is opened, mixed requests and scoring go through ``_collect``, throughput is timed, the server is started with
    ``server_command``'s own arguments, and the verdict follows the stand-ins: PASS when each adapter answers as
    its merged model, FAIL (exit 1) when the adapters are ignored."""
    opened = use_standins(monkeypatch, ignore_adapters)
    out = tmp_path / "out"
    rc = main(["--work", str(tmp_path / "w"), "--out", str(out), *TINY, "--prompts", "3", "--new-tokens", "5",
               "--bench-prompts", "4", "--bench-new-tokens", "3", "--bench-reps", "2", "--server-timeout", "30"])
    text = capsys.readouterr().out
    report = json.loads((out / "gpu_e2e.json").read_text())
    assert not report["errors"], report["errors"]
    assert [pathlib.Path(p).name for p, _ in opened] == ["base", "merged-attn-r24", "merged-mlp-head-r8", "base"] * 2
    assert [sorted(a) for _, a in opened[::4]] == [["attn-r24", "mlp-head-r8"]] * 2
    rows = report["rows"]
    assert len(rows) == 2 * (3 + 3)  # per model: pipeline a, b, base; api_server a, b, base
    assert all(r["gen"]["n"] == 3 for r in rows)
    assert (out / "server-qwen2.log").exists() and (out / "server-internlm2.log").exists()
    tps = [r["tps"] for r in rows if r["path"] == "pipeline" and r["adapter"] != "base"]
    assert len(tps) == 4 and all(t["served"] > 0 and t["merged"] > 0 for t in tps)
    if ignore_adapters:
        assert rc == 1 and "RESULT: FAIL" in text
        bad = {(r["arch"], r["path"], r["adapter"]) for r in rows if not r["ok"]}
        assert bad == {(a, "pipeline", n) for a in ARCHS for n in ("attn-r24", "mlp-head-r8")}
    else:
        assert rc == 0 and "RESULT: PASS" in text, text[-3000:]
        assert all(r["ok"] for r in rows) and all(r["gen"]["identical"] == 3 for r in rows)
        assert all(r["discriminative"] for r in rows if "effect" in r)
    assert report["table"] in text


def test_a_spent_budget_skips_later_phases_and_still_reports(tmp_path, monkeypatch, capsys, plugin_installed):
    opened = use_standins(monkeypatch)
    rc = main(["--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"), *TINY, "--budget", "0"])
    assert rc == 1 and not opened and "RESULT: FAIL" in capsys.readouterr().out
    report = json.loads((tmp_path / "o" / "gpu_e2e.json").read_text())
    assert [e["arch"] for e in report["errors"]] == list(ARCHS)
    assert all("--budget spent before pipeline plugin" in e["error"] for e in report["errors"])
