#!/usr/bin/env bash
# Lint and run the whole test suite in the project venv. Extra arguments go to pytest.
# A skipped test is a failure here: skips would hide a broken environment as a green run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$(bash "$ROOT/scripts/ensure_venv.sh")"

"$VENV/bin/ruff" check .

REPORT="$(mktemp -d)/junit.xml"
trap 'rm -rf "$(dirname "$REPORT")"' EXIT
"$VENV/bin/python" -m pytest --junitxml="$REPORT" "$@"

"$VENV/bin/python" - "$REPORT" <<'PY'
"""Fail when pytest skipped anything (collected nothing counts as well)."""
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
tests = sum(int(s.get("tests", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
if skipped or not tests:
    print(f"test.sh: {skipped} skipped of {tests} collected; skips are not passes", file=sys.stderr)
    sys.exit(1)
PY
