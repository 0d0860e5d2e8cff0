"""What the hardening must not break: odd but legitimate adapter folders still serve exactly PEFT's merge.

Each variant is loaded through LMDeploy's ``add_adapters`` with the plugin installed and checked, module
by module, against PEFT's ``merge_and_unload`` loaded natively by LMDeploy (:func:`verify.compare`).
An audit hook (``sys.addaudithook``) records every file the load opens or changes, which proves what a
root test cannot prove with permissions: the plugin never writes, and never opens a ``.bin`` that has a
safetensors file next to it.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from lmdeploy_regex_lora.testing.compare import compare, linear_modules, load_models
from tests.support.bad_inputs import ModelState, RunsCode, live_payload_check, load
from tests.support.peft_fixtures import make_peft_adapter, merge_adapter_checkpoint

TARGET = r"^(model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj))$"

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_CHANGING_EVENTS = ("os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod", "os.chown", "os.truncate",
                    "os.utime", "os.symlink", "os.link", "os.chflags", "shutil.")
_audit: dict = {"on": False, "opened": [], "writes": []}


def _hook(event: str, args: tuple) -> None:
    if not _audit["on"]:
        return
    if event == "open":
        path, mode, flags = args
        path = os.fsdecode(path) if isinstance(path, (str, bytes)) else str(path)
        _audit["opened"].append(path)
        if (isinstance(mode, str) and any(ch in mode for ch in "wax+")) or \
                (isinstance(flags, int) and flags & _WRITE_FLAGS):
            _audit["writes"].append((event, path))
    elif event.startswith(_CHANGING_EVENTS):
        _audit["writes"].append((event, args[0] if args else None))


sys.addaudithook(_hook)  # cannot be removed; it does nothing unless a test switches it on


class Audit:
    """Everything opened (and written or changed) while the block runs."""

    def __enter__(self):
        _audit.update(on=True, opened=[], writes=[])
        return self

    def __exit__(self, *exc):
        _audit["on"] = False
        self.opened, self.writes = list(_audit["opened"]), list(_audit["writes"])

    def touched(self, root: Path) -> list[str]:
        real = os.path.realpath(root)
        return [p for p in self.opened if os.path.realpath(p).startswith(real)]


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory):
    """A real PEFT adapter, PEFT's merge of it, and LMDeploy models: base, merged, and one to serve from."""
    from lmdeploy_regex_lora.testing.build import build_lmdeploy_model

    base_dir = tiny_model("qwen2")
    root = tmp_path_factory.mktemp("keep")
    adapter = make_peft_adapter(base_dir, root / "adapter", target_modules=TARGET, r=8, lora_alpha=16, seed=7)
    base, merged = load_models(base_dir, {1: merge_adapter_checkpoint(base_dir, adapter, root / "merged")})
    served = build_lmdeploy_model(base_dir)
    return {"adapter": adapter, "base": base, "merged": merged, "served": served, "state": ModelState(served)}


@pytest.fixture
def serve(world, plugin_installed):
    """``serve(path)``: load one adapter as id 1, check it equals the merge, return the audit of the load."""
    def run(path) -> Audit:
        with Audit() as audit:
            load(world["served"], {"x": path})
        stats = compare(world["served"], world["base"], world["merged"])
        # The regex targets every decoder linear; LMDeploy packs them into qkv / gate_up modules.
        decoder = [n for n in linear_modules(world["served"]) if ".layers." in n]
        assert stats["targeted"] == len(decoder) > 0, stats
        world["state"].reset()
        return audit

    yield run
    world["state"].reset()


def _tree_digest(root: Path) -> dict:
    """Names, modes, times and contents of everything under ``root`` (links not followed)."""
    out = {}
    for p in sorted([root, *root.rglob("*")]):
        st = p.lstat()
        body = p.read_bytes() if p.is_file() and not p.is_symlink() else os.readlink(p) if p.is_symlink() else b""
        out[str(p)] = (st.st_mode, st.st_mtime_ns, st.st_ctime_ns, hashlib.sha256(
            body if isinstance(body, bytes) else body.encode()).hexdigest())
    return out


def test_hugging_face_cache_layout(world, serve, tmp_path):
    """snapshots/<rev>/* are relative links into blobs/, outside the snapshot folder, as huggingface_hub lays out."""
    repo = tmp_path / "hub" / "models--someone--qwen2-lora"
    blobs, snap = repo / "blobs", repo / "snapshots" / ("0" * 40)
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for f in world["adapter"].iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy2(f, blobs / digest)
        os.symlink(os.path.join("..", "..", "blobs", digest), snap / f.name)
    assert all(p.is_symlink() and not p.resolve().is_relative_to(snap) for p in snap.iterdir())
    audit = serve(snap)
    assert audit.writes == []


def test_safetensors_wins_and_the_bin_is_never_opened(world, serve, tmp_path):
    """Both weight files present: the safetensors is loaded; the .bin (which would run code) is not even opened."""
    folder = tmp_path / "both"
    shutil.copytree(world["adapter"], folder)
    marker = tmp_path / "MARKER-code-ran"

    def payload(m: Path) -> bytes:
        buf = io.BytesIO()
        torch.save({"x": RunsCode(m)}, buf)
        return buf.getvalue()

    live_payload_check(payload, tmp_path / "control", lambda b: torch.load(io.BytesIO(b), weights_only=False))
    (folder / "adapter_model.bin").write_bytes(payload(marker))
    audit = serve(folder)
    assert str(folder / "adapter_model.safetensors") in audit.opened
    assert not [p for p in audit.opened if p.endswith("adapter_model.bin")], audit.opened
    assert not marker.exists()


def test_read_only_folder_and_no_write_attempt(world, serve, tmp_path):
    """chmod a-w on the folder and files. Root may write anyway, so the audit proves no write is attempted."""
    folder = tmp_path / "ro"
    shutil.copytree(world["adapter"], folder)
    for p in [*folder.iterdir(), folder]:
        p.chmod(p.stat().st_mode & ~0o222)
    before = _tree_digest(folder)
    try:
        audit = serve(folder)
        assert audit.touched(folder), "the audit saw no file of the adapter opened: it is not watching"
        assert audit.writes == [], audit.writes
        assert _tree_digest(folder) == before
    finally:
        folder.chmod(0o755)


def test_relative_paths(world, serve, tmp_path, monkeypatch):
    shutil.copytree(world["adapter"], tmp_path / "rel" / "adapter")
    monkeypatch.chdir(tmp_path)
    serve("rel/adapter")
    serve("./rel/../rel/adapter/")


@pytest.mark.parametrize("name", ["with spaces/and more spaces", "ünïcode 适配器 🙂", "quote'and\"double"])
def test_paths_with_spaces_and_unicode(world, serve, tmp_path, name):
    folder = tmp_path / name / "adapter"
    shutil.copytree(world["adapter"], folder)
    serve(str(folder))
    serve(folder)  # a pathlib.Path, as Python callers pass it


def test_non_utf8_folder_name(world, serve, tmp_path):
    """A folder name that is not UTF-8 reaches Python as surrogate escapes (str) or as bytes: both load."""
    raw = os.fsencode(tmp_path) + b"/caf\xe9-latin1"
    shutil.copytree(world["adapter"], os.fsdecode(raw))
    serve(os.fsdecode(raw))
    serve(raw)


def test_bin_only_adapter_written_by_peft(world, serve, base_dir_for_bin):
    """PEFT's ``safe_serialization=False`` output passes the pickle scan and serves the same merge."""
    audit = serve(base_dir_for_bin)
    assert any(p.endswith("adapter_model.bin") for p in audit.opened)


@pytest.fixture
def base_dir_for_bin(tiny_model, tmp_path):
    # Same seed and targets as the module's adapter, so PEFT writes the same tensors, pickled.
    return make_peft_adapter(tiny_model("qwen2"), tmp_path / "bin-adapter", target_modules=TARGET, r=8,
                             lora_alpha=16, seed=7, safe_serialization=False)


def test_adapter_folder_that_is_a_link(world, serve, tmp_path):
    os.symlink(world["adapter"], tmp_path / "linked")
    serve(tmp_path / "linked")
