"""``merge``: a sharded bfloat16 checkpoint in, the same layout out, the exact merge rounded once (within
one bfloat16 step of PEFT's merge) and equal to what the plugin serves; bad inputs refused before
anything is written; memory bounded by blocks, not shards; neither torch nor LMDeploy imported.

The base is a tiny InternLM2 (its ``wqkv`` rows are interleaved in the checkpoint, so a merge in the
wrong layout would show) re-sharded into three bf16 files with an index. The reference is PEFT's own
``merge_and_unload`` (tests/support/peft_fixtures.py); "what the plugin serves" is ``verify --against``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.support.cli_run import ROOT, describe, json_out, read_all, reshard, run_cli
from tests.support.peft_fixtures import make_peft_adapter, merge_adapter_checkpoint

pytestmark = pytest.mark.slow

INTERNLM2_REGEX = r"^(model.*\.(w2|w3|w1|wo|wqkv))$"


def _header(file) -> dict:
    data = open(file, "rb").read(1 << 20)
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n])


@pytest.fixture(scope="module")
def case(tiny_model, tmp_path_factory):
    """(base, adapter, merge CLI result, merged folder): the CLI is run once, several tests read its output."""
    tmp = tmp_path_factory.mktemp("merge")
    src = tiny_model("internlm2")
    base = reshard(src, tmp / "base-bf16-sharded", 3, torch.bfloat16)
    (base / "tokenizer.json").write_text('{"version": "1.0"}\n')
    (base / "extra").mkdir()
    (base / "extra" / "notes.txt").write_text("not a weight\n")
    (base / "consolidated.00.pth").write_bytes(b"original-format weights: must not be copied")
    adapter = make_peft_adapter(src, tmp / "adapter", target_modules=INTERNLM2_REGEX, r=24, lora_alpha=16, seed=7)
    out = tmp / "merged"
    proc = run_cli("merge", base, adapter, out, "--json")
    return base, adapter, proc, out


def test_same_layout_and_files(case):
    base, adapter, proc, out = case
    assert proc.returncode == 0, describe(proc)
    summary = json_out(proc)
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) == 3 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert (out / "model.safetensors.index.json").read_bytes() == (base / "model.safetensors.index.json").read_bytes()
    for name in ("config.json", "configuration_internlm2.py", "generation_config.json", "tokenizer.json",
                 "extra/notes.txt"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert not (out / "consolidated.00.pth").exists() and "consolidated.00.pth" in summary["not_copied"]
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no staging folder left behind
    for shard in shards:  # names, dtypes, shapes and offsets: the very same header
        assert _header(out / shard) == _header(base / shard)
        assert (out / shard).stat().st_size == (base / shard).stat().st_size
    assert sum(s["merged"] for s in summary["shards"]) == len(summary["modules"])
    assert {s["merged"] > 0 for s in summary["shards"]} == {True}  # targets live in every shard


def _nearest(merged: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Where ``merged`` (bfloat16) is a nearest bfloat16 to ``exact`` (float64): no neighbour is closer."""
    bits = merged.view(torch.int16)
    dist = (exact - merged.double()).abs()
    return torch.stack([dist <= (exact - (bits + step).view(torch.bfloat16).double()).abs()
                        for step in (-1, 1)]).all(0)


def _terms(original: dict, lora: dict, module: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W, A, B) in float64 for one entry of merge's ``--json`` ``modules``."""
    prefix = f"base_model.model.{module['module']}"
    return (original[module["key"]].double(), lora[f"{prefix}.lora_A.weight"].double(),
            lora[f"{prefix}.lora_B.weight"].double())


def test_equals_exact_merge_and_peft(case, tmp_path):
    base, adapter, proc, out = case
    assert proc.returncode == 0, describe(proc)
    summary = json_out(proc)
    reference = read_all(merge_adapter_checkpoint(base, adapter, tmp_path / "peft"))
    merged, original = read_all(out), read_all(base)
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    assert merged.keys() == original.keys() == reference.keys()
    changed = {k for k in original if not torch.equal(reference[k], original[k])}
    assert changed == {m["key"] for m in summary["modules"]} and len(changed) == 10
    differ = total = 0
    for m in summary["modules"]:
        key = m["key"]
        w, a, b = _terms(original, lora, m)
        exact = w + m["scaling"] * (b @ a)
        # The merge rounds W + scaling * B @ A once, to the nearest bfloat16 (checkpoint row order:
        # InternLM2's wqkv stays interleaved, as the adapter was trained).
        assert bool(_nearest(merged[key], exact).all()), key
        # PEFT rounds B @ A to float32 first, in its BLAS's order: at most one bfloat16 step away.
        steps = (merged[key].view(torch.int16).int() - reference[key].view(torch.int16).int()).abs()
        assert int(steps.max()) <= 1, key
        differ += int((steps > 0).sum())
        total += steps.numel()
    print(f"merged elements one bfloat16 step from PEFT's merge: {differ} of {total}")
    for key, tensor in merged.items():
        assert tensor.dtype == original[key].dtype == torch.bfloat16
        if key not in changed:  # untouched tensors are copied byte for byte
            assert torch.equal(tensor, original[key]), key


def test_equals_what_the_plugin_serves(case):
    base, adapter, proc, out = case
    assert proc.returncode == 0, describe(proc)
    check = run_cli("verify", base, f"ada={adapter}", "--against", f"ada={out}", "--json")
    assert check.returncode == 0, describe(check)
    report = json_out(check)
    assert report["ok"] and report["plugin_active"]
    (entry,) = report["adapters"]
    kinds = {r["kind"] for r in entry["rows"]}
    assert kinds == {"lora", "untouched"} and all(r["ok"] for r in entry["rows"])
    wqkv = [r for r in entry["rows"] if r["module"].endswith("attention.wqkv")]
    assert len(wqkv) == 2 and all(r["kind"] == "lora" and r["max_err"] > 0 for r in wqkv)


def test_refusals_write_nothing(case, tiny_model, tmp_path):
    base, adapter, _, out = case
    # OUT not empty: refused before anything else.
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    proc = run_cli("merge", base, adapter, taken)
    assert proc.returncode == 2 and "not empty" in proc.stderr, describe(proc)
    assert sorted(os.listdir(taken)) == ["keep.txt"]

    # An adapter trained on another model: the plan refuses it, OUT is never created.
    other = make_peft_adapter(tiny_model("qwen2"), tmp_path / "qwen-adapter", target_modules=["q_proj"])
    proc = run_cli("merge", base, other, tmp_path / "out1")
    assert proc.returncode == 2 and "does not have" in proc.stderr, describe(proc)
    assert "Traceback" not in proc.stderr and not (tmp_path / "out1").exists()

    # An LM-head adapter whose saved copy of the base LM head differs from the base model's (resized
    # vocabulary or another base): the LoRA merge would drop it, so it is refused like serving does.
    src = tiny_model("qwen2")
    heads = make_peft_adapter(src, tmp_path / "heads", target_modules=["q_proj", "lm_head"])
    proc = run_cli("merge", src, heads, tmp_path / "out-heads")  # as saved, the copy equals the base: merged
    assert proc.returncode == 0 and (tmp_path / "out-heads" / "model.safetensors").is_file(), describe(proc)
    tensors = load_file(str(heads / "adapter_model.safetensors"))
    copies = [k for k in tensors if k.endswith("lm_head.base_layer.weight")]
    assert copies, sorted(tensors)  # PEFT saved the base LM head next to the LoRA tensors
    tensors[copies[0]] = tensors[copies[0]] + 1.0
    save_file(tensors, str(heads / "adapter_model.safetensors"), metadata={"format": "pt"})
    proc = run_cli("merge", src, heads, tmp_path / "out0")
    assert proc.returncode == 2 and "differs from the base checkpoint" in proc.stderr, describe(proc)

    # A truncated shard and a pickled checkpoint: refused with the file named.
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in base.iterdir():
        if item.is_file():
            data = item.read_bytes()
            (broken / item.name).write_bytes(data[:-64] if item.name.endswith("00002-of-00003.safetensors") else data)
    proc = run_cli("merge", broken, adapter, tmp_path / "out2")
    assert proc.returncode == 2 and "00002-of-00003" in proc.stderr, describe(proc)
    assert not (tmp_path / "out2").exists()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((base / "config.json").read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"\0")
    proc = run_cli("merge", pickled, adapter, tmp_path / "out3")
    assert proc.returncode == 2 and "safetensors" in proc.stderr and "pytorch_model.bin" in proc.stderr, describe(proc)


MEMORY_PROBE = textwrap.dedent('''
    import gc, json, sys, threading, time
    import psutil
    from lmdeploy_regex_lora.merge.writer import merge_checkpoint

    warm_base, warm_adapter, base, adapter, out = sys.argv[1:6]
    merge_checkpoint(warm_base, warm_adapter, out + "-warm", progress=False)  # imports, LMDeploy's classes
    gc.collect()
    me = psutil.Process()
    before = me.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        merge_checkpoint(base, adapter, out, progress=False)
    finally:
        done.set()
        thread.join()
    heavy = sorted(m for m in ("torch", "lmdeploy", "transformers") if m in sys.modules)
    print("MEMORY " + json.dumps({"before": before, "peak": peak[0], "heavy": heavy}))
''')


def test_memory_is_blocks_not_shards(tiny_model, tmp_path):
    """Loose sanity check (RSS sampled every millisecond): the merge's growth stays far below a shard."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    base = tmp_path / "qwen2-100mb"
    model.save_pretrained(str(base), max_shard_size="40MB")
    del model
    shards = sorted(base.glob("*.safetensors"))
    assert len(shards) >= 2 and (base / "model.safetensors.index.json").is_file()
    largest = max(p.stat().st_size for p in shards)
    adapter = make_peft_adapter(base, tmp_path / "adapter", r=8, lora_alpha=16,
                                target_modules=r"^(model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj))$")
    warm = make_peft_adapter(tiny_model("qwen2"), tmp_path / "warm", target_modules=["q_proj"])
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, tiny_model("qwen2"), warm, base, adapter,
                           tmp_path / "out"], cwd=str(ROOT), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mem = json.loads(proc.stdout.split("MEMORY ", 1)[1])
    growth = mem["peak"] - mem["before"]
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    print(f"merge RSS growth {growth / 2**20:.1f} MiB; largest shard {largest / 2**20:.1f} MiB; "
          f"adapter {adapter_bytes / 2**20:.1f} MiB")
    # The target is 1.5x the largest shard plus the adapter; loading a shard whole would pass 2x.
    assert growth < 1.5 * largest + adapter_bytes, (growth, largest, adapter_bytes)
    # What keeps the whole process small: importing torch's CUDA build alone is ~690 MiB of RSS.
    assert mem["heavy"] == [], mem["heavy"]
    assert read_all(tmp_path / "out").keys() == read_all(base).keys()


def test_progress_bar_on_a_terminal_plain_lines_otherwise(case, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    base, adapter, _, _ = case
    plain = run_cli("merge", base, adapter, tmp_path / "plain")
    assert plain.returncode == 0, describe(plain)
    assert [line.split(":")[0] for line in plain.stderr.splitlines() if line.startswith("[")] == [
        f"[{i}/3] model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert "SHARD" in plain.stdout and "wrote " in plain.stdout and "merging:" not in plain.stderr

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a terminal has a size
    proc = subprocess.Popen([sys.executable, "-m", "lmdeploy_regex_lora.cli", "merge", str(base), str(adapter),
                             str(tmp_path / "tty")], cwd=str(ROOT), stdin=follower, stdout=subprocess.DEVNULL,
                            stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.wait(timeout=300) == 0, seen.decode(errors="replace")[-2000:]
    bars = [part for part in seen.decode(errors="replace").replace("\r", "\n").split("\n") if "merging:" in part]
    assert bars and "100%" in bars[-1], bars[-3:]


def _copy_model(src, dst):
    dst.mkdir()
    for item in src.iterdir():
        if item.is_file():
            (dst / item.name).write_bytes(item.read_bytes())
    return dst


def test_bin_adapter_merges_like_its_safetensors(tiny_model, tmp_path):
    """A pickled adapter is read through torch (safely, see adapter_weights); the merge is the same bytes."""
    src = tiny_model("qwen2")
    adapter = make_peft_adapter(src, tmp_path / "st", target_modules=r"^(model.*\.(q_proj|down_proj))$", r=8)
    pickled = _copy_model(adapter, tmp_path / "bin")
    tensors = load_file(str(pickled / "adapter_model.safetensors"))
    (pickled / "adapter_model.safetensors").unlink()
    torch.save(tensors, str(pickled / "adapter_model.bin"))
    for name, folder in (("st", adapter), ("bin", pickled)):
        proc = run_cli("merge", src, folder, tmp_path / f"out-{name}")
        assert proc.returncode == 0, describe(proc)
    assert (tmp_path / "out-st" / "model.safetensors").read_bytes() == \
        (tmp_path / "out-bin" / "model.safetensors").read_bytes()


def test_refusals_of_what_merging_cannot_write(tiny_model, tmp_path):
    src = tiny_model("qwen2")
    # The LM head tied to the embedding: a merged LoRA on it would change the embedding too.
    tied = _copy_model(src, tmp_path / "tied")
    config = json.loads((tied / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(config))
    heads = make_peft_adapter(src, tmp_path / "heads", target_modules=["q_proj", "lm_head"])
    proc = run_cli("merge", tied, heads, tmp_path / "out-tied")
    assert proc.returncode == 2 and "tie_word_embeddings" in proc.stderr and "lm_head" in proc.stderr, describe(proc)

    # A quantized (integer) weight in the checkpoint: refused by name, not merged as if it were float.
    quant = _copy_model(src, tmp_path / "quant")
    weights = load_file(str(quant / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    weights[key] = weights[key].to(torch.int8)
    save_file(weights, str(quant / "model.safetensors"), metadata={"format": "pt"})
    adapter = make_peft_adapter(src, tmp_path / "q", target_modules=["q_proj"], r=4)
    proc = run_cli("merge", quant, adapter, tmp_path / "out-quant")
    assert proc.returncode == 2 and key in proc.stderr and "quantized" in proc.stderr, describe(proc)

    # Values the checkpoint's dtype cannot hold once merged (float16 here): refused, never written as Inf.
    half = reshard(src, tmp_path / "half", 2, torch.float16)
    big = _copy_model(adapter, tmp_path / "big")
    lora = load_file(str(big / "adapter_model.safetensors"))
    for name in lora:
        lora[name] = torch.full_like(lora[name], 300.0)
    save_file(lora, str(big / "adapter_model.safetensors"), metadata={"format": "pt"})
    proc = run_cli("merge", half, big, tmp_path / "out-big")
    assert proc.returncode == 2 and "beyond what F16 can hold" in proc.stderr, describe(proc)
    assert not (tmp_path / "out-big").exists()

    # LoRA weights in a dtype merge does not read (float8): refused naming the tensor.
    f8 = _copy_model(adapter, tmp_path / "f8")
    lora = load_file(str(f8 / "adapter_model.safetensors"))
    lora = {k: v.to(torch.float8_e4m3fn) for k, v in lora.items()}
    save_file(lora, str(f8 / "adapter_model.safetensors"), metadata={"format": "pt"})
    proc = run_cli("merge", src, f8, tmp_path / "out-f8")
    assert proc.returncode == 2 and "F8_E4M3" in proc.stderr and "lora_A" in proc.stderr, describe(proc)
    assert not (tmp_path / "out-f8").exists()


def _multimodal_cases() -> dict:
    from tests.test_multimodal import CASES, INTERNVL, VLM_CASES

    cases = {f"internvl2-{name}": (INTERNVL, "checkpoint", spec) for name, spec in CASES.items()}
    for name, (arch, naming, regex, *_) in VLM_CASES.items():
        cases[name] = (arch, naming, dict(target_modules=regex, r=24, lora_alpha=32))
    return cases


MULTIMODAL = _multimodal_cases()


@pytest.mark.parametrize("case", sorted(MULTIMODAL))
def test_multimodal_merge_is_exact(case, tiny_model, tmp_path):
    """Vision tower, projector, LM head and LLM, adapters named by old and new transformers: the merge, made from
    the checkpoint's headers alone, changes exactly PEFT's tensors, each the exact merge rounded once; PEFT's
    float32 merge is within its own rounding error of it."""
    arch, naming, spec = MULTIMODAL[case]
    base = tiny_model(arch)
    adapter = make_peft_adapter(base, tmp_path / "adapter", seed=61, naming=naming, **spec)
    proc = run_cli("merge", base, adapter, tmp_path / "ours", "--json")
    assert proc.returncode == 0, describe(proc)
    reference = read_all(merge_adapter_checkpoint(base, adapter, tmp_path / "peft"))
    merged, original = read_all(tmp_path / "ours"), read_all(base)
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    assert merged.keys() == original.keys() == reference.keys()
    modules = {m["key"]: m for m in json_out(proc)["modules"]}
    changed = {k for k in original if not torch.equal(reference[k], original[k])}
    assert changed and changed == set(modules)
    for key, tensor in merged.items():
        assert tensor.dtype == original[key].dtype
        if key not in changed:
            assert torch.equal(tensor, original[key]), key
            continue
        m = modules[key]
        w, a, b = _terms(original, lora, m)
        exact = w + m["scaling"] * (b @ a)
        if tensor.dtype == torch.float32:  # torch rounds float64 -> float32 directly, to nearest
            assert torch.equal(tensor, exact.float()), key
        else:
            assert tensor.dtype == torch.bfloat16 and bool(_nearest(tensor, exact).all()), key
        # PEFT's float32 B @ A: off by at most its accumulated rounding (rank * float32 eps of the terms).
        bound = 1e-5 * (w.abs() + abs(m["scaling"]) * (b.abs() @ a.abs())) + 1e-30
        step = (w.abs().clamp_min(2.0**-126) * torch.finfo(tensor.dtype).eps)
        assert bool(((tensor.double() - reference[key].double()).abs() <= bound + step).all()), key
