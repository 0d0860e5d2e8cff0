"""Helpers of the CLI tests: run ``lmdeploy-regex-lora`` as a user would, and re-shard a checkpoint.

The CLI always runs in a subprocess (``python -m lmdeploy_regex_lora.cli``) from the repository root,
so the tests see its real exit codes, stdout and stderr.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_cli(*args: object, python: str | os.PathLike = sys.executable, cwd: str | os.PathLike = ROOT,
            env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m lmdeploy_regex_lora.cli ARGS`` with captured text output."""
    full_env = dict(os.environ)
    full_env.pop("LMDEPLOY_REGEX_LORA_DISABLE", None)
    full_env.update(env or {})
    return subprocess.run([str(python), "-m", "lmdeploy_regex_lora.cli", *map(str, args)], cwd=str(cwd),
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def json_out(proc: subprocess.CompletedProcess) -> dict:
    """The JSON document a ``--json`` run printed on stdout (with the output in the failure message)."""
    try:
        return json.loads(proc.stdout)
    except ValueError as exc:
        raise AssertionError(f"not JSON ({exc}); rc={proc.returncode}\nstdout:\n{proc.stdout}\n"
                             f"stderr:\n{proc.stderr[-3000:]}") from None


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"


def read_all(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(pathlib.Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                out[key] = fh.get_tensor(key)
    return out


def reshard(src: str | os.PathLike, dst: str | os.PathLike, num_shards: int, dtype: torch.dtype) -> pathlib.Path:
    """Write ``src``'s checkpoint to ``dst`` in ``dtype``, split into ``num_shards`` files with an index,
    as transformers' ``save_pretrained(max_shard_size=...)`` lays it out; every other file is copied and
    ``config.json`` records ``torch_dtype``."""
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors"):
            shutil.copy2(item, dst / item.name)
    # The config says what the weights are, as a real bf16 checkpoint's does (LMDeploy reads it).
    config = json.loads((dst / "config.json").read_text())
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in read_all(src).items()}
    keys = list(tensors)
    per = -(-len(keys) // num_shards)
    weight_map, total = {}, 0
    for i in range(num_shards):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return dst
