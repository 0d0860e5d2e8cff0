"""Pieces every subcommand shares: exit codes, adapter arguments, module grouping, tables, JSON.

Nothing here imports torch or LMDeploy, so ``--help`` stays instant.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import AdapterError

#: Exit codes of every subcommand.
OK = 0
FAILED = 1  # the check ran and found a problem (mismatch, refusal, hook not active)
BAD_INPUT = 2  # the input cannot be used at all (AdapterError); argparse uses 2 for bad options too


def parse_adapters(specs: Sequence[str]) -> dict[str, str]:
    """``NAME=PATH`` or ``PATH`` (named after its folder), as LMDeploy's ``--adapters`` takes them."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or os.path.exists(spec):
            path = spec
            name = os.path.basename(os.path.normpath(spec))
        if not name or not path:
            raise AdapterError(f"cannot read an adapter name and folder from {spec!r}.", field="ADAPTER",
                               fix="write NAME=PATH, or just PATH to name the adapter after its folder.")
        if name in out:
            raise AdapterError(f"two adapters are named {name!r} ({out[name]} and {path}).", adapter=name,
                               field="ADAPTER", fix="name them explicitly: NAME1=PATH1 NAME2=PATH2.")
        out[name] = path
    return out


# -- grouping module names by layer --------------------------------------------------------------------

def _ranges(values: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``0..2,5,7..8``."""
    nums = sorted(set(values))
    parts, start = [], None
    for i, n in enumerate(nums):
        if start is None:
            start = n
        if i + 1 == len(nums) or nums[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}..{n}")
            start = None
    return ",".join(parts)


def _template(name: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    parts = name.split(".")
    shape = tuple("{}" if p.isdigit() else p for p in parts)
    return shape, tuple(int(p) for p in parts if p.isdigit())


def layer_pattern(names: Iterable[str]) -> str:
    """One pattern for names that differ only in their numeric parts: ``model.layers.{0..31}.mlp.up_proj``.

    Each numeric position lists the values seen there (for two positions, e.g. layer and expert, the
    pattern shows each position's values, not which pairs exist; the group's count says how many).
    """
    names = list(names)
    shape, _ = _template(names[0])
    columns: list[set[int]] = [set() for _ in range(shape.count("{}"))]
    for n in names:
        _, nums = _template(n)
        for col, v in zip(columns, nums, strict=True):
            col.add(v)
    out, i = [], 0
    for p in shape:
        if p == "{}":
            vals = columns[i]
            out.append(str(next(iter(vals))) if len(vals) == 1 else "{" + _ranges(vals) + "}")
            i += 1
        else:
            out.append(p)
    return ".".join(out)


@dataclass
class Group:
    """Rows that share a name template and every other column."""

    pattern: str
    names: list[str]
    values: dict = field(default_factory=dict)


def group_rows(rows: Sequence[dict], name_key: str, same: Sequence[str], pattern_keys: Sequence[str] = ()) -> list[
        Group]:
    """Group ``rows`` whose ``name_key`` differs only in numbers and whose ``same`` columns are equal.

    ``pattern_keys`` are further name-like columns (e.g. the LMDeploy slot) shown as a pattern too.
    """
    buckets: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (_template(row[name_key])[0],) + tuple(_template(str(row[k]))[0] for k in pattern_keys) + \
            tuple(json.dumps(row[k], sort_keys=True, default=str) for k in same)
        buckets.setdefault(key, []).append(row)
    groups = []
    for members in buckets.values():
        values = {k: members[0][k] for k in same}
        for k in pattern_keys:
            values[k] = layer_pattern(str(m[k]) for m in members)
        groups.append(Group(layer_pattern(m[name_key] for m in members), [m[name_key] for m in members], values))
    return sorted(groups, key=lambda g: g.names[0])


# -- output ---------------------------------------------------------------------------------------------

def table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  ",
          right: Iterable[int] = ()) -> str:
    """Columns padded to their widest cell; the last column is never padded (it may be long)."""
    right = set(right)
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        out = []
        for i, c in enumerate(r):
            if i == len(r) - 1:
                out.append(c.rjust(widths[i]) if i in right else c)
            else:
                out.append(c.rjust(widths[i]) if i in right else c.ljust(widths[i]))
        lines.append(indent + "  ".join(out).rstrip())
    return "\n".join(lines)


def fmt_num(x: float) -> str:
    return f"{x:.6g}"


#: Where tables and JSON go. ``cli.main`` points it at the real stdout and sends ``sys.stdout`` itself to
#: stderr while a command runs: LMDeploy logs to stdout, which would corrupt ``--json`` output.
_output = None


def set_output(stream) -> None:
    global _output
    _output = stream


def emit(text: str) -> None:
    stream = _output or sys.stdout
    stream.write(text + "\n")
    stream.flush()


def print_json(obj: object) -> None:
    emit(json.dumps(obj, indent=2, default=str))


def show(report: dict, render, as_json: bool) -> None:
    """A command's report: JSON, or the command's table."""
    if as_json:
        print_json(report)
    else:
        emit(render(report))


def report_error(err: AdapterError) -> int:
    """Print an :class:`AdapterError` for a person (no traceback) and return :data:`BAD_INPUT`."""
    print(str(err), file=sys.stderr)
    return BAD_INPUT
