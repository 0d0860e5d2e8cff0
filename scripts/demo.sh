#!/usr/bin/env bash
# Run the end-to-end demo exactly as a user would get it: our freshly built wheel installed in
# its own (overlay) venv, so LMDeploy is patched by the .pth start-up hook and nothing else.
# Arguments go to `lmdeploy-regex-lora demo`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/scripts/ensure_venv.sh")"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/lmdeploy-regex-lora-demo.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# The wheel is built (pip wheel --no-deps --no-build-isolation) from a copy of the tree, so the
# repo stays free of build/ and *.egg-info; the same helper builds the overlay the tests use.
WHEEL="$("$VENV/bin/python" "$ROOT/tests/support/venv_overlay.py" build-wheel "$TMP")"
PY="$("$VENV/bin/python" "$ROOT/tests/support/venv_overlay.py" overlay "$TMP" "$WHEEL")"
echo "demo.sh: $(basename "$WHEEL") installed in overlay venv $(dirname "$(dirname "$PY")")" >&2

cd "$TMP"  # not the repo root: the package must come from the wheel, not the source tree
"$PY" -m lmdeploy_regex_lora.cli demo "$@"
