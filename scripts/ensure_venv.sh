#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install scripts/requirements-dev.txt into it.
# pip runs only when the requirements file changed since the last successful install (a stamp in
# the venv holds its hash), so repeated calls cost ~0.1 s. Prints the venv path on stdout; all
# other output goes to stderr so callers can do VENV="$(scripts/ensure_venv.sh)".
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LMDEPLOY_REGEX_LORA_VENV:-$HOME/.cache/lmdeploy-regex-lora/venv}"
REQ="$ROOT/scripts/requirements-dev.txt"
STAMP="$VENV/.requirements-dev.sha256"

pick_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.11 python3 python; do
        if [[ -n "$candidate" ]] && command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "ensure_venv: need Python >= 3.10 (set PYTHON=...)" >&2
    return 1
}

ensure() {
    if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        # Only ever clear an empty directory or a (broken) venv, never some other folder.
        if [[ -e "$VENV" && ! -f "$VENV/pyvenv.cfg" && -n "$(ls -A "$VENV" 2>/dev/null)" ]]; then
            echo "ensure_venv: $VENV exists and is not a virtualenv; refusing to touch it" >&2
            return 1
        fi
        local py
        py="$(pick_python)"
        echo "ensure_venv: creating $VENV with $py" >&2
        "$py" -m venv --clear "$VENV"
    fi
    local want have=""
    want="$(sha256sum "$REQ" | cut -d' ' -f1)"
    [[ -f "$STAMP" ]] && have="$(cat "$STAMP")"
    if [[ "$want" != "$have" ]]; then
        echo "ensure_venv: installing $REQ into $VENV (first run downloads torch, several GB)" >&2
        "$VENV/bin/python" -m pip install -r "$REQ" >&2
        echo "$want" >"$STAMP"
    fi
}

mkdir -p "$(dirname "$VENV")"
if command -v flock >/dev/null 2>&1; then
    # Two scripts started together must not run pip into the same venv at once.
    exec 9>"$VENV.lock"
    flock 9
fi
ensure
echo "$VENV"
