#!/usr/bin/env bash
# Runs python -m benchmarks.gpu_e2e (benchmarks/gpu_e2e/) on the GPU machine (the device tool), from the repo root.
#
# Needs .gpu_e2e/wheels from `python -m benchmarks.gpu_e2e_prepare` (run here first), carried with the call:
#   run(command="bash benchmarks/gpu_e2e_device.sh", carry=[".gpu_e2e"], timeout_s=540)
# Extra arguments go to benchmarks.gpu_e2e (e.g. --models qwen2 --skip-throughput for a short rerun).
#
# The wheels are installed into the machine's python3 environment itself (the machine is thrown away after the
# lease): the plugin's .pth start-up hook only runs from a site directory, and the api_server's engine runs in a
# spawned process, which must get the hook too. Were that environment read-only, they go to /tmp/site instead,
# with a sitecustomize.py that makes /tmp/site a site directory in every process that inherits PYTHONPATH.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/gpu_e2e_out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/device.log") 2>&1
PY="${PYTHON:-python3}"
WHEELS="${GPU_E2E_WHEELS:-.gpu_e2e/wheels}"  # overridable for the CPU test of this script
if ! ls "$WHEELS"/lmdeploy-*.whl >/dev/null 2>&1; then
    echo "no $WHEELS/lmdeploy-*.whl: run 'python -m benchmarks.gpu_e2e_prepare' before the call and carry .gpu_e2e"
    exit 3
fi
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader || true
"$PY" --version
PIP=(-m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check)
if ! "$PY" "${PIP[@]}" "$WHEELS"/*.whl; then
    echo "installing into $("$PY" -c 'import sys; print(sys.prefix)') failed; using /tmp/site + sitecustomize.py"
    "$PY" "${PIP[@]}" --target /tmp/site "$WHEELS"/*.whl || exit 4
    echo "import site; site.addsitedir('/tmp/site')" > /tmp/site/sitecustomize.py
    export PYTHONPATH=/tmp/site
fi
"$PY" -m pip check || echo "(pip check above: unmet requirements are listed, not fatal)"
"$PY" - <<'PY' || exit 5
import importlib.metadata as m
import sys
import lmdeploy_regex_lora_boot as boot
import torch
print("lmdeploy", m.version("lmdeploy"), "| plugin", m.version("lmdeploy-regex-lora"), "| torch", torch.__version__,
      "| transformers", m.version("transformers"), "| peft", m.version("peft"), "| triton", m.version("triton"))
print("plugin import hook registered at start-up:", boot in sys.meta_path)
print("CUDA:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
export PYTHONUNBUFFERED=1
"$PY" -m benchmarks.gpu_e2e --out "$OUT" --work /tmp/gpu_e2e_work "$@"
rc=$?
echo "gpu_e2e exit code $rc"
exit $rc
