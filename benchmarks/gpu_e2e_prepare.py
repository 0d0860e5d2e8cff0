"""Put what the GPU machine needs for ``benchmarks/gpu_e2e/`` into ``.gpu_e2e/wheels`` (git-ignored, carried).

The device machine has no network, Python 3.12 with torch (CUDA), transformers, peft, safetensors, regex and the
other packages of its image (``DEVICE_PACKAGES``), and no LMDeploy. A call carries at most 64 MiB, and LMDeploy's
wheel is 107 MB, almost all of it TurboMind (``_turbomind*.so``, 364 MB unpacked, and a static ``libxgrammar.a``),
which the PyTorch engine never loads. So this script:

1. repacks LMDeploy without TurboMind's binaries (``strip_wheel``): every Python file and the metadata stay, the
   ``.so``/``.a`` files go, RECORD is rewritten, and the wheel is tagged ``py3-none-any`` since nothing compiled is
   left (the same wheel then installs on this machine's Python for the test). Source: the PyPI wheel for CPython
   3.12 (``--lmdeploy-source pypi``, the default; a 107 MB download) or the LMDeploy installed here
   (``installed``: the same release's Python files, no download);
2. downloads, for CPython 3.12 on manylinux x86-64, the wheels of LMDeploy's dependencies that the image lacks
   (``carry_pins``: the requirement closure of what LMDeploy imports for the PyTorch engine, the pipeline and the
   api_server, less the image's packages), pinned to the versions installed here, where they were tested;
3. builds this project's wheel (its ``.pth`` start-up hook only exists in an installed wheel).

``benchmarks/gpu_e2e_device.sh`` installs the lot there with ``pip --no-index --no-deps`` and runs the benchmark.

    python -m benchmarks.gpu_e2e_prepare            # then: run tool, carry [".gpu_e2e"]
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import importlib.metadata as md
import io
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEST = ROOT / ".gpu_e2e"
LMDEPLOY_VERSION = "0.18.0"
#: What travels per call (README of the device tool); the working tree counts too.
CARRY_LIMIT = 64 * 1024 * 1024
#: The device's interpreter and platform, for requirement markers and ``pip download``.
DEVICE_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")

#: The packages of the device image ('cuda'), as the device tool's KINDS.md lists them (read there 2026-11-17).
DEVICE_PACKAGES = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())

#: LMDeploy requirements this benchmark's path (PyTorch engine, one GPU, pipeline, api_server) never imports.
NOT_NEEDED = {
    "ray": "multi-GPU executor and the Ray mp-engine backend only",
    "rdkit": "chemistry models' processors only",
    "tilelang": "kernels of linear-attention / DeepSeek-V3.2/V4 models only",
    "flash-linear-attention": "gated-delta (Qwen3-Next style) layers only",
    "openai-harmony": "GPT-OSS tokenizer and parser only (optional import)",
    "partial-json-parser": "tool-call parsers only",
    "fire": "``python -m lmdeploy.serve.openai.api_server`` as a script only",
    "nvidia-nccl-cu12": "the image has CUDA 13 libraries; TurboMind's, not the PyTorch engine's",
    "nvidia-cuda-runtime-cu12": "as above",
    "nvidia-cublas-cu12": "as above",
    "nvidia-curand-cu12": "as above",
}
#: Carried although the image has them: the versions here are what the carried packages need, the image's unknown.
ALSO_CARRY = {
    "typing-extensions": "pydantic 2.14 needs >= 4.16; the image's version is not recorded",
}

#: The device tool call that runs the whole benchmark (a few minutes; 540 s leaves room under the 600 s cap).
DEVICE_RUN = {"command": "bash benchmarks/gpu_e2e_device.sh", "carry": [".gpu_e2e"], "timeout_s": 540}
#: A shorter rerun, should the first call leave too little device time for a second full one.
DEVICE_RERUN = {"command": "bash benchmarks/gpu_e2e_device.sh --models qwen2 --skip-throughput --budget 200",
                "carry": [".gpu_e2e"], "timeout_s": 300}

BINARY_SUFFIXES = (".so", ".a", ".dylib", ".dll", ".pyd")


# ---------------------------------------------------------------------------------------------------- closure


def _requirements(dist: md.Distribution) -> list[Requirement]:
    """Unconditional requirements of ``dist`` on the device (markers evaluated there, no extras)."""
    reqs = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(DEVICE_ENV):
            continue
        reqs.append(req)
    return reqs


def carry_pins(roots: Iterable[str] | None = None) -> dict[str, str]:
    """Name -> version (as installed here) of every distribution the device must be given.

    The closure starts from LMDeploy's requirements (less ``NOT_NEEDED``) and this project's, stops at the
    image's packages (the image satisfies their own needs), and adds ``ALSO_CARRY``. LMDeploy and this project
    travel as their own wheels and are not in the result.
    """
    if roots is None:
        lmdeploy = md.distribution("lmdeploy")
        roots = [r.name for r in _requirements(lmdeploy) if canonicalize_name(r.name) not in NOT_NEEDED]
        roots += [r.name for r in _requirements(md.distribution("lmdeploy-regex-lora"))] if _installed(
            "lmdeploy-regex-lora") else []
    skip = {"lmdeploy", "lmdeploy-regex-lora"}
    pins: dict[str, str] = {}
    todo = [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in pins or name in skip or name in DEVICE_PACKAGES or name in NOT_NEEDED:
            continue
        dist = md.distribution(name)
        pins[name] = dist.version
        todo += [canonicalize_name(r.name) for r in _requirements(dist)]
    for name in ALSO_CARRY:
        pins[canonicalize_name(name)] = md.version(name)
    return dict(sorted(pins.items()))


def _installed(name: str) -> bool:
    try:
        md.distribution(name)
        return True
    except md.PackageNotFoundError:
        return False


# ---------------------------------------------------------------------------------------------------- wheels


def _record_line(path: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [path, f"sha256={digest}", str(len(data))]


def _write_wheel(out: pathlib.Path, files: dict[str, bytes], dist_info: str) -> pathlib.Path:
    """Write ``files`` (archive path -> bytes, RECORD excluded) as a wheel with a fresh RECORD."""
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for path in sorted(files):
        writer.writerow(_record_line(path, files[path]))
    writer.writerow([f"{dist_info}/RECORD", "", ""])
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(files):
            zf.writestr(path, files[path])
        zf.writestr(f"{dist_info}/RECORD", record.getvalue())
    return out


def _pure_wheel_file(generator: str) -> bytes:
    return (f"Wheel-Version: 1.0\nGenerator: {generator}\nRoot-Is-Purelib: true\nTag: py3-none-any\n").encode()


def strip_files(files: dict[str, bytes], version: str) -> tuple[dict[str, bytes], list[str]]:
    """Drop compiled files (TurboMind's ``.so``, ``libxgrammar.a``) and ``__pycache__``; retag as pure Python."""
    dist_info = f"lmdeploy-{version}.dist-info"
    kept, dropped = {}, []
    for path, data in files.items():
        if path.endswith(BINARY_SUFFIXES) or ".so." in path or "/__pycache__/" in path or path.endswith(".pyc"):
            dropped.append(path)
            continue
        if path.startswith(f"{dist_info}/") and path.rsplit("/", 1)[-1] in ("RECORD", "WHEEL", "INSTALLER",
                                                                             "REQUESTED", "direct_url.json"):
            continue
        kept[path] = data
    kept[f"{dist_info}/WHEEL"] = _pure_wheel_file("lmdeploy-regex-lora gpu_e2e_prepare (TurboMind binaries removed)")
    return kept, sorted(dropped)


def strip_wheel(src: pathlib.Path, out_dir: pathlib.Path) -> tuple[pathlib.Path, list[str]]:
    """LMDeploy's PyPI wheel without its compiled files, as ``lmdeploy-<v>-py3-none-any.whl``."""
    m = re.match(r"lmdeploy-([^-]+)-", src.name)
    if not m:
        raise ValueError(f"not an lmdeploy wheel: {src.name}")
    version = m.group(1)
    with zipfile.ZipFile(src) as zf:
        files = {info.filename: zf.read(info) for info in zf.infolist() if not info.is_dir()}
    kept, dropped = strip_files(files, version)
    out = _write_wheel(out_dir / f"lmdeploy-{version}-py3-none-any.whl", kept, f"lmdeploy-{version}.dist-info")
    return out, dropped


def wheel_from_installed(out_dir: pathlib.Path, name: str = "lmdeploy") -> tuple[pathlib.Path, list[str]]:
    """The installed LMDeploy (files listed in its RECORD) repacked the same way, without a download.

    Console scripts (``../../bin/``) are left out: pip writes them again from ``entry_points.txt``.
    """
    dist = md.distribution(name)
    files: dict[str, bytes] = {}
    for f in dist.files or []:
        path = str(f)
        if path.startswith(".."):
            continue
        full = pathlib.Path(str(dist.locate_file(f)))
        if full.is_file():
            files[path] = full.read_bytes()
    kept, dropped = strip_files(files, dist.version)
    out = _write_wheel(out_dir / f"lmdeploy-{dist.version}-py3-none-any.whl", kept,
                       f"lmdeploy-{dist.version}.dist-info")
    return out, dropped


def check_wheel(path: pathlib.Path) -> dict[str, int]:
    """Every RECORD hash and size matches, and no compiled file is left; returns counts."""
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
        rows = list(csv.reader(io.StringIO(zf.read(record_name).decode())))
        listed = set()
        for row in rows:
            listed.add(row[0])
            if row[0] == record_name:
                continue
            want = _record_line(row[0], zf.read(row[0]))
            if row[1:] != want[1:]:
                raise ValueError(f"{path.name}: RECORD does not match {row[0]}")
        if listed != names:
            raise ValueError(f"{path.name}: RECORD lists {sorted(listed ^ names)[:5]} wrongly")
        binaries = [n for n in names if n.endswith(BINARY_SUFFIXES) or ".so." in n]
        if binaries:
            raise ValueError(f"{path.name}: compiled files left: {binaries[:5]}")
        return {"files": len(names), "bytes": sum(zf.getinfo(n).file_size for n in names)}


def _pip(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def download_args(dest: pathlib.Path, specs: Iterable[str]) -> list[str]:
    """``pip download`` arguments for CPython 3.12 manylinux x86-64 binaries, no dependencies."""
    args = ["download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            "--disable-pip-version-check", "-q", "-d", str(dest)]
    for plat in PLATFORMS:
        args += ["--platform", plat]
    return args + list(specs)


def build_plugin_wheel(dest: pathlib.Path) -> pathlib.Path:
    """This project's wheel, built from a copy of the tree (keeps ``build/`` out of the repo)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "src"
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
            ".git", ".gpu_e2e", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
            ".ruff_cache", "tests", "benchmarks"))
        _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest), str(src))
    found = sorted(dest.glob("lmdeploy_regex_lora-*.whl"))
    if len(found) != 1:
        raise RuntimeError(f"expected one plugin wheel in {dest}, found {found}")
    return found[0]


def tree_bytes(root: pathlib.Path = ROOT) -> int:
    """Bytes of what the device tool sends without ``carry``: tracked plus untracked, not ignored, files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout.decode()
    return sum((root / p).stat().st_size for p in out.split("\0") if p and (root / p).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default=str(DEST))
    parser.add_argument("--lmdeploy-source", choices=("pypi", "installed"), default="pypi")
    parser.add_argument("--list", action="store_true", help="only print the distributions that would be carried")
    args = parser.parse_args(argv)
    pins = carry_pins()
    if args.list:
        for name, version in pins.items():
            print(f"{name}=={version}")
        return 0
    dest = pathlib.Path(args.dest)
    wheels = dest / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.lmdeploy_source == "pypi":
            _pip(*download_args(pathlib.Path(tmp), [f"lmdeploy=={LMDEPLOY_VERSION}"]))
            src = next(pathlib.Path(tmp).glob("lmdeploy-*.whl"))
            lm, dropped = strip_wheel(src, wheels)
        else:
            lm, dropped = wheel_from_installed(wheels)
    check_wheel(lm)
    _pip(*download_args(wheels, [f"{n}=={v}" for n, v in pins.items()]))
    plugin = build_plugin_wheel(wheels)
    files = sorted(wheels.glob("*.whl"))
    names = [canonicalize_name(f.name.split("-")[0]) for f in files]
    missing = sorted(set(pins) - set(names))
    if missing:
        raise RuntimeError(f"no wheel downloaded for {missing}")
    total = sum(f.stat().st_size for f in files)
    tree = tree_bytes()
    manifest = {"lmdeploy": lm.name, "dropped_from_lmdeploy": dropped, "plugin": plugin.name,
                "carried": pins, "not_needed": NOT_NEEDED, "also_carried": ALSO_CARRY,
                "wheel_bytes": total, "tree_bytes": tree, "limit_bytes": CARRY_LIMIT}
    (dest / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for f in files:
        print(f"{f.stat().st_size / 2**20:8.2f} MiB  {f.name}")
    print(f"wheels {total / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB of {CARRY_LIMIT / 2**20:.0f} MiB")
    if total + tree > CARRY_LIMIT:
        print("too large for one call", file=sys.stderr)
        return 1
    print(f"ready; device tool call: {json.dumps(DEVICE_RUN)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
