"""Stand-in for ``lmdeploy serve api_server`` (its engine needs CUDA), answering in LMDeploy's response shape.

Usage: python tests/scripts/fake_api_server.py lmdeploy serve api_server MODEL_DIR --adapters NAME=DIR ...
       --server-port PORT [other api_server options, ignored] [--request-log FILE]
(``tests.support.gpu_e2e_standins.api_server_command`` builds it from ``server_command``'s own list).
``/v1/models`` lists the model folder and the adapters; ``/v1/chat/completions`` answers with
``gpu_e2e_standins.generate`` for the model named; with ``--request-log`` every request is appended to FILE.
"""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Run as a file: put the repository root (two folders up) first, for ``tests.support``.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.support.gpu_e2e_standins import generate  # noqa: E402


def parse(argv: list[str]) -> dict:
    """Model folder, adapters, port and request log from ``lmdeploy serve api_server``'s command line."""
    assert argv[:3] == ["lmdeploy", "serve", "api_server"], argv
    i = argv.index("--adapters") + 1
    adapters = {}
    while i < len(argv) and not argv[i].startswith("--"):
        name, _, path = argv[i].partition("=")
        adapters[name] = path
        i += 1
    log = argv[argv.index("--request-log") + 1] if "--request-log" in argv else None
    return {"base": argv[3], "adapters": adapters, "port": int(argv[argv.index("--server-port") + 1]), "log": log}


def main() -> None:
    opts = parse(sys.argv[1:])
    base = opts["base"]
    vocab = json.load(open(os.path.join(base, "config.json")))["vocab_size"]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send({"object": "list", "data": [{"id": m} for m in [base, *opts["adapters"]]]})

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if opts["log"]:
                with open(opts["log"], "a") as f:
                    f.write(json.dumps(req) + "\n")
            key = "base" if req["model"] == base else req["model"]
            toks, lps = generate(key, req["input_ids"], req["max_completion_tokens"], vocab)
            content = [{"token": f"t{t}", "logprob": d[t],
                        "top_logprobs": [{"token": f"t{k}", "logprob": v} for k, v in d.items()]}
                       for t, d in zip(toks, lps, strict=True)]
            self._send({"choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
                                     "finish_reason": "length", "logprobs": {"content": content},
                                     "output_ids": toks}]})

    ThreadingHTTPServer(("127.0.0.1", opts["port"]), Handler).serve_forever()


if __name__ == "__main__":
    main()
