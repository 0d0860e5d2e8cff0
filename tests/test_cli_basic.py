"""The CLI's shell: subcommands, --help, exit codes for bad usage, and the shared argument / table helpers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmdeploy_regex_lora.cli.common import group_rows, layer_pattern, parse_adapters, table
from lmdeploy_regex_lora.errors import AdapterError
from tests.support.cli_run import ROOT, describe, run_cli

COMMANDS = ("inspect", "verify", "merge", "doctor")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_subcommand(command):
    proc = run_cli(command, "--help")
    assert proc.returncode == 0, describe(proc)
    assert f"usage: lmdeploy-regex-lora {command}" in proc.stdout
    assert "Exit status: 0" in proc.stdout  # every subcommand documents its exit codes
    assert "--json" in proc.stdout


def test_top_level_help_lists_commands_and_version():
    proc = run_cli("--help")
    assert proc.returncode == 0, describe(proc)
    for command in (*COMMANDS, "demo"):
        assert command in proc.stdout
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("lmdeploy-regex-lora ")


def test_bad_usage_exits_2_with_usage():
    none = run_cli()
    assert none.returncode == 2 and "usage:" in none.stderr
    unknown = run_cli("frobnicate")
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr
    missing = run_cli("merge", "only-one-arg")
    assert missing.returncode == 2 and "required" in missing.stderr


def test_demo_keeps_its_own_arguments():
    # Everything after `demo` belongs to the demo's parser (its --help names it, its own options work).
    proc = run_cli("demo", "--help")
    assert proc.returncode == 0, describe(proc)
    assert "usage: lmdeploy-regex-lora demo" in proc.stdout and "--keep" in proc.stdout


def test_help_imports_neither_torch_nor_lmdeploy():
    code = ("import sys\nfrom lmdeploy_regex_lora.cli import main as cli\n"
            "for c in ('inspect', 'verify', 'merge', 'doctor'):\n"
            "    try:\n        cli.main([c, '--help'])\n    except SystemExit:\n        pass\n"
            "print('LOADED', 'torch' in sys.modules, 'lmdeploy' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED False False" in proc.stdout


def test_parse_adapters(tmp_path):
    (tmp_path / "my-adapter").mkdir()
    assert parse_adapters([f"a={tmp_path}/x", str(tmp_path / "my-adapter")]) == {
        "a": f"{tmp_path}/x", "my-adapter": str(tmp_path / "my-adapter")}
    # A folder whose own name contains '=' is a path, not NAME=PATH.
    odd = tmp_path / "lr=1e-4"
    odd.mkdir()
    assert parse_adapters([str(odd)]) == {"lr=1e-4": str(odd)}
    with pytest.raises(AdapterError, match="two adapters are named 'x'"):
        parse_adapters(["x=/a", "x=/b"])


def test_layer_pattern_and_grouping():
    names = [f"model.layers.{i}.mlp.up_proj" for i in (0, 1, 2, 5, 7, 8)]
    assert layer_pattern(names) == "model.layers.{0..2,5,7..8}.mlp.up_proj"
    assert layer_pattern(["mlp1.1", "mlp1.3"]) == "mlp1.{1,3}"
    assert layer_pattern(["model.layers.4.mlp.up_proj"]) == "model.layers.4.mlp.up_proj"
    rows = [{"name": f"model.layers.{i}.q", "rank": 4 if i == 2 else 8} for i in range(3)]
    rows += [{"name": f"model.layers.{i}.o", "rank": 16} for i in range(3)]
    groups = {(g.pattern, g.values["rank"]): len(g.names) for g in group_rows(rows, "name", ["rank"])}
    assert groups == {("model.layers.{0..1}.q", 8): 2, ("model.layers.{0..2}.o", 16): 3,
                      ("model.layers.2.q", 4): 1}
    text = table(["A", "N"], [["x", 1], ["longer", 22]], right=(1,))
    assert text.splitlines() == ["  A        N", "  x        1", "  longer  22"]
