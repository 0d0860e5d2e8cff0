"""Shared parts of the benchmarks: the machine, interleaved timing, a 0.5B Qwen2-shaped model and its adapters.

Every benchmark measures its contenders side by side in one run, alternating A/B/A/B so that a slow
phase of a noisy machine hits both, and reports medians and the ratio of medians. Nothing here
asserts on a time: the numbers are printed for docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CACHE = pathlib.Path(os.environ.get("LMDEPLOY_REGEX_LORA_BENCH_CACHE",
                                            pathlib.Path.home() / ".cache" / "lmdeploy-regex-lora" / "bench"))

#: Qwen2-0.5B's shape (hidden 896, 24 layers, MLP 4864, 14 query / 2 KV heads, tied embeddings, full vocab).
#: float16, not Qwen2's bfloat16: for a bfloat16 config LMDeploy's ``ModelConfig`` asks CUDA whether bfloat16
#: is supported, which fails on a machine without a GPU.
QWEN2_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 24,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "torch_dtype": "float16",
}
QWEN_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: ms-swift >= 3.4.1's default form for a Qwen2 LLM (see docs/supported.md), selecting the same modules.
QWEN_REGEX = r"^(model.*\.(" + "|".join(QWEN_LEAVES) + r"))$"
#: Shards of the base checkpoint (bytes); the embedding alone is 272 MB in float16.
SHARD_BYTES = 300 * 1024 * 1024


# --------------------------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    """What the numbers were measured on: cores, memory, CPU model, versions, date."""
    cpu = "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    versions = {}
    for pkg in ("lmdeploy", "torch", "peft", "transformers", "safetensors"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg)
        except Exception:
            versions[pkg] = None
    return {
        "nproc": os.cpu_count(),
        "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "cpu": cpu,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **versions,
    }


def print_machine() -> None:
    m = machine()
    print(f"machine: {m['nproc']} cores, {m['mem_gib']} GiB, CPU {m['cpu']!r}, Python {m['python']}, {m['date']}")
    try:
        load = " ".join(pathlib.Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "unknown"
    print(f"load average (1/5/15 min) at start: {load}  (other work on the machine slows every contender alike)")
    print("versions: " + ", ".join(f"{k} {m[k]}" for k in ("lmdeploy", "torch", "peft", "transformers", "safetensors")))


# --------------------------------------------------------------------------------------------- timing


def interleave(contenders: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, list[Any]]:
    """Call each contender ``warmup + reps`` times, alternating A, B, C, A, B, C, ...; keep the last ``reps``.

    A contender returns either a number of seconds or a dict of measurements (see :func:`timed`).
    """
    results: dict[str, list[Any]] = {name: [] for name in contenders}
    for i in range(warmup + reps):
        order = list(contenders)
        if i % 2:  # A/B then B/A: neither side always runs right after the other's cache warm-up
            order.reverse()
        for name in order:
            value = contenders[name]()
            if i >= warmup:
                results[name].append(value)
    return results


def timed(fn: Callable[[], Any]) -> Callable[[], float]:
    """Wrap ``fn`` so that calling it returns its wall time in seconds."""

    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """(25th, 75th) percentile; the spread reported next to each median."""
    if len(values) < 2:
        return (values[0], values[0])
    q = statistics.quantiles(values, n=4, method="inclusive")
    return (q[0], q[2])


def fmt_seconds(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def table(rows: list[list[str]], header: list[str]) -> str:
    """A Markdown table (pasted as is into docs/performance.md)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a measured subprocess: no stray PYTHONPATH or plugin switch, repo importable when asked."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LMDEPLOY_REGEX_LORA_DISABLE")}
    env.update(extra)
    return env


#: Runs the command in a fresh small process and reports that child's wall time and rusage. Needed
#: because Linux carries a process's peak RSS across ``exec`` (``setmax_mm_hiwater_rss``): a child
#: forked from this benchmark, which has imported torch (~700 MiB), would report at least that peak
#: whatever it does itself. The launcher is exec'd first (its own peak is inherited and ignored), and
#: the command is forked from it while it is ~10 MiB.
_LAUNCHER = """
import json, os, sys, time
report, cmd = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(report, "w") as fh:
    json.dump({"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "maxrss": usage.ru_maxrss * 1024,
               "code": os.waitstatus_to_exitcode(status)}, fh)
"""


def run_measured(cmd: Sequence[str], *, cwd: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` to completion; return wall seconds, CPU seconds and peak RSS of that child (``wait4``).

    ``os.wait4`` reports the resources of exactly this child (not of every child ever waited for, as
    ``RUSAGE_CHILDREN`` would), so measurements in one parent do not contaminate each other; the child
    is forked from a small launcher (see :data:`_LAUNCHER`), so this process's own size does not
    either. Output is captured and returned; a non-zero exit raises with it.
    """
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.NamedTemporaryFile("r", suffix=".json") as report:
        proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, report.name, *map(str, cmd)], cwd=cwd,
                              env=env if env is not None else child_env(), stdout=out, stderr=subprocess.STDOUT)
        out.seek(0)
        text = out.read().decode(errors="replace")
        result = json.loads(report.read() or "{}")
    if proc.returncode != 0 or result.get("code") != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {result.get('code', proc.returncode)}:\n{text[-4000:]}")
    return {"wall": result["wall"], "cpu": result["cpu"], "maxrss": result["maxrss"], "output": text}


# --------------------------------------------------------------------------------------------- model


def _tensor_specs(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    h, inter, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for i in range(n):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.q_proj.bias", (h,)),
            (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
        ]
    specs.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings"):
        specs.append(("lm_head.weight", (cfg["vocab_size"], h)))
    return specs


def linear_shapes(cfg: dict[str, Any] = QWEN2_05B) -> dict[str, tuple[int, int]]:
    """HF module name -> (in_features, out_features) of every decoder linear LoRA can target."""
    out = {}
    for key, shape in _tensor_specs(cfg):
        if key.endswith(".weight") and len(shape) == 2 and "embed_tokens" not in key and "lm_head" not in key:
            out[key[: -len(".weight")]] = (shape[1], shape[0])
    return out


def num_params(cfg: dict[str, Any] = QWEN2_05B) -> int:
    total = 0
    for _, shape in _tensor_specs(cfg):
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def merge_bench_setup(description: str, argv: list[str] | None) -> tuple[argparse.Namespace, pathlib.Path,
                                                                        pathlib.Path]:
    """Options shared by the benchmarks that merge (``--reps``, ``--cache``, ``--work``), the machine line,
    and the cached base model with its ms-swift regex adapter: (args, base, adapter)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cache", default=str(DEFAULT_CACHE))
    parser.add_argument("--work", default=None, help="folder for merged outputs (default: a temporary one)")
    args = parser.parse_args(argv)
    cache = pathlib.Path(args.cache)
    print_machine()
    base = make_base_model(cache)
    return args, base, make_adapter(base, targets="regex", cache=cache)


def make_base_model(cache: pathlib.Path = DEFAULT_CACHE, cfg: dict[str, Any] = QWEN2_05B,
                    shard_bytes: int = SHARD_BYTES) -> pathlib.Path:
    """Write (once) random float16 weights of ``cfg`` as sharded safetensors with an index, like the Hub's.

    Values are N(0, 0.02) (norms 1), seeded per tensor: the same folder on every machine. A ``.complete``
    marker is written last, so an interrupted write is redone.
    """
    import torch
    from safetensors.torch import save_file

    folder = cache / "qwen2-0.5b-shape"
    if (folder / ".complete").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for i, (key, shape) in enumerate(_tensor_specs(cfg)):
        gen = torch.Generator().manual_seed(1000 + i)
        if len(shape) == 1 and not key.endswith(".bias"):
            t = torch.ones(shape, dtype=torch.float16)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    weight_map, total = {}, 0
    for idx, shard in enumerate(shards, start=1):
        name = f"model-{idx:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / ".complete").write_text("")
    return folder


def make_adapter(base: pathlib.Path, *, r: int = 64, alpha: int = 128, targets: str = "list",
                 layers: Sequence[int] | None = None, dtype: str = "float32", cache: pathlib.Path = DEFAULT_CACHE,
                 cfg: dict[str, Any] = QWEN2_05B) -> pathlib.Path:
    """Write (once) a PEFT LoRA adapter on every decoder linear of ``base`` (or the ``layers`` given).

    ``adapter_config.json`` is what PEFT's own ``LoraConfig.save_pretrained`` writes; the tensors are
    random, seeded, under PEFT's key names, in ``dtype`` (PEFT keeps LoRA weights in float32 by default).
    ``targets``: ``"list"`` (the seven leaf names, what LMDeploy can load) or ``"regex"`` (the ms-swift
    form selecting the same modules; the tensors are the same).
    """
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    tag = f"r{r}-a{alpha}-{targets}-{dtype}" + (f"-layers{min(layers)}-{max(layers)}" if layers else "")
    folder = cache / "adapters" / tag
    if (folder / ".complete").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    target_modules: str | list[str] = QWEN_REGEX if targets == "regex" else list(QWEN_LEAVES)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", layers_to_transform=list(layers) if layers else None,
                        base_model_name_or_path=str(base))
    config.save_pretrained(str(folder))
    tdtype = getattr(torch, dtype)
    tensors = {}
    for i, (module, (fan_in, fan_out)) in enumerate(sorted(linear_shapes(cfg).items())):
        layer = int(module.split(".")[2])
        if layers and layer not in layers:
            continue
        gen = torch.Generator().manual_seed(5000 + i)
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = (torch.randn((r, fan_in), generator=gen) * 0.02).to(tdtype)
        tensors[f"{key}.lora_B.weight"] = (torch.randn((fan_out, r), generator=gen) * 0.02).to(tdtype)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / ".complete").write_text("")
    return folder


def folder_bytes(folder: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in pathlib.Path(folder).rglob("*") if p.is_file())


def build_model(base: pathlib.Path, dtype: str = "float16"):
    """LMDeploy's own CPU build of ``base`` (``build_patched_model`` + ``load_model_weights``)."""
    from lmdeploy_regex_lora.testing.build import build_lmdeploy_model

    return build_lmdeploy_model(base, dtype=dtype)


def lora_modules(model) -> list[tuple[str, str, Any]]:
    """(module name, slot name, LoRA module) for every LoRA slot on ``model``."""
    found = []
    for name, mod in model.named_modules():
        slots = getattr(mod, "lora_adapters", None)
        if slots:
            found += [(name, key, lora) for key, lora in slots.items()]
    return found


def clear_lora(model) -> None:
    """Remove every LoRA slot, so the next load starts from the bare model."""
    for mod in model.modules():
        slots = getattr(mod, "lora_adapters", None)
        if slots:
            slots.clear()


def lmdeploy_python() -> str:
    return sys.executable
