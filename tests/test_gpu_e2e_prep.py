"""Everything of the GPU end-to-end run (``benchmarks/gpu_e2e/``, its prepare and device scripts) a CPU can check.

What cannot run here: LMDeploy's engine (it has no CPU path: ``device_type`` must be cuda/ascend/maca/camb), hence
neither ``pipeline`` generation nor a real ``lmdeploy serve api_server``. The server client is therefore tested
against a stand-in HTTP server (a subprocess answering ``/v1/models`` and ``/v1/chat/completions`` in LMDeploy's
response shape), and the device's Python 3.12 wheels against this Python's installs of the same versions. All
else is real: the model / adapter / merge files (checked against PEFT's own merge), LMDeploy's tokenizer and CPU
model build with the plugin, the stripped LMDeploy wheel installed with pip and imported, and the device script
itself run end to end in ``--dry-run`` mode.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import urllib.request
import zipfile

import pytest
import torch
from packaging.utils import canonicalize_name
from safetensors.torch import load_file

from benchmarks import gpu_e2e_prepare as prep
from benchmarks.gpu_e2e import cli as gpu_cli
from benchmarks.gpu_e2e import compare as gpu_compare
from benchmarks.gpu_e2e import dry_run as gpu_dry_run
from benchmarks.gpu_e2e import engine as gpu_engine
from benchmarks.gpu_e2e import models as gpu_models
from benchmarks.gpu_e2e import report as gpu_report
from benchmarks.gpu_e2e import server as gpu_server
from benchmarks.gpu_e2e import tokenizer as gpu_tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL = gpu_models.Dims(vocab=64, hidden=32, intermediate=48, heads=4, kv_heads=2, layers=2)


# ---------------------------------------------------------------------------------------------------- arguments


def test_parse_args_defaults_and_refusals(capsys):
    args = gpu_cli.parse_args([])
    assert args.models == ["qwen2", "internlm2"] and args.dtype == "float16" and not args.dry_run
    assert gpu_cli.parse_args(["--models", " internlm2 "]).models == ["internlm2"]
    for bad in (["--models", "llama"], ["--top-logprobs", "21"], ["--prompts", "30"], ["--hidden", "258"],
                ["--bench-reps", "0"]):
        with pytest.raises(SystemExit):
            gpu_cli.parse_args(bad)
    assert "unknown ['llama']" in capsys.readouterr().err


def test_tolerance_grows_with_unit_roundoff():
    fp16, bf16 = gpu_compare.TOLERANCE["float16"], gpu_compare.TOLERANCE["bfloat16"]
    assert fp16.allow(0.0) == pytest.approx(0.05) and fp16.allow(-10.0) == pytest.approx(0.1)
    assert bf16.allow(-10.0) == pytest.approx(8 * fp16.allow(-10.0))  # 2**-8 / 2**-11


# ---------------------------------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory):
    return gpu_models.prepare_models(tmp_path_factory.mktemp("gpu_e2e_small"), gpu_models.ARCHS, SMALL, seed=3)


def test_every_adapter_trains_its_regex_targets(small_sets):
    for arch, ms in small_sets.items():
        attn, head = gpu_models.ADAPTERS[arch]
        assert attn.r == 24 and head.r == 8
        head_module = gpu_models.LM_HEAD[arch]
        assert head_module in ms.targets[head.name] and head_module not in ms.targets[attn.name]
        # 2 layers: attention has 4 linears (qwen2) / 2 (internlm2) per layer, the MLP 3 plus the head.
        assert len(ms.targets[attn.name]) == {"qwen2": 8, "internlm2": 4}[arch]
        assert len(ms.targets[head.name]) == 2 * 3 + 1
        cfg = json.loads((ms.adapters[attn.name] / "adapter_config.json").read_text())
        assert cfg["target_modules"] == attn.regex and cfg["r"] == 24


def test_qwen2_folder_loads_strictly_into_transformers(small_sets):
    """transformers' own Qwen2 class takes every tensor at its shape (missing or extra keys would fail)."""
    from transformers import AutoModelForCausalLM

    ms = small_sets["qwen2"]
    model, info = AutoModelForCausalLM.from_pretrained(str(ms.base), dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.hidden_size == SMALL.hidden and model.lm_head.weight.shape == (SMALL.vocab, SMALL.hidden)


def test_base_weights_have_the_scales_the_run_assumes(small_sets):
    """The weights come from the package's tiny-model generator, rescaled (``TINY_STD``): embeddings std 1 with a
    zero padding row, linears 1/sqrt(fan_in), the LM head 2/sqrt(hidden), norms ~1; the special token ids of
    ``generation_config.json`` (the package's) are the tokenizer's."""
    for arch, ms in small_sets.items():
        weights = load_file(str(ms.base / "model.safetensors"))
        for key, t in weights.items():
            leaf = key.rsplit(".", 2)[-2]
            if t.dim() == 1:
                mean = 0.0 if key.endswith(".bias") else 1.0  # std 0.02 either way
                assert abs(t.mean().item() - mean) < 0.02 and t.std().item() < 0.04, key
                continue
            if leaf in ("embed_tokens", "tok_embeddings"):
                assert not t[gpu_tokenizer.PAD].any() and t[gpu_tokenizer.PAD + 1:].std().item() == pytest.approx(
                    1.0, rel=0.1), key
                continue
            want = (2.0 if leaf == gpu_models.LM_HEAD[arch] else 1.0) / t.shape[1] ** 0.5
            assert t.std().item() == pytest.approx(want, rel=0.1), key
        gen_cfg = json.loads((ms.base / "generation_config.json").read_text())
        ids = (gen_cfg["pad_token_id"], gen_cfg["bos_token_id"], gen_cfg["eos_token_id"])
        assert ids == (gpu_tokenizer.PAD, gpu_tokenizer.BOS, gpu_tokenizer.EOS)


def test_merged_checkpoints_equal_peft_merge(small_sets, tmp_path):
    """PEFT reads each swift-style adapter and its ``merge_and_unload`` gives our merged checkpoint."""
    from peft import LoraConfig

    from tests.support.peft_fixtures import merge_adapter_checkpoint

    for arch, ms in small_sets.items():
        for spec in gpu_models.ADAPTERS[arch]:
            cfg = LoraConfig.from_pretrained(str(ms.adapters[spec.name]))
            assert cfg.target_modules == spec.regex and cfg.r == spec.r and cfg.use_rslora == spec.use_rslora
            adapter = ms.adapters[spec.name]
            if arch == "internlm2":
                # PEFT's merge runs on a generic module tree here (InternLM2 is remote code), which PEFT's
                # CAUSAL_LM wrapper refuses; task_type only picks that wrapper, not the merge arithmetic.
                adapter = tmp_path / f"{arch}-{spec.name}-adapter"
                shutil.copytree(ms.adapters[spec.name], adapter)
                cfg_path = adapter / "adapter_config.json"
                cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "task_type": None}))
            ref = load_file(str(merge_adapter_checkpoint(ms.base, adapter, tmp_path / f"{arch}-{spec.name}")
                                / "model.safetensors"))
            ours = load_file(str(ms.merged[spec.name] / "model.safetensors"))
            base = load_file(str(ms.base / "model.safetensors"))
            assert ref.keys() == ours.keys()
            changed = {k for k in ours if not torch.equal(ours[k], base[k])}
            assert changed == {f"{t}.weight" for t in ms.targets[spec.name]}
            for key in ours:
                torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=1e-5, msg=f"{arch} {spec.name} {key}")


def test_tokenizer_names_every_id(small_sets):
    """Through LMDeploy's Tokenizer: ids map to the token strings the server's log-probabilities carry."""
    for ms in small_sets.values():
        info = gpu_dry_run.check_tokenizer(ms)
        assert info["eos"] == gpu_tokenizer.EOS and info["vocab"] == SMALL.vocab
    ids = range(SMALL.vocab)
    assert [gpu_tokenizer.token_id(gpu_tokenizer.token_string(i)) for i in ids] == list(ids)
    with pytest.raises(ValueError):
        gpu_tokenizer.token_id("hello")


def test_prompts_are_ordinary_tokens_of_distinct_lengths():
    prompts = gpu_models.make_prompts(8, 512)
    assert [len(p) for p in prompts] == [5 + 6 * i for i in range(8)]
    assert all(len(gpu_tokenizer.SPECIAL_TOKENS) <= t < 512 for p in prompts for t in p)
    assert prompts == gpu_models.make_prompts(8, 512) and prompts != gpu_models.make_prompts(8, 512, seed=1)


# ---------------------------------------------------------------------------------------------------- comparison


def _seq(tokens, lps):
    return gpu_compare.Seq(list(tokens), [dict(d) for d in lps])


def test_identical_sequences_pass_and_report_the_largest_difference():
    ref = _seq([5, 6], [{5: -0.5, 9: -1.5}, {6: -0.2, 7: -3.0}])
    got = _seq([5, 6], [{5: -0.52, 9: -1.5}, {6: -0.2, 7: -3.01}])
    res = gpu_compare.compare_many([got], [ref])
    assert res["ok"] and res["identical"] == 1 and res["max_lp_diff"] == pytest.approx(0.02)


def test_a_near_tie_is_accepted_a_real_divergence_is_not():
    ref = _seq([5, 6, 8], [{5: -0.5}, {6: -0.70, 7: -0.72}, {8: -0.1}])
    tie = _seq([5, 7, 9], [{5: -0.5}, {7: -0.69, 6: -0.71}, {9: -0.1}])
    res = gpu_compare.compare_many([tie], [ref])
    assert res["ok"] and res["identical"] == 0 and res["near_tie"] == 1
    assert res["diffs"][0]["step"] == 1
    wide = _seq([5, 7, 9], [{5: -0.5}, {7: -0.2, 6: -2.5}, {9: -0.1}])  # served prefers 7 by 2.3
    res = gpu_compare.compare_many([wide], [ref])
    assert not res["ok"] and res["near_tie"] == 0


def test_log_probabilities_out_of_tolerance_fail():
    ref = _seq([5], [{5: -1.0, 6: -2.0}])
    assert not gpu_compare.compare_many([_seq([5], [{5: -1.0, 6: -2.2}])], [ref])["ok"]
    rows_ref = [[{3: -1.0}, {4: -8.0}]]
    assert gpu_compare.compare_rows([[{3: -1.04}, {4: -8.08}]], rows_ref)["ok"]  # 0.04 <= 0.055, 0.08 <= 0.09
    assert not gpu_compare.compare_rows([[{3: -1.04}, {4: -8.2}]], rows_ref)["ok"]
    with pytest.raises(ValueError):
        gpu_compare.compare_rows([[{3: -1.0}]], rows_ref)


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
    rows = gpu_compare.evaluate("qwen2", engines, {"gen": {"a": merged_seq, "base": base_seq}})
    by = {(r["path"], r["adapter"]): r for r in rows}
    assert not by[("pipeline", "a")]["ok"] and by[("pipeline", "base")]["ok"]
    assert by[("pipeline", "a")]["tps"]["ratio"] == pytest.approx(0.9)
    assert by[("api_server", "a")]["ok"] and by[("api_server", "base")]["ok"]
    table = gpu_report.format_table(rows)
    assert "| qwen2 " in table and "0.900" in table and "NO" in table


# ---------------------------------------------------------------------------------------------------- server client

FAKE_SERVER = textwrap.dedent('''
    """Stand-in for ``lmdeploy serve api_server``: answers in LMDeploy's response shape, logs every request."""
    import json, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    port, log = int(sys.argv[1]), sys.argv[2]
    MODELS = ["/m/base", "attn-r24", "mlp-head-r8"]

    def answer(model, ids, n):
        shift = MODELS.index(model)
        toks = [3 + (sum(ids) + 5 * k + shift) % 60 for k in range(n)]
        content = [{"token": f"t{t}", "logprob": -0.25,
                    "top_logprobs": [{"token": f"t{t}", "logprob": -0.25}, {"token": "t2" if t != 2 else "t3",
                                     "logprob": -2.5}]} for t in toks]
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "length",
                             "logprobs": {"content": content}, "output_ids": toks}]}

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send({"object": "list", "data": [{"id": m} for m in MODELS]})

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with open(log, "a") as f:
                f.write(json.dumps(req) + "\\n")
            self._send(answer(req["model"], req["input_ids"], req["max_completion_tokens"]))

    ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
''')


def _expected(model_index: int, ids, n):
    toks = [3 + (sum(ids) + 5 * k + model_index) % 60 for k in range(n)]
    return gpu_compare.Seq(toks, [{t: -0.25, (2 if t != 2 else 3): -2.5} for t in toks])


def test_server_client_against_a_stand_in_server(tmp_path):
    """run_server: start (a stand-in, since LMDeploy's engine needs CUDA), wait for /v1/models, send every
    (model, prompt) request at once, parse tokens and top log-probabilities, stop the process group."""
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    reqlog = tmp_path / "requests.jsonl"
    ms = gpu_models.ModelSet("qwen2", tmp_path / "base", {"attn-r24": tmp_path, "mlp-head-r8": tmp_path}, {}, {})
    args = gpu_cli.parse_args(["--new-tokens", "4", "--top-logprobs", "5", "--server-timeout", "30"])
    prompts = gpu_models.make_prompts(3, 64)
    procs = []

    def command(port):
        procs.append(port)
        return [sys.executable, str(script), str(port), str(reqlog)]

    res = gpu_server.run_server(ms, prompts, args, tmp_path / "server.log", command=command)
    assert res["base_name"] == "/m/base" and set(res["gen"]) == {"base", "attn-r24", "mlp-head-r8"}
    for i, name in enumerate(["base", "attn-r24", "mlp-head-r8"]):
        assert [s.to_dict() for s in res["gen"][name]] == [_expected(i, p, 4).to_dict() for p in prompts]
    sent = [json.loads(line) for line in reqlog.read_text().splitlines()]
    assert len(sent) == 9 and {r["model"] for r in sent} == {"/m/base", "attn-r24", "mlp-head-r8"}
    assert all(r["messages"] == [] and r["logprobs"] and r["top_logprobs"] == 5 and r["top_k"] == 1
               and r["ignore_eos"] and r["return_token_ids"] for r in sent)
    assert sorted(map(tuple, {tuple(r["input_ids"]) for r in sent})) == sorted(map(tuple, prompts))
    with pytest.raises(OSError):  # stopped: nothing listens on its port any more
        urllib.request.urlopen(f"http://127.0.0.1:{procs[0]}/v1/models", timeout=2)


def test_server_that_dies_or_hides_an_adapter_is_reported(tmp_path):
    ms = gpu_models.ModelSet("qwen2", tmp_path / "base", {"attn-r24": tmp_path, "other": tmp_path}, {}, {})
    args = gpu_cli.parse_args(["--server-timeout", "30"])
    with pytest.raises(RuntimeError, match="exited with 7"):
        gpu_server.run_server(ms, [[5]], args, tmp_path / "a.log",
                      command=lambda port: [sys.executable, "-c", "import sys; sys.exit(7)"])
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    with pytest.raises(RuntimeError, match=r"adapters \['other'\] missing"):
        gpu_server.run_server(ms, [[5]], args, tmp_path / "b.log",
                      command=lambda port: [sys.executable, str(script), str(port), str(tmp_path / "r.jsonl")])


def test_http_errors_keep_the_servers_explanation():
    import http.server
    import threading

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = b'{"error": "The model \'nope\' does not exist."}'
            self.send_response(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RuntimeError, match="HTTP 404: .*'nope' does not exist"):
            gpu_server.http_json(f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions", {"model": "nope"})
    finally:
        server.shutdown()


def test_server_command_names_both_adapters_on_loopback(small_sets):
    ms = small_sets["internlm2"]
    cmd = gpu_server.server_command(ms, 4321, gpu_cli.parse_args([]), python="py")
    assert cmd[:5] == ["py", "-m", "lmdeploy", "serve", "api_server"] and cmd[5] == str(ms.base)
    text = " ".join(cmd)
    for piece in ("--backend pytorch", "--server-name 127.0.0.1", "--server-port 4321",
                  "--logprobs-mode raw_logprobs", "--trust-remote-code", "--dtype float16"):
        assert piece in text
    adapters = cmd[cmd.index("--adapters") + 1: cmd.index("--server-name")]
    assert adapters == [f"{n}={p}" for n, p in ms.adapters.items()] and len(adapters) == 2


def test_engine_plan_covers_plugin_merged_and_base(small_sets):
    ms = small_sets["qwen2"]
    plan = gpu_engine.engine_plan(ms, skip_throughput=False)
    assert [p[0] for p in plan] == ["plugin", "merged:attn-r24", "merged:mlp-head-r8", "base"]
    assert plan[0][2] == {n: str(p) for n, p in ms.adapters.items()} and plan[0][3] == [*ms.adapters, None]
    assert all(p[2] is None for p in plan[1:]) and plan[1][1] == ms.merged["attn-r24"]
    assert all(not p[4] for p in gpu_engine.engine_plan(ms, skip_throughput=True))


# ---------------------------------------------------------------------------------------------------- wheels


def test_strip_wheel_drops_binaries_and_keeps_a_valid_record(tmp_path):
    src = tmp_path / "lmdeploy-9.9.9-cp312-cp312-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("lmdeploy/__init__.py", "x = 1\n")
        zf.writestr("lmdeploy/turbomind/turbomind.py", "import _turbomind\n")
        zf.writestr("lmdeploy/turbomind/_turbomind.cpython-312-x86_64-linux-gnu.so", b"\x7fELF" * 100)
        zf.writestr("lmdeploy/turbomind/lib64/libxgrammar.a", b"!<arch>")
        zf.writestr("lmdeploy/turbomind/lib/libstub.so.1", b"\x7fELF")
        zf.writestr("lmdeploy-9.9.9.dist-info/METADATA", "Name: lmdeploy\nVersion: 9.9.9\n")
        zf.writestr("lmdeploy-9.9.9.dist-info/WHEEL", "Root-Is-Purelib: false\nTag: cp312-cp312-x\n")
        zf.writestr("lmdeploy-9.9.9.dist-info/RECORD", "stale\n")
    out, dropped = prep.strip_wheel(src, tmp_path / "out")
    assert out.name == "lmdeploy-9.9.9-py3-none-any.whl"
    assert len(dropped) == 3 and all("turbomind" in d for d in dropped)
    assert prep.check_wheel(out)["files"] == 5
    with zipfile.ZipFile(out) as zf:
        assert "Tag: py3-none-any" in zf.read("lmdeploy-9.9.9.dist-info/WHEEL").decode()
        assert zf.read("lmdeploy/turbomind/turbomind.py") == b"import _turbomind\n"
    tampered = tmp_path / "tampered.whl"
    with zipfile.ZipFile(out) as zin, zipfile.ZipFile(tampered, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, b"x = 2\n" if info.filename == "lmdeploy/__init__.py" else data)
    with pytest.raises(ValueError, match="does not match lmdeploy/__init__.py"):
        prep.check_wheel(tampered)


def test_carried_distributions_are_what_the_image_lacks():
    pins = prep.carry_pins()
    # LMDeploy imports these on the pipeline / engine / api_server path; the image does not have them.
    for name in ("pydantic", "pydantic-core", "fastapi", "uvicorn", "starlette", "pyzmq", "xgrammar",
                 "apache-tvm-ffi", "openai", "mmengine-lite", "shortuuid", "pybase64"):
        assert name in pins, name
    for name in ("torch", "transformers", "triton", "peft", "safetensors", "ray", "tilelang", "lmdeploy",
                 "lmdeploy-regex-lora", "flash-linear-attention", "rdkit"):
        assert name not in pins, name
    assert set(pins) & prep.DEVICE_PACKAGES == {canonicalize_name(n) for n in prep.ALSO_CARRY}
    assert all(pins[n] == md.version(n) for n in pins)


def test_device_run_fits_the_device_tool():
    for call in (prep.DEVICE_RUN, prep.DEVICE_RERUN):
        assert len(call["command"]) <= 2000 and len(call["carry"]) <= 8 and 60 <= call["timeout_s"] <= 600
        extra = call["command"].split("gpu_e2e_device.sh", 1)[1].split()
        args = gpu_cli.parse_args(extra)  # the arguments the script passes on are valid
        assert args.budget + 60 <= call["timeout_s"], "the table must come back before the call's limit"
        ignored = subprocess.run(["git", "check-ignore", "-q", *call["carry"]], cwd=ROOT)
        assert ignored.returncode == 0, "carried paths must be git-ignored (and so never committed)"
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_e2e_device.sh")]).returncode == 0


@pytest.fixture(scope="module")
def pure_wheels(tmp_path_factory):
    """The stripped LMDeploy wheel (from the release installed here: CI does not download 107 MB) and ours."""
    out = tmp_path_factory.mktemp("gpu_e2e_wheels")
    lm, dropped = prep.wheel_from_installed(out)
    assert any(d.endswith(".so") and "_turbomind" in d for d in dropped)
    prep.check_wheel(lm)
    return lm, prep.build_plugin_wheel(out)


def _dist_top_level(dist: md.Distribution) -> set[str]:
    return {pathlib.PurePosixPath(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}


def test_image_packages_and_carried_wheels_suffice_for_lmdeploy(pure_wheels, tmp_path):
    """A folder holding only the stripped LMDeploy and our wheel (installed by pip) plus, by symlink, what the
    device image has (with what those need) and what ``carry_pins`` carries; ``python -S`` sees nothing else.
    The benchmark's LMDeploy imports resolve, TurboMind's binary is absent, and the plugin hooks add_adapters."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile",
                    "--disable-pip-version-check", "--target", str(site), *map(str, pure_wheels)], check=True)
    have = {canonicalize_name(d.metadata["Name"]): d for d in md.distributions()}
    allowed, todo = set(), [n for n in prep.DEVICE_PACKAGES if n in have]
    while todo:  # the image's packages and whatever they need (the image satisfies its own requirements)
        name = todo.pop()
        if name in allowed or name not in have:
            continue
        allowed.add(name)
        todo += [canonicalize_name(r.name) for r in prep._requirements(have[name])]
    allowed |= set(prep.carry_pins())
    allowed -= {"lmdeploy", "lmdeploy-regex-lora"}
    for name in sorted(allowed):
        dist = have[name]
        for top in _dist_top_level(dist):
            src, dst = pathlib.Path(str(dist.locate_file(top))), site / top
            if src.exists() and not dst.exists() and not top.endswith(".pth"):
                dst.symlink_to(src)
    code = textwrap.dedent(f"""
        import site, sys
        site.addsitedir({str(site)!r})
        sys.path.append({str(ROOT)!r})  # for `benchmarks`; after the site dir, so our wheel's package wins
        import importlib.metadata as m, importlib.util
        import lmdeploy
        assert lmdeploy.__file__.startswith({str(site)!r}), lmdeploy.__file__
        assert m.version("lmdeploy") == {md.version("lmdeploy")!r}
        from lmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
        import lmdeploy.pytorch.engine.engine, lmdeploy.pytorch.engine.executor.uni_executor
        import lmdeploy.pytorch.engine.mp_engine.zmq_engine, lmdeploy.pytorch.backends.cuda.op_backend
        import lmdeploy.pytorch.models.qwen2, lmdeploy.pytorch.models.internlm2, lmdeploy.pytorch.kernels.cuda
        import lmdeploy.serve.openai.api_server, lmdeploy.cli.entrypoint, lmdeploy.cli.serve
        import lmdeploy.pytorch.models.patch
        import lmdeploy_regex_lora
        assert lmdeploy_regex_lora.__file__.startswith({str(site)!r})
        assert lmdeploy_regex_lora.is_installed(), "the .pth hook did not wrap add_adapters"
        assert importlib.util.find_spec("lmdeploy.turbomind._turbomind") is None
        import tokenizers, safetensors, benchmarks.gpu_e2e.cli
        print("imports ok")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LMDEPLOY_REGEX_LORA_DISABLE")}
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0 and "imports ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]


def test_device_script_dry_run_on_cpu(pure_wheels, tmp_path):
    """``gpu_e2e_device.sh`` as the device runs it, in a throw-away venv over this one: pip installs the two
    pure wheels (the cp312 ones cannot install on this Python), then ``gpu_e2e --dry-run`` writes both models,
    checks the tokenizer and every LoRA slot of LMDeploy's CPU build with the plugin against the merges."""
    from tests.support.venv_overlay import make_overlay_venv

    python = make_overlay_venv(tmp_path, pure_wheels[1])
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for w in pure_wheels:
        (wheels / w.name).symlink_to(w)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LMDEPLOY_REGEX_LORA_DISABLE")}
    env.update(PYTHON=str(python), GPU_E2E_WHEELS=str(wheels), OUT=str(out))
    small = ["--layers", "2", "--hidden", "64", "--intermediate", "96", "--vocab", "128"]  # CPU time
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_e2e_device.sh"), "--dry-run", *small], env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "plugin import hook registered at start-up: True" in log and "gpu_e2e exit code 0" in log
    report = json.loads((out / "gpu_e2e.json").read_text())
    assert report["machine"]["lmdeploy"] == md.version("lmdeploy")
    for arch in gpu_models.ARCHS:
        stats = report["phases"][f"dry_run:{arch}"]
        # LMDeploy modules with a delta, 2 layers: attn-r24 2 per layer (qkv_proj/wqkv, o_proj/wo); mlp-head-r8
        # 2 per layer (gate_up_proj packs gate+up / w1+w3; down_proj/w2) plus the LM head.
        assert stats["targeted"] == 2 * 2 + 2 * 2 + 1, stats
        assert stats["lm_head_slots"] == [gpu_models.LM_HEAD[arch]] and 32 in stats["kernel_blocks"]
        assert stats["max_err"] < 1e-5
    assert (out / "device.log").read_text().count("plugin on CPU") == 2


def test_prepare_lists_pins(capsys):
    assert prep.main(["--list"]) == 0
    lines = capsys.readouterr().out.split()
    assert lines == [f"{n}=={v}" for n, v in prep.carry_pins().items()]


def test_main_without_cuda_stops_after_writing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = gpu_cli.main(["--models", "internlm2", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"),
                  "--layers", "1", "--hidden", "32", "--intermediate", "48", "--vocab", "64"])
    assert rc == 2 and "no CUDA device" in capsys.readouterr().err
    report = json.loads((tmp_path / "o" / "gpu_e2e.json").read_text())
    assert set(report["phases"]["models"]) == {"internlm2"}
    assert (tmp_path / "w" / "internlm2" / "merged-attn-r24" / "tokenizer.json").is_file()



# ---------------------------------------------------------------------------------------------------- whole run

#: A deterministic stand-in "model": what an engine of ``key`` (``base`` or an adapter name) answers. Shared by the
#: fake pipeline below and the fake api_server, so that a correct plugin (adapter name -> that adapter's merged
#: model) passes and a plugin that ignores adapters fails.
MODEL_FN = textwrap.dedent('''
    SHIFT = {"base": 0, "attn-r24": 11, "mlp-head-r8": 23}

    def generate(key, ids, n, vocab):
        toks = [3 + (sum(ids) + 7 * k + SHIFT[key]) % (vocab - 3) for k in range(n)]
        alt = [3 + (t + 1 - 3) % (vocab - 3) for t in toks]
        return toks, [{t: -0.3, a: -2.0} for t, a in zip(toks, alt)]

    def score(key, ids):
        return [{ids[j + 1]: -1.0 - SHIFT[key] / 23} for j in range(len(ids) - 1)]
''')

FAKE_LMDEPLOY_SERVER = MODEL_FN + textwrap.dedent('''
    import json, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    argv = sys.argv[1:]
    assert argv[:3] == ["lmdeploy", "serve", "api_server"], argv
    base = argv[3]
    port = int(argv[argv.index("--server-port") + 1])
    i = argv.index("--adapters") + 1
    adapters = {}
    while not argv[i].startswith("--"):
        name, _, path = argv[i].partition("=")
        adapters[name] = path
        i += 1
    vocab = json.load(open(base + "/config.json"))["vocab_size"]

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send({"data": [{"id": m} for m in [base, *adapters]]})

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            key = "base" if req["model"] == base else req["model"]
            toks, lps = generate(key, req["input_ids"], req["max_completion_tokens"], vocab)
            content = [{"token": f"t{t}", "logprob": d[t],
                        "top_logprobs": [{"token": f"t{k}", "logprob": v} for k, v in d.items()]}
                       for t, d in zip(toks, lps)]
            self._send({"choices": [{"index": 0, "logprobs": {"content": content}, "output_ids": toks}]})

    ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
''')


class _FakeOut:
    def __init__(self, ids, toks, lps):
        self.ids, self.toks, self.lps = ids, toks, lps

    def to_response(self, index):
        from lmdeploy.messages import Response

        return Response(text="", generate_token_len=len(self.toks), input_token_len=len(self.ids),
                        finish_reason="length", token_ids=list(self.toks), logprobs=self.lps, index=index)


class _FakeEngine:
    def __init__(self, key_for, vocab, fns):
        self.key_for, self.vocab, self.fns = key_for, vocab, fns

    async def preprocess(self, messages, session, gen_config=None, input_ids=None, adapter_name=None):
        assert messages is None and input_ids
        return (self.key_for(adapter_name), list(input_ids), gen_config)

    async def generate(self, request, stream_response=True):
        key, ids, cfg = request
        if cfg.logprob_start_len >= 0:
            assert cfg.max_new_tokens == 0
            yield _FakeOut(ids, [], self.fns["score"](key, ids))
        else:
            toks, lps = self.fns["generate"](key, ids, cfg.max_new_tokens, self.vocab)
            yield _FakeOut(ids, toks, lps if cfg.logprobs else None)


class _FakeSessions:
    def __init__(self):
        self.live = set()

    def get(self):
        self.live.add(len(self.live) + 1000)
        return max(self.live)

    def remove(self, session):
        self.live.discard(session)


class _FakePipeline:
    """Stands in for ``lmdeploy.pipeline`` (its engine needs CUDA): the attributes ``gpu_e2e`` uses, answering
    with ``MODEL_FN``; the merged folder of an adapter answers as that adapter."""

    def __init__(self, model_path, backend_config, fns, ignore_adapters, opened):
        import asyncio
        import threading

        folder = pathlib.Path(model_path).name
        merged = folder[len("merged-"):] if folder.startswith("merged-") else None
        adapters = backend_config.adapters or {}
        assert backend_config.logprobs_mode == "raw_logprobs" and backend_config.dtype == "float16"

        def key_for(name):
            assert name is None or name in adapters, name
            return merged or ("base" if name is None or ignore_adapters else name)

        vocab = json.loads((pathlib.Path(model_path) / "config.json").read_text())["vocab_size"]
        self.async_engine = _FakeEngine(key_for, vocab, fns)
        self.session_mgr = _FakeSessions()
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        self.internal_thread = type("T", (), {"loop": loop})()
        opened.append((model_path, dict(adapters)))
        self.opened = opened

    def close(self):
        self.internal_thread.loop.call_soon_threadsafe(self.internal_thread.loop.stop)
        assert not self.session_mgr.live, "sessions left open"


@pytest.mark.parametrize("ignore_adapters", [False, True], ids=["plugin-applies-adapters", "plugin-ignores-them"])
def test_whole_run_with_stand_ins_for_the_gpu_parts(ignore_adapters, tmp_path, monkeypatch, capsys,
                                                    plugin_installed):
    """``main`` end to end with LMDeploy's engine and server replaced (they need CUDA): every engine of the plan
    is opened, mixed requests and scoring go through ``_collect``, throughput is timed, the server is started with
    ``server_command``'s own arguments, and the verdict follows the stand-ins: PASS when each adapter answers as
    its merged model, FAIL (exit 1) when the adapters are ignored."""
    import lmdeploy

    fns: dict = {}
    exec(MODEL_FN, fns)  # noqa: S102  (our own fixed source, shared with the fake server)
    opened: list = []
    monkeypatch.setattr(lmdeploy, "pipeline",
                        lambda path, backend_config, **kw: _FakePipeline(path, backend_config, fns, ignore_adapters,
                                                                         opened))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    script = tmp_path / "fake_lmdeploy_server.py"
    script.write_text(FAKE_LMDEPLOY_SERVER)
    real_command = gpu_server.server_command
    monkeypatch.setattr(gpu_server, "server_command", lambda ms, port, args: [sys.executable, str(script),
                                                                      *real_command(ms, port, args)[2:]])
    out = tmp_path / "out"
    rc = gpu_cli.main(["--work", str(tmp_path / "w"), "--out", str(out), "--vocab", "64", "--hidden", "32",
                  "--intermediate", "48", "--layers", "1", "--prompts", "3", "--new-tokens", "5",
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
        assert bad == {(a, "pipeline", n) for a in gpu_models.ARCHS for n in ("attn-r24", "mlp-head-r8")}
    else:
        assert rc == 0 and "RESULT: PASS" in text, text[-3000:]
        assert all(r["ok"] for r in rows) and all(r["gen"]["identical"] == 3 for r in rows)
        assert all(r["discriminative"] for r in rows if "effect" in r)
    assert report["table"] in text


def test_a_spent_budget_skips_later_phases_and_still_reports(tmp_path, monkeypatch, capsys, plugin_installed):
    import lmdeploy

    opened: list = []
    fns: dict = {}
    exec(MODEL_FN, fns)  # noqa: S102
    monkeypatch.setattr(lmdeploy, "pipeline",
                        lambda path, backend_config, **kw: _FakePipeline(path, backend_config, fns, False, opened))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rc = gpu_cli.main(["--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"), "--vocab", "64", "--hidden", "32",
                  "--intermediate", "48", "--layers", "1", "--budget", "0"])
    assert rc == 1 and not opened and "RESULT: FAIL" in capsys.readouterr().out
    report = json.loads((tmp_path / "o" / "gpu_e2e.json").read_text())
    assert [e["arch"] for e in report["errors"]] == list(gpu_models.ARCHS)
    assert all("--budget spent before pipeline plugin" in e["error"] for e in report["errors"])
