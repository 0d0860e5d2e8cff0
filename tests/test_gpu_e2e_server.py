"""benchmarks/gpu_e2e/server.py: the api_server's command line and HTTP client, against a stand-in server.

LMDeploy's engine has no CPU path, so ``lmdeploy serve api_server`` cannot start here; the client is run against
``tests/scripts/fake_api_server.py``, which takes the real command line and answers in LMDeploy's response shape.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import sys
import threading
import urllib.request

import pytest

from benchmarks.gpu_e2e.cli import parse_args
from benchmarks.gpu_e2e.compare import Seq
from benchmarks.gpu_e2e.models import make_prompts
from benchmarks.gpu_e2e.server import http_json, run_server, server_command
from tests.support.gpu_e2e_standins import api_server_command, generate, model_set


def test_server_client_against_a_stand_in_server(tmp_path):
    """run_server: start (a stand-in, since LMDeploy's engine needs CUDA), wait for /v1/models, send every
    (model, prompt) request at once, parse tokens and top log-probabilities, stop the process group."""
    reqlog = tmp_path / "requests.jsonl"
    ms = model_set(tmp_path, vocab=64)
    args = parse_args(["--new-tokens", "4", "--top-logprobs", "5", "--server-timeout", "30"])
    prompts = make_prompts(3, 64)
    ports = []

    def command(port):
        ports.append(port)
        return api_server_command(server_command(ms, port, args), "--request-log", str(reqlog))

    res = run_server(ms, prompts, args, tmp_path / "server.log", command=command)
    assert res["base_name"] == str(ms.base) and set(res["gen"]) == {"base", "attn-r24", "mlp-head-r8"}
    for name in ("base", "attn-r24", "mlp-head-r8"):
        assert [s.to_dict() for s in res["gen"][name]] == [Seq(*generate(name, p, 4, 64)).to_dict() for p in prompts]
    sent = [json.loads(line) for line in reqlog.read_text().splitlines()]
    assert len(sent) == 9 and {r["model"] for r in sent} == {str(ms.base), "attn-r24", "mlp-head-r8"}
    assert all(r["messages"] == [] and r["logprobs"] and r["top_logprobs"] == 5 and r["top_k"] == 1
               and r["ignore_eos"] and r["return_token_ids"] for r in sent)
    assert sorted(map(tuple, {tuple(r["input_ids"]) for r in sent})) == sorted(map(tuple, prompts))
    with pytest.raises(OSError):  # stopped: nothing listens on its port any more
        urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v1/models", timeout=2)


def test_server_that_dies_or_hides_an_adapter_is_reported(tmp_path):
    ms = model_set(tmp_path, adapters=("attn-r24", "other"))
    args = parse_args(["--server-timeout", "30"])
    with pytest.raises(RuntimeError, match="exited with 7"):
        run_server(ms, [[5]], args, tmp_path / "a.log",
                   command=lambda port: [sys.executable, "-c", "import sys; sys.exit(7)"])
    served = dataclasses.replace(ms, adapters={"attn-r24": ms.adapters["attn-r24"]})  # the server lacks "other"
    with pytest.raises(RuntimeError, match=r"adapters \['other'\] missing"):
        run_server(ms, [[5]], args, tmp_path / "b.log",
                   command=lambda port: api_server_command(server_command(served, port, args)))


def test_http_errors_keep_the_servers_explanation():
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
            http_json(f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions", {"model": "nope"})
    finally:
        server.shutdown()


def test_server_command_names_both_adapters_on_loopback(tmp_path):
    ms = model_set(tmp_path, arch="internlm2")
    cmd = server_command(ms, 4321, parse_args([]), python="py")
    assert cmd[:5] == ["py", "-m", "lmdeploy", "serve", "api_server"] and cmd[5] == str(ms.base)
    text = " ".join(cmd)
    for piece in ("--backend pytorch", "--server-name 127.0.0.1", "--server-port 4321",
                  "--logprobs-mode raw_logprobs", "--trust-remote-code", "--dtype float16"):
        assert piece in text
    adapters = cmd[cmd.index("--adapters") + 1: cmd.index("--server-name")]
    assert adapters == [f"{n}={p}" for n, p in ms.adapters.items()] and len(adapters) == 2
