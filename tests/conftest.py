"""Shared fixtures: tiny model folders are written once per session (writing + remote-code import is the slow part)."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import pytest

from lmdeploy_regex_lora.testing.tiny_models import ARCHS, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., pathlib.Path]:
    """Factory ``tiny_model(arch, num_layers=2) -> folder``, cached per (arch, num_layers) for the session.

    Callers must not modify the folder; write merged / derived models elsewhere.
    """
    cache: dict[tuple[str, int], pathlib.Path] = {}

    def get(arch: str, num_layers: int = 2) -> pathlib.Path:
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}")
        key = (arch, num_layers)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{arch}_l{num_layers}", numbered=True)
            cache[key] = make_tiny_model(arch, folder, seed=0, num_layers=num_layers)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_arch(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., pathlib.Path]:
    """Factory ``tiny_arch(arch) -> folder`` for issue 11's architectures (``testing/tiny_archs.py``), written once
    per session. DeepSeek-V2/V3 folders are built by LMDeploy only under ``tests.support.cpu_standins`` (see
    :func:`deepseek_stand_ins`)."""
    from lmdeploy_regex_lora.testing.tiny_archs import ARCHS as NEW_ARCHS
    from lmdeploy_regex_lora.testing.tiny_archs import make_arch

    cache: dict[str, pathlib.Path] = {}

    def get(arch: str) -> pathlib.Path:
        if arch not in NEW_ARCHS:
            raise ValueError(f"unknown arch {arch!r}")
        if arch not in cache:
            cache[arch] = make_arch(arch, tmp_path_factory.mktemp(arch, numbered=True), seed=0)
        return cache[arch]

    return get


@pytest.fixture(autouse=True)
def deepseek_stand_ins():
    """LMDeploy's DeepSeek build asks CUDA two questions (tests/support/cpu_standins.py): answered for every test, as a
    GPU without FlashMLA and Hopper router GEMM would. Other models never reach the patched code."""
    from tests.support.cpu_standins import deepseek_on_cpu

    with deepseek_on_cpu():
        yield


@pytest.fixture
def plugin_installed():
    """The plugin's hook in place for the test (LMDeploy's add_adapters wrapped), removed afterwards."""
    import lmdeploy_regex_lora

    assert lmdeploy_regex_lora.install(), "the plugin stood aside; see the log"
    import lmdeploy.pytorch.models.patch  # noqa: F401  (the import hook wraps it)

    assert lmdeploy_regex_lora.is_installed()
    yield
    lmdeploy_regex_lora.uninstall()
