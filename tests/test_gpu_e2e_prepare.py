"""benchmarks/gpu_e2e_prepare.py and gpu_e2e_device.sh: what the GPU machine is given, and the device script.

The device's Python 3.12 wheels are checked against this Python's installs of the same versions: the stripped
LMDeploy wheel is installed with pip and imported next to only what the device image has, and the device script
runs end to end in ``--dry-run`` mode in a throw-away venv.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import zipfile

import pytest
from packaging.utils import canonicalize_name

from benchmarks import gpu_e2e_prepare as prep
from benchmarks.gpu_e2e.cli import parse_args
from benchmarks.gpu_e2e.models import ARCHS, LM_HEAD

ROOT = pathlib.Path(__file__).resolve().parent.parent


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
        args = parse_args(extra)  # the arguments the script passes on are valid
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
    for arch in ARCHS:
        stats = report["phases"][f"dry_run:{arch}"]
        # LMDeploy modules with a delta, 2 layers: attn-r24 2 per layer (qkv_proj/wqkv, o_proj/wo); mlp-head-r8
        # 2 per layer (gate_up_proj packs gate+up / w1+w3; down_proj/w2) plus the LM head.
        assert stats["targeted"] == 2 * 2 + 2 * 2 + 1, stats
        assert stats["lm_head_slots"] == [LM_HEAD[arch]] and 32 in stats["kernel_blocks"]
        assert stats["max_err"] < 1e-5
    assert (out / "device.log").read_text().count("plugin on CPU") == 2


def test_prepare_lists_pins(capsys):
    assert prep.main(["--list"]) == 0
    lines = capsys.readouterr().out.split()
    assert lines == [f"{n}=={v}" for n, v in prep.carry_pins().items()]
