"""Build hook only: metadata lives in setup.cfg.

``lmdeploy_regex_lora.pth`` must sit at the root of site-packages (not inside the package) for
``site`` to run it at every interpreter start; setuptools has no declarative way to put a
top-level file into a wheel, so ``build_py`` copies it next to the packages in ``build_lib``.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_FILE = "lmdeploy_regex_lora.pth"


class BuildPyWithPth(build_py):
    """``build_py`` that also ships the start-up ``.pth`` file at the wheel's root."""

    def run(self) -> None:
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        self.copy_file(os.path.join(here, PTH_FILE), os.path.join(self.build_lib, PTH_FILE))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH_FILE)]


setup(cmdclass={"build_py": BuildPyWithPth})
