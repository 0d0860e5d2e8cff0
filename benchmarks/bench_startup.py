"""Interpreter start-up with the plugin's ``.pth`` installed against without it.

Overlay venvs on top of the dev venv (tests/support/venv_overlay.py): one with our freshly built wheel (so
``lmdeploy_regex_lora.pth`` runs at every start) and its bytecode compiled, as ``pip install`` does by
default; one with the wheel but no bytecode (``pip install --no-compile`` into a site-packages Python
cannot write to, or ``PYTHONDONTWRITEBYTECODE=1``), which is what tests/support/venv_overlay.py itself makes;
and one identical venv with our files taken out again. Each command runs alternately in all of them,
many times, with ``PYTHONDONTWRITEBYTECODE=1`` so that no run changes the state of the next; medians of
wall time and of the child's CPU time (user + system, from ``wait4``) are compared. ``-X importtime``
also gives what the ``.pth`` line itself costs inside the interpreter, which the machine's noise hardly
touches.

    python -m benchmarks.bench_startup [--reps-pass 300] [--reps-import 10]
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import tempfile

from tests.support.venv_overlay import PTH_NAME, build_wheel, make_overlay_venv, site_packages

from . import common

COMMANDS = {
    "python -c pass": ["-c", "pass"],
    'python -c "import lmdeploy"': ["-c", "import lmdeploy"],
}
# The top-level start-up module the .pth imports (earlier versions also loaded the package and __future__).
BOOT_MODULE = "lmdeploy_regex_lora_boot"
OUR_MODULES = (BOOT_MODULE, "lmdeploy_regex_lora", "__future__")
ENV = common.child_env(PYTHONDONTWRITEBYTECODE="1")


def strip_plugin(python: pathlib.Path) -> None:
    """Take our .pth, package and dist-info out of an overlay: what is left is the same venv without us."""
    own = site_packages(python)
    (own / PTH_NAME).unlink()
    (own / f"{BOOT_MODULE}.py").unlink(missing_ok=True)
    shutil.rmtree(own / "lmdeploy_regex_lora")
    for info in own.glob("lmdeploy_regex_lora-*.dist-info"):
        shutil.rmtree(info)


def compile_plugin(python: pathlib.Path) -> None:
    """Write our package's and start-up module's bytecode, as ``pip install`` does unless told ``--no-compile``."""
    own = site_packages(python)
    targets = [own / "lmdeploy_regex_lora", *[p for p in [own / f"{BOOT_MODULE}.py"] if p.exists()]]
    subprocess.run([str(python), "-m", "compileall", "-q", *map(str, targets)], check=True)


def pth_import_cost(python: pathlib.Path, cwd: pathlib.Path, reps: int) -> tuple[float, float]:
    """Median (seconds) of the self import time of our start-up modules, and of the whole start-up's imports."""
    ours, total = [], []
    for _ in range(reps):
        out = common.run_measured([python, "-X", "importtime", "-c", "pass"], cwd=cwd, env=ENV)["output"]
        mine = every = 0
        for line in out.splitlines():
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            self_us, _cum, name = (x.strip() for x in line[len("import time:"):].split("|"))
            every += int(self_us)
            if name.strip() in OUR_MODULES:
                mine += int(self_us)
        ours.append(mine / 1e6)
        total.append(every / 1e6)
    return common.median(ours), common.median(total)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps-pass", type=int, default=300)
    parser.add_argument("--reps-import", type=int, default=10)
    args = parser.parse_args(argv)
    common.print_machine()

    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        tmp_path = pathlib.Path(tmp)
        wheel = build_wheel(tmp_path / "wheel")
        pythons = {
            "without plugin": make_overlay_venv(tmp_path / "without", wheel),
            "with plugin (bytecode compiled, pip's default)": make_overlay_venv(tmp_path / "with", wheel),
            "with plugin, no bytecode (--no-compile)": make_overlay_venv(tmp_path / "nopyc", wheel),
        }
        strip_plugin(pythons["without plugin"])
        compile_plugin(pythons["with plugin (bytecode compiled, pip's default)"])
        cwd = tmp_path / "cwd"  # neither the repo nor the overlays on sys.path[0]
        cwd.mkdir()
        print(f"wheel: {wheel.name}")

        rows = []
        for label, extra in COMMANDS.items():
            reps = args.reps_pass if "pass" in label else args.reps_import
            chosen = dict(pythons) if "pass" in label else dict(list(pythons.items())[:2])
            runs = common.interleave(
                {name: (lambda py=py, extra=extra: common.run_measured([py, *extra], cwd=cwd, env=ENV))
                 for name, py in chosen.items()}, reps=reps, warmup=2)
            for metric in ("wall", "cpu"):
                base = [r[metric] for r in runs["without plugin"]]
                m0 = common.median(base)
                for name in list(chosen)[1:]:
                    ours = [r[metric] for r in runs[name]]
                    m1 = common.median(ours)
                    q0, q1 = common.quartiles(base), common.quartiles(ours)
                    rows.append([label, name, metric, str(reps), common.fmt_seconds(m0), common.fmt_seconds(m1),
                                 f"{m1 / m0:.3f}", f"{(m1 / m0 - 1) * 100:+.1f} %",
                                 f"{common.fmt_seconds(q0[0])}-{common.fmt_seconds(q0[1])} / "
                                 f"{common.fmt_seconds(q1[0])}-{common.fmt_seconds(q1[1])}"])
        print("\nmedians of interleaved runs (without, with, ..., then reversed order, ...):\n")
        print(common.table(rows, ["command", "plugin venv", "time", "runs", "without plugin", "with plugin",
                                  "ratio", "overhead", "IQR without / with"]))

        print("\n-X importtime, median of 30 runs each:")
        for name, py in list(pythons.items())[1:]:
            mine, total = pth_import_cost(py, cwd, reps=30)
            print(f"  {name}: our start-up modules ({', '.join(OUR_MODULES)}) "
                  f"{mine * 1e6:.0f} us of {total * 1e3:.1f} ms for all start-up imports")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
