"""LMDeploy's pre-flight adapter check runs the plugin's own config validation while the plugin is active.

LMDeploy's ``AdapterChecker`` (engine start-up, before ``add_adapters``) loads each config with peft's
``PeftConfig`` and exits the process on failure. With the plugin it validates as the loader will:
the same message, the same ``LMDEPLOY_REGEX_LORA_ON_ERROR=skip`` behaviour, and no hang on a FIFO.
"""

from __future__ import annotations

import json
import logging
import os
import time

import pytest

import lmdeploy_regex_lora
from lmdeploy_regex_lora.serve import hook
from tests.support.peft_fixtures import make_peft_adapter


@pytest.fixture
def checker_cls(plugin_installed):
    from lmdeploy.pytorch.check_env.adapter import AdapterChecker

    return AdapterChecker


@pytest.fixture(scope="module")
def swift_adapter(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("check") / "ckpt"
    return make_peft_adapter(tiny_model("internvl2_internlm2"), folder,
                             target_modules=r"^(language_model.*\.(w2|w3|w1|wo|wqkv))$", r=8, lora_alpha=16)


def test_wrapped_while_installed_and_restored_after(checker_cls):
    point = next(p for p in hook.patch_points() if p.attribute == "check")
    original = hook._originals[point]
    assert hook.is_wrapper(vars(checker_cls)["check"])
    lmdeploy_regex_lora.uninstall()
    assert vars(checker_cls)["check"] is original and not hook.is_wrapper(vars(checker_cls)["check"])
    assert lmdeploy_regex_lora.install() and hook.is_wrapper(vars(checker_cls)["check"])


def test_swift_adapter_passes(checker_cls, swift_adapter):
    checker_cls(str(swift_adapter)).check()  # no SystemExit


def test_refused_field_exits_with_the_plugins_message(checker_cls, swift_adapter, tmp_path, caplog):
    folder = tmp_path / "dora"
    folder.mkdir()
    for f in swift_adapter.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit) as exc:
        checker_cls(str(folder)).check()
    assert exc.value.code == 1
    text = caplog.text
    assert "field 'use_dora'" in text and "adapter 'dora'" in text and "merge the adapter" in text


def test_fifo_config_fails_fast_instead_of_hanging(checker_cls, tmp_path, caplog):
    folder = tmp_path / "fifo"
    folder.mkdir()
    os.mkfifo(folder / "adapter_config.json")
    start = time.perf_counter()
    with pytest.raises(SystemExit):
        checker_cls(str(folder)).check()
    assert time.perf_counter() - start < 5
    assert "adapter_config.json" in caplog.text


def test_skip_mode_lets_the_engine_start(checker_cls, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LMDEPLOY_REGEX_LORA_ON_ERROR", "skip")
    folder = tmp_path / "empty"
    folder.mkdir()
    with caplog.at_level(logging.ERROR, logger="lmdeploy.regex_lora"):
        checker_cls(str(folder)).check()  # returns: the loader will leave it out
    assert "adapter_config.json is missing" in caplog.text and "leave this adapter out" in caplog.text
