"""PEFT's regexes run safely: size-checked before compiling, matched under a deadline.

Every regex PEFT would run on a config (targets, exclusions, layer indices, rank/alpha keys) goes through
:class:`RegexField`, so a pattern built for catastrophic backtracking, or one whose counted repeats would
take minutes to compile, is refused with the field's name instead of stalling the server.
"""

from __future__ import annotations

import time

import regex

from ..errors import Blame

#: Seconds of regex matching allowed per adapter field, over all module names together.
REGEX_BUDGET_S = 2.0


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(self.end - time.monotonic(), 1e-3)


#: Upper bound on a regex's size once counted repeats are expanded. Compiling expands them (the
#: ``regex`` package and ``re`` alike), and no matching deadline applies before the pattern exists:
#: ``((model{1000}){1000}){1000}`` would compile for minutes. 10**6 compiles in about 0.3 s here.
MAX_EXPANDED_REGEX = 10**6


def expanded_size(pattern: str) -> int:
    """Size of ``pattern`` with counted repeats unrolled, from Python's own ``re`` parser (what PEFT uses).

    Parsing is linear in the pattern's length; raises ``re.error`` for what ``re`` (and so PEFT) rejects.
    """
    import re._parser as sre_parse  # the parser behind re.compile: no expansion, no code generation
    from re._constants import MAXREPEAT

    def size(items) -> int:
        total = 0
        for op, arg in items:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                low, high, sub = arg
                total += max(1, high if high != MAXREPEAT else low) * size(sub)
            elif name == "SUBPATTERN":
                total += size(arg[-1])
            elif name == "BRANCH":
                total += sum(size(branch) for branch in arg[1])
            elif name in ("ASSERT", "ASSERT_NOT"):
                total += size(arg[1])
            elif name == "ATOMIC_GROUP":
                total += size(arg)
            elif name == "GROUPREF_EXISTS":
                total += sum(size(branch) for branch in arg[1:] if branch)
            else:
                total += 1
            if total > MAX_EXPANDED_REGEX:
                return total  # no need to count further
        return total

    return size(sre_parse.parse(pattern))


def _compile(blame: Blame, field: str, pattern: str, what: str = "the regex") -> regex.Pattern:
    import re

    try:
        expanded = expanded_size(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise blame(f"{what} {pattern!r} does not compile as a Python regex ({exc}); PEFT matches with `re`, so no "
                    "PEFT release could have trained with it.", "write a Python `re`-compatible regex, as PEFT "
                    "expects.", field=field) from None
    if expanded > MAX_EXPANDED_REGEX:
        raise blame(f"{what} {pattern!r} expands to more than {MAX_EXPANDED_REGEX:,} elements once its counted "
                    "repeats are unrolled; compiling it would stall the server.", _SIMPLER, field=field)
    try:
        return regex.compile(pattern, flags=regex.VERSION0)
    except regex.error as exc:
        raise blame(f"{what} {pattern!r} does not compile ({exc}).",
                    "write a Python `re`-compatible regex, as PEFT expects.", field=field) from None


_SIMPLER = "simplify the regex, e.g. swift's form ^(prefix.*\\.(leaf|leaf))$."


class RegexField:
    """One regex of a config field: compiled once (size-checked), matched under a deadline.

    Every regex PEFT would run (targets, exclusions, layer indices, rank/alpha keys) goes through here, so
    a pattern built for catastrophic backtracking gives up with the field's name instead of hanging.
    """

    def __init__(self, blame: Blame, field: str, pattern: str, *, what: str = "the regex",
                 deadline: Deadline | None = None, label: str | None = None) -> None:
        self.blame, self.field, self.pattern = blame, field, pattern
        self.label = pattern if label is None else label  # what the timeout message quotes
        self.compiled = _compile(blame, field, pattern, what)
        self.deadline = deadline or Deadline(REGEX_BUDGET_S)

    def _run(self, method, name: str):
        try:
            return method(name, timeout=self.deadline.left())
        except TimeoutError:
            raise self.blame(f"the regex {self.label!r} took longer than {REGEX_BUDGET_S:g} s to match the model's "
                             "module names (catastrophic backtracking).", _SIMPLER, field=self.field) from None

    def fullmatch(self, name: str) -> bool:
        return self._run(self.compiled.fullmatch, name) is not None

    def match(self, name: str) -> regex.Match | None:
        return self._run(self.compiled.match, name)
