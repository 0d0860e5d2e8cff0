"""Build our wheel and install it into a throw-away "overlay" venv on top of the dev venv.

The ``.pth`` start-up hook only exists once the package is installed from a wheel, so tests
and the demo need a real install; copying torch/lmdeploy (GBs) for that is out of the
question. The overlay is a bare ``venv --without-pip`` whose ``_deps.pth`` adds the dev venv's
site-packages *after* its own, so it sees every dependency but only the overlay holds our
package (and anything a test puts ahead of the real one, e.g. fake ``*.dist-info``).

Usable as a module (``build_wheel``, ``make_overlay_venv``) and from the shell::

    python tests/support/venv_overlay.py build-wheel OUT_DIR        # prints the wheel path
    python tests/support/venv_overlay.py overlay TMP_DIR WHEEL      # prints the overlay's python
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PTH_NAME = "lmdeploy_regex_lora.pth"
_SOURCE_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", "tests"
)


def _run(cmd: list[str], **kwargs: object) -> str:
    """Run ``cmd``; on failure raise with its output so a broken build is readable in pytest."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def build_wheel(out_dir: str | os.PathLike[str], python: str | os.PathLike[str] = sys.executable) -> Path:
    """Build the project's wheel with ``python``'s pip, from a copy of the tree.

    Building in a copy keeps concurrent runs (and the repo) free of ``build/``/``*.egg-info``.
    """
    out = Path(out_dir)
    src = out / "src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(ROOT, src, ignore=_SOURCE_IGNORE)
    wheels = out / "wheel"
    _run([str(python), "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)])
    found = sorted(wheels.glob("lmdeploy_regex_lora-*.whl"))
    if len(found) != 1:
        raise RuntimeError(f"expected one wheel in {wheels}, found {found}")
    return found[0]


def site_packages(python: str | os.PathLike[str]) -> Path:
    """The purelib directory of ``python`` (asked, not guessed; without -S, which hides the venv on 3.11)."""
    out = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    return Path(out.strip())


def make_overlay_venv(
    tmp_dir: str | os.PathLike[str],
    wheel: str | os.PathLike[str],
    base_python: str | os.PathLike[str] = sys.executable,
) -> Path:
    """Create ``tmp_dir/overlay`` seeing ``base_python``'s packages, install ``wheel``; return its python."""
    overlay = Path(tmp_dir) / "overlay"
    _run([str(base_python), "-m", "venv", "--without-pip", "--clear", str(overlay)])
    python = overlay / "bin" / "python"
    deps = site_packages(base_python) if Path(base_python) != Path(sys.executable) else Path(
        sysconfig.get_paths()["purelib"]
    )
    own = site_packages(python)
    # "_" sorts before "l": the deps are on sys.path before our .pth runs (it needs only stdlib anyway).
    (own / "_deps.pth").write_text(f"import site; site.addsitedir({str(deps)!r})\n")
    # The overlay's python runs pip (found through _deps.pth), so the wheel lands in the overlay's
    # own site-packages and any console script gets the overlay's python in its shebang.
    _run([
        str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
        "--disable-pip-version-check", "-q", str(wheel),
    ])
    if not (own / PTH_NAME).is_file():
        raise RuntimeError(f"{PTH_NAME} missing from {own} after installing {wheel}")
    return python


def main(argv: list[str] | None = None) -> int:
    """Shell entry used by scripts/demo.sh."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build-wheel")
    build.add_argument("out_dir")
    overlay = sub.add_parser("overlay")
    overlay.add_argument("tmp_dir")
    overlay.add_argument("wheel")
    args = parser.parse_args(argv)
    if args.command == "build-wheel":
        print(build_wheel(args.out_dir))
    else:
        print(make_overlay_venv(args.tmp_dir, args.wheel))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
