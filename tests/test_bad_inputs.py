"""The bad-input corpus: each case is a real PEFT adapter, damaged one way, driven through LMDeploy.

Every case goes through LMDeploy's own ``lmdeploy.pytorch.models.patch.add_adapters`` with the plugin
installed, next to a good adapter that sorts first (so one adapter is fully read and planned when the
bad one fails). Each must raise the plugin's one error type, :class:`AdapterError`, whose message names
the adapter, the file, the field or module (where the problem has one) and a fix, is printable, and
comes within a bounded time; afterwards the model is bit-identical, has no LoRA slot, and LMDeploy's
step context manager is as it was. Payloads that would run code are first proven live (loaded unsafely
with a control marker) and then proven never to run through the plugin.

Also here: ``LMDEPLOY_REGEX_LORA_ON_ERROR=skip``, adapters landing nowhere, and the plugin's own
failures (fault injection).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import resource
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmdeploy_regex_lora.errors import AdapterError, printable
from lmdeploy_regex_lora.serve.matching import REGEX_BUDGET_S
from tests.support.bad_inputs import (
    PREFIX,
    ModelState,
    RunsCode,
    copy_adapter,
    deadline,
    edit_config,
    edit_tensors,
    key,
    live_payload_check,
    load,
    run_forked,
    safetensors_bytes,
)
from tests.support.peft_fixtures import make_peft_adapter

QWEN_LEAVES = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
GOOD_TARGET = rf"^(model.*\.({QWEN_LEAVES}))$"  # swift's regex form
BAD = "bad-adapter"
GOOD = "a-good"  # sorts before BAD: fully planned when BAD fails
Q0 = "model.layers.0.self_attn.q_proj"
DOWN1 = "model.layers.1.mlp.down_proj"
CASE_TIME_S = 15.0


# -- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_dir(tiny_model) -> Path:
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def served(base_dir):
    """One LMDeploy-built tiny Qwen2 for the whole module, and its snapshot."""
    from lmdeploy_regex_lora.testing.build import build_lmdeploy_model

    model = build_lmdeploy_model(base_dir)
    return model, ModelState(model)


@pytest.fixture(scope="module")
def good_adapter(base_dir, tmp_path_factory) -> Path:
    """A real PEFT adapter (swift regex over every decoder linear, rank 4) that loads cleanly."""
    return make_peft_adapter(base_dir, tmp_path_factory.mktemp("good") / "adapter", target_modules=GOOD_TARGET,
                             r=4, lora_alpha=8, seed=3)


@pytest.fixture
def model(served, plugin_installed):
    """The shared model; whatever a test does, the next one gets it pristine (and a leak fails this one)."""
    model, state = served
    yield model, state
    state.reset()


@dataclass
class Ctx:
    """What a case builder gets: a scratch folder, the good adapter, the model factory and a marker path."""

    tmp: Path
    good: Path
    base_dir: Path
    tiny_model: Callable
    marker: Path

    def copy(self, name: str = "bad") -> Path:
        return copy_adapter(self.good, self.tmp / name)


@dataclass
class Case:
    build: Callable[[Ctx], object]  # returns the adapter path handed to LMDeploy
    file: str | None  # "folder", "config", "safetensors", "bin", or None (no file to name)
    where: str | None  # field / module text the message must show; None: the whole file is the problem
    expect: tuple[str, ...] = ()  # further words the message must contain (case-insensitive)
    name: str = BAD
    max_s: float = CASE_TIME_S
    tags: set[str] = field(default_factory=set)


CASES: dict[str, Case] = {}


def case(case_id: str, file: str | None, where: str | None, *expect: str, **kw):
    def register(fn):
        assert case_id not in CASES
        CASES[case_id] = Case(fn, file, where, tuple(expect), **kw)
        return fn

    return register


def _t(module: str, half: str, rows: int, cols: int, value: float = 0.1) -> tuple[str, torch.Tensor]:
    return key(module, half), torch.full((rows, cols), value)


# -- folder -----------------------------------------------------------------------------------------------

@case("missing folder", "folder", None, "does not exist")
def _(c: Ctx):
    return c.tmp / "no-such-adapter"


@case("empty folder", "config", None, "adapter_config.json is missing")
def _(c: Ctx):
    (c.tmp / "empty").mkdir()
    return c.tmp / "empty"


@case("path is a file", "folder", None, "not a directory")
def _(c: Ctx):
    return c.copy() / "adapter_config.json"


@case("folder is a symlink loop", "folder", None, "loop")
def _(c: Ctx):
    os.symlink(c.tmp / "loop", c.tmp / "loop")
    return c.tmp / "loop"


@case("folder is a dangling link", "folder", None, "does not exist")
def _(c: Ctx):
    os.symlink(c.tmp / "gone", c.tmp / "link")
    return c.tmp / "link"


@case("path is None", None, "field 'path'", "must be a folder")
def _(c: Ctx):
    return None


@case("path is a number", None, "field 'path'", "must be a folder")
def _(c: Ctx):
    return 42


@case("non-UTF-8 folder name, broken JSON", "config", None, "not valid json", "\\xff")
def _(c: Ctx):
    folder = copy_adapter(c.good, c.tmp / os.fsdecode(b"caf\xff-adapter"))
    (folder / "adapter_config.json").write_text("{")
    return folder


@case("adapter name with control characters", "config", None, "not valid json", name="evil\nname\x1b[31m")
def _(c: Ctx):
    folder = c.copy()
    (folder / "adapter_config.json").write_text("{")
    return folder


# -- adapter_config.json as a file ------------------------------------------------------------------------

@case("missing config", "config", None, "missing")
def _(c: Ctx):
    folder = c.copy()
    (folder / "adapter_config.json").unlink()
    return folder


@case("invalid JSON", "config", None, "not valid json")
def _(c: Ctx):
    folder = c.copy()
    text = (folder / "adapter_config.json").read_text()
    (folder / "adapter_config.json").write_text(text[: len(text) // 2])
    return folder


@case("config not UTF-8", "config", None, "not valid json")
def _(c: Ctx):
    folder = c.copy()
    (folder / "adapter_config.json").write_bytes(b'{"r": 4, "target_modules": "\xff\xfe"}')
    return folder


@case("config is a JSON list", "config", None, "not an object")
def _(c: Ctx):
    folder = c.copy()
    (folder / "adapter_config.json").write_text("[1, 2]")
    return folder


@case("config nests 100k deep", "config", None, "too deeply")
def _(c: Ctx):
    folder = c.copy()
    (folder / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    return folder


@case("config is a FIFO", "config", None, "fifo", "not a regular file", max_s=5)
def _(c: Ctx):
    folder = c.copy()
    (folder / "adapter_config.json").unlink()
    os.mkfifo(folder / "adapter_config.json")
    return folder


@case("config links to /dev/zero", "config", None, "character device", max_s=5)
def _(c: Ctx):
    folder = c.copy()
    (folder / "adapter_config.json").unlink()
    os.symlink("/dev/zero", folder / "adapter_config.json")
    return folder


@case("config is a directory", "config", None, "a directory")
def _(c: Ctx):
    folder = c.copy()
    (folder / "adapter_config.json").unlink()
    (folder / "adapter_config.json").mkdir()
    return folder


@case("config is a 1 GiB sparse file", "config", None, "bytes, more than", max_s=5)
def _(c: Ctx):
    folder = c.copy()
    os.truncate(folder / "adapter_config.json", 1 << 30)
    return folder


# -- adapter_config.json fields ---------------------------------------------------------------------------

def _cfg(**changes):
    def build(c: Ctx):
        return edit_config(c.copy(), **changes)
    return build


case("r is a string", "config", "field 'r'")(_cfg(r="4"))
case("r is zero", "config", "field 'r'")(_cfg(r=0))
case("lora_alpha is a string", "config", "field 'lora_alpha'")(_cfg(lora_alpha="8"))
case("lora_alpha is NaN", "config", "field 'lora_alpha'")(_cfg(lora_alpha=float("nan")))
case("target_modules is a number", "config", "field 'target_modules'")(_cfg(target_modules=5))
case("target_modules is empty", "config", "field 'target_modules'")(_cfg(target_modules=[]))
case("use_rslora is a string", "config", "field 'use_rslora'")(_cfg(use_rslora="yes"))
case("rank_pattern is a list", "config", "field 'rank_pattern'")(_cfg(rank_pattern=["q_proj", 8]))
case("layers_to_transform is a string", "config", "field 'layers_to_transform'")(
    _cfg(target_modules=["q_proj"], layers_to_transform="0"))
case("unknown peft_type IA3", "config", "field 'peft_type'", "IA3")(_cfg(peft_type="IA3"))
case("unknown peft_type LOHA", "config", "field 'peft_type'", "LOHA")(_cfg(peft_type="LOHA"))
case("peft_type is a number", "config", "field 'peft_type'")(_cfg(peft_type=7))
case("use_dora", "config", "field 'use_dora'", "merge")(_cfg(use_dora=True))
case("modules_to_save", "config", "field 'modules_to_save'", "merge")(_cfg(modules_to_save=["lm_head"]))
case("init_lora_weights pissa", "config", "field 'init_lora_weights'", "converted")(_cfg(init_lora_weights="pissa"))
case("regex does not compile", "config", "field 'target_modules'", "does not compile")(
    _cfg(target_modules=r"^(model.*\.(q_proj|v_proj)$"))
case("exclude regex does not compile", "config", "field 'exclude_modules'", "does not compile")(
    _cfg(exclude_modules=r"model.*[lm_head"))
case("regex matches nothing", "config", "field 'target_modules'", "matches none")(
    _cfg(target_modules=r"^vision_tower\..*\.qkv$"))
case("list matches nothing", "config", "field 'target_modules'", "matches none")(
    _cfg(target_modules=["no_such_proj"]))
case("rank disagrees with r", "safetensors", "field 'r'", "rank 4")(_cfg(r=16))
case("rank_pattern disagrees with the tensors", "safetensors", "module 'model.layers.", "rank")(
    _cfg(rank_pattern={"q_proj": 8}))
case("config targets fewer modules than the tensors", "safetensors", "module 'model.layers.", "does not target")(
    _cfg(target_modules=["q_proj"]))

# Classic nested quantifier with a lookbehind that can never hold: the regex engine tries every way to
# split the name before giving up. Without the deadline one module name takes minutes.
BACKTRACK = r"(?:(\w|\.|[a-z])+)+(?<=x)"
case("regex built for catastrophic backtracking", "config", "field 'target_modules'", "backtracking",
     max_s=REGEX_BUDGET_S + 6)(_cfg(target_modules=BACKTRACK))
case("rank_pattern key built for catastrophic backtracking", "config", "field 'rank_pattern'",
     max_s=REGEX_BUDGET_S + 6)(_cfg(rank_pattern={BACKTRACK: 4}))


# -- weights file as a file -------------------------------------------------------------------------------

def _malicious_bin(folder: Path, marker: Path) -> Path:
    """A zip .bin like torch.save writes, whose pickle runs ``touch marker`` when loaded unsafely."""
    state = {key(Q0, "lora_A"): torch.zeros(4, 64), "extra": RunsCode(marker)}
    buf = io.BytesIO()
    torch.save(state, buf)
    (folder / "adapter_model.bin").write_bytes(buf.getvalue())
    return folder / "adapter_model.bin"


@case("no weights file", "folder", None, "neither", "adapter_config.json")
def _(c: Ctx):
    folder = c.copy()
    (folder / "adapter_model.safetensors").unlink()
    return folder


@case("weights file is a FIFO, a code-running .bin beside it", "safetensors", None, "fifo", max_s=5,
      tags={"marker"})
def _(c: Ctx):
    folder = c.copy()
    (folder / "adapter_model.safetensors").unlink()
    os.mkfifo(folder / "adapter_model.safetensors")
    _malicious_bin(folder, c.marker)
    return folder


@case("weights file is a directory", "safetensors", None, "a directory")
def _(c: Ctx):
    folder = c.copy()
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.safetensors").mkdir()
    return folder


@case("weights link points at its own folder (directory loop)", "safetensors", None, "a directory")
def _(c: Ctx):
    folder = c.copy()
    (folder / "adapter_model.safetensors").unlink()
    os.symlink(".", folder / "adapter_model.safetensors")
    return folder


@case("weights file is a symlink loop", "safetensors", None, "loop")
def _(c: Ctx):
    folder = c.copy()
    (folder / "adapter_model.safetensors").unlink()
    os.symlink("adapter_model.safetensors", folder / "adapter_model.safetensors")
    return folder


@case("weights file links to /dev/urandom", "safetensors", None, "character device", max_s=5)
def _(c: Ctx):
    folder = c.copy()
    (folder / "adapter_model.safetensors").unlink()
    os.symlink("/dev/urandom", folder / "adapter_model.safetensors")
    return folder


@case("interrupted Hub download: dangling safetensors link, code-running .bin beside it", "safetensors", None,
      "link whose target is missing", tags={"marker"})
def _(c: Ctx):
    folder = c.copy()
    (folder / "adapter_model.safetensors").unlink()
    os.symlink("../blobs/0123abcd", folder / "adapter_model.safetensors")
    _malicious_bin(folder, c.marker)
    return folder


# -- safetensors contents ---------------------------------------------------------------------------------

def _st(transform: Callable[[bytes], bytes]):
    def build(c: Ctx):
        folder = c.copy()
        file = folder / "adapter_model.safetensors"
        file.write_bytes(transform(file.read_bytes()))
        return folder
    return build


case("safetensors is empty", "safetensors", None, "0 bytes")(_st(lambda b: b""))
case("safetensors truncated to 5 bytes", "safetensors", None, "truncated")(_st(lambda b: b[:5]))
case("safetensors truncated in the header", "safetensors", "field 'header length'", "truncated")(
    _st(lambda b: b[:40]))
case("safetensors truncated in the data", "safetensors", "field 'base_model.model.", "truncated")(
    _st(lambda b: b[: len(b) - 100]))
case("safetensors header claims 8 GiB", "safetensors", "field 'header length'", "8589934592",
     tags={"no-alloc"})(_st(lambda b: (8 << 30).to_bytes(8, "little") + b[8:]))
case("safetensors header is not JSON", "safetensors", "field 'header'", "not valid json")(
    _st(lambda b: safetensors_bytes(b"{not json at all}", b[8 + int.from_bytes(b[:8], "little"):])))
case("safetensors header is a JSON list", "safetensors", "field 'header'", "not an object")(
    _st(lambda b: safetensors_bytes([1, 2, 3])))
case("safetensors tensor name is not UTF-8", "safetensors", "field 'header'", "not utf-8")(
    _st(lambda b: safetensors_bytes(b'{"base_model.model.\xff\xfe": {"dtype": "F32", "shape": [1], '
                                    b'"data_offsets": [0, 4]}}', b"\0" * 4)))
case("safetensors names a tensor twice", "safetensors", "field 'header'", "twice")(
    _st(lambda b: safetensors_bytes(
        b'{"%s": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
        b'"%s": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
        % (key(Q0, "lora_A").encode(), key(Q0, "lora_A").encode()), b"\0" * 8)))
case("safetensors offsets past the end", "safetensors", "field 'base_model.model.", "data section")(
    _st(lambda b: safetensors_bytes({key(Q0, "lora_A"): {"dtype": "F32", "shape": [4, 64],
                                                         "data_offsets": [0, 1 << 40]}}, b"\0" * 64)))
case("safetensors shape does not fit its bytes", "safetensors", "field 'base_model.model.", "needs")(
    _st(lambda b: safetensors_bytes({key(Q0, "lora_A"): {"dtype": "F32", "shape": [400, 64],
                                                         "data_offsets": [0, 1024]}}, b"\0" * 1024)))
case("safetensors entry without dtype", "safetensors", "field 'base_model.model.", "malformed")(
    _st(lambda b: safetensors_bytes({key(Q0, "lora_A"): {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)))
case("safetensors with an unknown dtype", "safetensors", None, "cannot be read as safetensors")(
    _st(lambda b: safetensors_bytes({key(Q0, "lora_A"): {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}},
                                    b"\0" * 4)))


@case("safetensors holds no tensors", "safetensors", None, "no tensors")
def _(c: Ctx):
    folder = c.copy()
    save_file({}, str(folder / "adapter_model.safetensors"))
    return folder


# -- tensors ----------------------------------------------------------------------------------------------

def _tensors(fn: Callable[[dict], dict]):
    def build(c: Ctx):
        return edit_tensors(c.copy(), fn)
    return build


def _set(k: str, value: torch.Tensor) -> Callable[[dict], dict]:
    def fn(s: dict) -> dict:
        s[k] = value
        return s
    return fn


def _drop(k: str) -> Callable[[dict], dict]:
    def fn(s: dict) -> dict:
        del s[k]
        return s
    return fn


def _rename(old: str, new: str) -> Callable[[dict], dict]:
    return lambda s: {k.replace(old, new): v for k, v in s.items()}


case("lora_A without its lora_B", "safetensors", f"module '{Q0}'", "no lora_B")(
    _tensors(_drop(key(Q0, "lora_B"))))
case("lora_B without its lora_A", "safetensors", f"module '{Q0}'", "no lora_A")(
    _tensors(_drop(key(Q0, "lora_A"))))
case("lora_A and lora_B ranks disagree", "safetensors", f"module '{Q0}'", "disagree")(
    _tensors(_set(key(Q0, "lora_B"), torch.ones(64, 3))))
case("NaN in lora_A", "safetensors", f"module '{Q0}'", "nan or inf")(
    _tensors(_set(key(Q0, "lora_A"), torch.full((4, 64), float("nan")))))
case("Inf in lora_B", "safetensors", f"module '{DOWN1}'", "nan or inf")(
    _tensors(_set(key(DOWN1, "lora_B"), torch.full((64, 4), float("inf")))))
case("NaN in a float8 lora_A", "safetensors", f"module '{Q0}'", "nan or inf")(
    _tensors(_set(key(Q0, "lora_A"), torch.full((4, 64), float("nan")).to(torch.float8_e5m2))))
case("empty tensors (rank 0)", "safetensors", f"module '{Q0}'", "empty")(
    _tensors(lambda s: {**s, key(Q0, "lora_A"): torch.zeros(0, 64), key(Q0, "lora_B"): torch.zeros(64, 0)}))
case("integer lora_A", "safetensors", f"module '{Q0}'", "int32")(
    _tensors(_set(key(Q0, "lora_A"), torch.ones(4, 64, dtype=torch.int32))))
case("bool lora_B", "safetensors", f"module '{Q0}'", "bool")(
    _tensors(_set(key(Q0, "lora_B"), torch.ones(64, 4, dtype=torch.bool))))
case("1-D lora_A", "safetensors", f"module '{Q0}'", "2-d")(_tensors(_set(key(Q0, "lora_A"), torch.ones(256))))
case("3-D lora_B", "safetensors", f"module '{Q0}'", "2-d")(_tensors(_set(key(Q0, "lora_B"), torch.ones(4, 16, 4))))
case("tensor name without PEFT's prefix", "safetensors", None, "does not start with")(
    _tensors(lambda s: {k.removeprefix(PREFIX): v for k, v in s.items()}))
case("tensor names carry the adapter name", "safetensors", "module 'model.layers.0.", "default", "save_pretrained")(
    _tensors(lambda s: {k.replace(".weight", ".default.weight"): v for k, v in s.items()}))
case("tensors for modules that do not exist", "safetensors", "module 'model.layers.7.", "does not have")(
    _tensors(_rename("layers.1.", "layers.7.")))
case("non-ASCII tensor names", "safetensors", "module 'model.layers.0.self_attn.q_pröj'", "does not have")(
    _tensors(_rename("q_proj", "q_pröj")))
case("lora_A has another model's width", "safetensors", f"module '{Q0}'", "different base model")(
    _tensors(_set(key(Q0, "lora_A"), torch.ones(4, 32))))
case("embedding LoRA", "safetensors", None, "embedding")(
    _tensors(_set(f"{PREFIX}model.embed_tokens.lora_embedding_A", torch.ones(4, 128))))
case("DoRA magnitude vector", "safetensors", None, "dora")(
    _tensors(_set(f"{PREFIX}{Q0}.lora_magnitude_vector", torch.ones(64))))


@case("only full weights, no LoRA tensors", "safetensors", None, "no lora_a/lora_b", tags={"nowhere"})
def _(c: Ctx):
    folder = c.copy()
    save_file({f"{PREFIX}{DOWN1}.weight": torch.ones(64, 128)}, str(folder / "adapter_model.safetensors"))
    return folder


@case("adapter of another architecture (InternLM2 on Qwen2)", "safetensors", "module 'model.layers.0.",
      "does not have", tags={"nowhere"})
def _(c: Ctx):
    return make_peft_adapter(c.tiny_model("internlm2"), c.tmp / "internlm2-adapter",
                             target_modules=["wqkv", "w2"], r=4)


@case("adapter of a wider Qwen2 (intermediate 96)", "safetensors", "module 'model.layers.", "different base model")
def _(c: Ctx):
    from transformers import AutoConfig, Qwen2ForCausalLM

    other = c.tmp / "wider-qwen2"
    config = AutoConfig.from_pretrained(str(c.base_dir))
    config.intermediate_size = 96
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(str(other))
    return make_peft_adapter(other, c.tmp / "wider-adapter", target_modules=["down_proj", "up_proj"], r=4)


# -- pickles ----------------------------------------------------------------------------------------------

def _zip_pickle(marker: Path, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    torch.save({key(Q0, "lora_A"): torch.zeros(4, 64), "x": RunsCode(marker)}, buf, pickle_protocol=protocol)
    return buf.getvalue()


def _bin_only(c: Ctx, data: bytes) -> Path:
    folder = c.copy()
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(data)
    return folder


@case(".bin whose pickle runs code (torch.save zip)", "bin", "field 'pickle'", "posix.system", "nothing in it",
      tags={"marker"})
def _(c: Ctx):
    live_payload_check(_zip_pickle, c.tmp / "control", lambda b: torch.load(io.BytesIO(b), weights_only=False))
    return _bin_only(c, _zip_pickle(c.marker))


@case(".bin whose pickle runs code (protocol 4, STACK_GLOBAL)", "bin", "field 'pickle'", "stack_global",
      tags={"marker"})
def _(c: Ctx):
    live_payload_check(lambda m: _zip_pickle(m, 4), c.tmp / "control",
                       lambda b: torch.load(io.BytesIO(b), weights_only=False))
    return _bin_only(c, _zip_pickle(c.marker, 4))


@case(".bin that is a raw pickle running code", "bin", None, "not a pytorch zip", tags={"marker"})
def _(c: Ctx):
    def raw(m: Path) -> bytes:
        return pickle.dumps({key(Q0, "lora_A"): RunsCode(m)}, protocol=2)
    live_payload_check(raw, c.tmp / "control", pickle.loads)
    return _bin_only(c, raw(c.marker))


@case(".bin holding a list, not a dict", "bin", None, "flat mapping")
def _(c: Ctx):
    buf = io.BytesIO()
    torch.save([torch.zeros(4, 64)], buf)
    return _bin_only(c, buf.getvalue())


@case(".bin truncated", "bin", None, "pytorch zip")
def _(c: Ctx):
    buf = io.BytesIO()
    torch.save({key(Q0, "lora_A"): torch.zeros(4, 64)}, buf)
    return _bin_only(c, buf.getvalue()[:200])


@case(".bin zip without a data.pkl", "bin", None, "data.pkl")
def _(c: Ctx):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/readme.txt", "hello")
    return _bin_only(c, buf.getvalue())


@case("broken safetensors next to a good .bin (never falls back)", "safetensors", "field 'header length'")
def _(c: Ctx):
    folder = c.copy()
    buf = io.BytesIO()
    torch.save(load_file(str(folder / "adapter_model.safetensors")), buf)
    (folder / "adapter_model.bin").write_bytes(buf.getvalue())
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    return folder


# -- the corpus test --------------------------------------------------------------------------------------

def test_corpus_is_large_enough():
    assert len(CASES) >= 40, len(CASES)


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input(case_id, model, good_adapter, base_dir, tiny_model, tmp_path):
    model, state = model
    c = CASES[case_id]
    ctx = Ctx(tmp_path, good_adapter, base_dir, tiny_model, tmp_path / "MARKER-code-ran")
    path = c.build(ctx)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    start = time.perf_counter()
    with deadline(c.max_s + 10), pytest.raises(AdapterError) as info:
        load(model, {GOOD: str(good_adapter), c.name: path})
    elapsed = time.perf_counter() - start

    err, msg = info.value, str(info.value)
    assert err.adapter == c.name and repr(c.name) in msg, msg
    expected_file = {
        "folder": lambda: os.fspath(path),
        "config": lambda: os.path.join(os.fspath(path), "adapter_config.json"),
        "safetensors": lambda: os.path.join(os.fspath(path), "adapter_model.safetensors"),
        "bin": lambda: os.path.join(os.fspath(path), "adapter_model.bin"),
    }
    if c.file is not None:
        assert f"file {printable(expected_file[c.file]())}" in msg, msg
    if c.where is not None:
        assert c.where in msg, msg
        assert err.field is not None or err.module is not None
    for word in c.expect:
        assert word.lower() in msg.lower(), (word, msg)
    assert err.fix and " Fix: " in msg, msg
    msg.encode("utf-8")  # printable: no lone surrogates, which would crash a UTF-8 log stream
    assert msg.isprintable(), repr(msg)
    assert elapsed < c.max_s, f"took {elapsed:.1f} s"

    assert state.differences() == []
    assert not ctx.marker.exists(), "the pickle ran code"
    if "no-alloc" in c.tags:  # the 8 GiB header length was never allocated
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
        assert grown_kib < 512 * 1024, f"peak memory grew by {grown_kib} KiB"


def test_backtracking_regex_really_backtracks():
    """Control for the backtracking cases: the pattern hangs without a deadline (here: hits a 0.5 s one)."""
    import regex

    with pytest.raises(TimeoutError):
        regex.compile(BACKTRACK).fullmatch("model.layers.0.self_attn.q_proj", timeout=0.5)


# -- cases that need another user or another process ------------------------------------------------------

@pytest.fixture
def world_tmp(good_adapter):
    """A folder outside pytest's 0700 tmp root, so user ``nobody`` can reach what is not locked."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="regex-lora-perm-"))
    root.chmod(0o755)
    folder = copy_adapter(good_adapter, root / "adapter")
    folder.chmod(0o755)
    for f in folder.iterdir():
        f.chmod(0o644)
    yield folder
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    shutil.rmtree(root)


def _load_in_child(model, state, folder: Path) -> dict:
    """In the (forked) child: load, and report the error and what the failure left on the child's model."""
    try:
        load(model, {BAD: str(folder)})
    except AdapterError as exc:
        return {"msg": str(exc), "file": exc.file, "left": state.differences()}
    return {"msg": None, "file": None, "left": state.differences()}


@pytest.mark.parametrize("what", ["folder", "adapter_config.json", "adapter_model.safetensors"])
def test_permission_denied(what, model, world_tmp):
    """Root reads everything, so the load runs in a forked child as ``nobody``, against root's 0600 files."""
    model, state = model
    target = world_tmp if what == "folder" else world_tmp / what
    target.chmod(0o700 if what == "folder" else 0o600)
    result = run_forked(lambda: _load_in_child(model, state, world_tmp), 60, as_nobody=True)
    assert "ok" in result, result
    out = result["ok"]
    assert out["msg"] is not None, "the load succeeded as nobody: the permissions did not bite"
    assert "permission denied" in out["msg"] and repr(BAD) in out["msg"] and " Fix: " in out["msg"], out
    assert out["file"] == (str(world_tmp) if what == "folder" else str(target)), out
    assert out["left"] == []
    assert state.differences() == []


COMPILE_BOMB = "((model{1000}){1000}){1000}"


def test_regex_that_takes_forever_to_compile(model, good_adapter, tmp_path):
    """A regex whose *compilation* explodes (nested counted repeats); matching deadlines cannot stop it.

    Runs in a forked child so that a hang fails this test (after 8 s) instead of hanging the suite.
    """
    model, state = model
    folder = edit_config(copy_adapter(good_adapter, tmp_path / "bomb"), target_modules=COMPILE_BOMB)
    result = run_forked(lambda: _load_in_child(model, state, folder), timeout=8)
    assert "timeout" not in result, "compiling the regex hung the loader for 8 s"
    assert "ok" in result, result
    msg, left = result["ok"]["msg"], result["ok"]["left"]
    assert msg is not None and "field 'target_modules'" in msg and " Fix: " in msg, msg
    assert left == []


def test_compile_bomb_control():
    """Control for the test above: a tenth of the bomb already takes measurable time to compile."""
    import regex

    start = time.perf_counter()
    regex.compile("(model{100}){100}")
    small = time.perf_counter() - start
    start = time.perf_counter()
    regex.compile("((model{100}){100}){10}")
    assert time.perf_counter() - start > 3 * small


# -- never a silent base model ----------------------------------------------------------------------------

def test_adapter_landing_nowhere_is_an_error(model, good_adapter, base_dir, tiny_model, tmp_path):
    """Every way an adapter could add nothing to this model is refused, never served as the base model.

    (An adapter whose tensors are all zero does land and is served: PEFT computes the base model too.)
    """
    model, state = model
    ctx = Ctx(tmp_path, good_adapter, base_dir, tiny_model, tmp_path / "marker")
    nowhere = [n for n, c in CASES.items() if "nowhere" in c.tags] + [
        "regex matches nothing", "list matches nothing", "safetensors holds no tensors",
        "tensors for modules that do not exist"]
    for name in nowhere:
        ctx.tmp = tmp_path / name.replace(" ", "_")
        ctx.tmp.mkdir()
        with pytest.raises(AdapterError, match=repr(BAD)):
            load(model, {BAD: CASES[name].build(ctx)})
        assert state.differences() == []


# -- LMDEPLOY_REGEX_LORA_ON_ERROR=skip ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def three(base_dir, tmp_path_factory):
    """Adapters a, c (good, different targets and ranks) and the merged references; b is damaged per test."""
    from lmdeploy_regex_lora.testing.compare import load_models
    from tests.support.peft_fixtures import merge_adapter_checkpoint

    root = tmp_path_factory.mktemp("three")
    a = make_peft_adapter(base_dir, root / "a", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, seed=1)
    c = make_peft_adapter(base_dir, root / "c", target_modules=r"^(model.*\.(o_proj|down_proj))$", r=8,
                          lora_alpha=16, seed=2)
    b = make_peft_adapter(base_dir, root / "b", target_modules=["q_proj", "up_proj"], r=16, lora_alpha=16, seed=4)
    base, merged = load_models(base_dir, {1: merge_adapter_checkpoint(base_dir, a, root / "a-merged"),
                                          3: merge_adapter_checkpoint(base_dir, c, root / "c-merged")})
    return {"a": a, "b": b, "c": c}, base, merged


def _check_skipped(model, base, merged, caplog, reason_word: str):
    from lmdeploy.pytorch.adapter.adapter import AdapterManager

    from lmdeploy_regex_lora.testing.compare import compare, linear_modules, slot_delta

    ids = AdapterManager({"a": "", "b": "", "c": ""}).adapter_id_map  # LMDeploy's own numbering
    assert (ids["a"], ids["b"], ids["c"]) == (1, 2, 3)
    stats = compare(model, base, merged)  # a and c exactly as PEFT merges them, at their own ids
    assert stats["targeted"] > 0
    for name, mod in linear_modules(model).items():
        for lora in mod.lora_adapters.values():
            assert int(lora.adapter_info.ranks[2]) == 0, name
        assert torch.count_nonzero(slot_delta(mod, 2)) == 0, name  # b: exactly the base model
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "lmdeploy.regex_lora"]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    line = errors[0].getMessage()
    assert "'b' (id 2) is NOT served" in line and "BASE MODEL" in line and reason_word in line, line


def test_skip_serves_the_others_and_keeps_ids(model, three, monkeypatch, caplog, tmp_path):
    model, state = model
    adapters, base, merged = three
    bad_b = copy_adapter(adapters["b"], tmp_path / "b")
    (bad_b / "adapter_config.json").write_text("{ truncated")
    monkeypatch.setenv("LMDEPLOY_REGEX_LORA_ON_ERROR", "skip")
    caplog.set_level(logging.INFO, logger="lmdeploy.regex_lora")
    plan = load(model, {"a": adapters["a"], "b": bad_b, "c": adapters["c"]})
    _check_skipped(model, base, merged, caplog, "not valid JSON")
    assert [a.name for a in plan.adapters if a.naming.startswith("NOT SERVED")] == ["b"]


def test_skip_also_covers_failures_while_filling(model, three, monkeypatch, caplog):
    """Fault injection: ``slots._place`` raises for adapter id 2 only; b is skipped, a and c load."""
    from lmdeploy_regex_lora.serve import slots

    model, state = model
    adapters, base, merged = three
    original = slots._place

    def fail_for_b(lora, adapter_id, a, b):
        if adapter_id == 2:
            raise RuntimeError("injected fault")
        return original(lora, adapter_id, a, b)

    monkeypatch.setattr(slots, "_place", fail_for_b)
    monkeypatch.setenv("LMDEPLOY_REGEX_LORA_ON_ERROR", "skip")
    caplog.set_level(logging.INFO, logger="lmdeploy.regex_lora")
    load(model, {"a": adapters["a"], "b": adapters["b"], "c": adapters["c"]})
    _check_skipped(model, base, merged, caplog, "injected fault")


def test_skip_everything_bad_leaves_the_base_model(model, good_adapter, monkeypatch, caplog, tmp_path):
    model, state = model
    monkeypatch.setenv("LMDEPLOY_REGEX_LORA_ON_ERROR", "skip")
    caplog.set_level(logging.ERROR, logger="lmdeploy.regex_lora")
    plan = load(model, {"x": tmp_path / "missing", "y": edit_config(copy_adapter(good_adapter, tmp_path / "y"), r=0)})
    assert plan.slots == [] and state.differences() == []
    assert sorted(r.getMessage().split("'")[1] for r in caplog.records if r.levelno == logging.ERROR) == ["x", "y"]


def test_default_raises_and_typo_in_the_mode_is_an_error(model, good_adapter, monkeypatch, tmp_path):
    model, state = model
    bad = edit_config(copy_adapter(good_adapter, tmp_path / "bad"), r=0)
    with pytest.raises(AdapterError, match="field 'r'"):
        load(model, {"a": good_adapter, "b": bad})
    monkeypatch.setenv("LMDEPLOY_REGEX_LORA_ON_ERROR", "skipp")
    with pytest.raises(AdapterError, match="LMDEPLOY_REGEX_LORA_ON_ERROR"):
        load(model, {"a": good_adapter})
    assert state.differences() == []


# -- the plugin's own failures (fault injection) -----------------------------------------------------------

def _nth_call_raises(n: int, fn):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError(f"injected fault on call {n}")
        return fn(*args, **kwargs)

    return wrapper, calls


def _assert_clean_failure(model, state, adapters, cause_type=RuntimeError):
    import lmdeploy.pytorch.models.patch as patch

    import lmdeploy_regex_lora
    from lmdeploy_regex_lora.serve.hook import is_wrapper

    with pytest.raises(AdapterError) as info:
        load(model, adapters)
    err = info.value
    assert isinstance(err.__cause__, cause_type) and "injected fault" in str(err), err
    assert "bug in lmdeploy-regex-lora" in str(err)
    assert state.differences() == []
    assert lmdeploy_regex_lora.is_installed() and is_wrapper(patch.add_adapters)
    return err


@pytest.fixture(scope="module")
def with_lm_head(base_dir, tmp_path_factory):
    """q/v projections plus the LM head, so the attach phase also patches LMDeploy's step context manager."""
    return make_peft_adapter(base_dir, tmp_path_factory.mktemp("lmh") / "adapter",
                             target_modules=["q_proj", "v_proj", "lm_head"], r=4, seed=5)


def test_fault_while_building_slots(model, good_adapter, monkeypatch):
    """Fault injection: the second ``slots._build_slot`` call raises (before anything is attached)."""
    from lmdeploy_regex_lora.serve import slots
    from lmdeploy_regex_lora.serve.loader import resolve

    model, state = model
    second = resolve(model, {"only": good_adapter}).plan.slots[1].hf_name  # the plan's order
    wrapper, calls = _nth_call_raises(2, slots._build_slot)
    monkeypatch.setattr(slots, "_build_slot", wrapper)
    err = _assert_clean_failure(model, state, {"only": good_adapter})
    assert err.adapter == "only" and err.module == second, str(err)
    monkeypatch.undo()
    load(model, {"only": good_adapter})  # nothing half-done was left: a clean load works afterwards
    assert state.lora_slots()


def test_fault_while_filling_slots(model, good_adapter, monkeypatch):
    """Fault injection: ``slots._place`` (copying one module's A and B into its slot) raises on its fifth call."""
    from lmdeploy_regex_lora.serve import slots
    from lmdeploy_regex_lora.serve.loader import resolve

    model, state = model
    fifth = resolve(model, {"only": good_adapter}).adapters[0].plan.modules[4].hf_name  # filled in plan order
    wrapper, calls = _nth_call_raises(5, slots._place)
    monkeypatch.setattr(slots, "_place", wrapper)
    err = _assert_clean_failure(model, state, {"only": good_adapter})
    assert calls["n"] == 5
    assert err.adapter == "only" and err.module == fifth, str(err)


def test_fault_while_attaching_rolls_back(model, with_lm_head, monkeypatch):
    """Fault injection: the third slot attached (``ModuleDict.__setitem__``) raises after two are attached.

    The LM-head slot makes install patch LMDeploy's step context manager first; it must be undone too.
    """
    from lmdeploy_regex_lora.serve.loader import resolve

    model, state = model
    plan = resolve(model, {"lmh": with_lm_head}).plan
    assert any(s.hf_name.endswith("lm_head") for s in plan.slots)
    third = plan.slots[2].hf_name  # attached in plan order
    wrapper, calls = _nth_call_raises(3, torch.nn.ModuleDict.__setitem__)
    monkeypatch.setattr(torch.nn.ModuleDict, "__setitem__", wrapper)
    err = _assert_clean_failure(model, state, {"lmh": with_lm_head})
    assert calls["n"] == 3
    assert err.adapter == "lmh" and err.module == third, str(err)
    assert err.file == str(with_lm_head / "adapter_model.safetensors"), str(err)


def test_fault_while_planning(model, good_adapter, monkeypatch):
    """Fault injection: the planner raises a plain KeyError for the second adapter."""
    from lmdeploy_regex_lora.serve import loader

    model, state = model
    wrapper, calls = _nth_call_raises(2, loader.resolve_adapter)
    monkeypatch.setattr(loader, "resolve_adapter", wrapper)
    err = _assert_clean_failure(model, state, {"a": good_adapter, "b": good_adapter})
    assert err.adapter == "b" and f"file {good_adapter}" in str(err), str(err)


def test_error_survives_pickling():
    """LMDeploy's engine process and Ray workers send the error back pickled; it must arrive whole."""
    err = AdapterError("x.", adapter="a", file="/f", field="r", module="m", fix="do y.")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and (back.adapter, back.field, back.module) == ("a", "r", "m")


def test_message_of_a_hostile_name_is_one_printable_line():
    err = AdapterError("bad\nline.", adapter="a\x1b[2J", file=os.fsdecode(b"/tmp/\xff\n"), fix="x")
    text = str(err)
    assert text.isprintable() and "\n" not in text and "\\xff" in text
    text.encode("utf-8")
    assert json.loads(json.dumps(err.file)) == err.file  # attributes keep the raw value
