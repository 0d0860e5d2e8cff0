"""Target matching with PEFT's rules, on module names as the trainer's Hugging Face model named them.

Mirrors ``peft.tuners.tuners_utils.check_target_module_exists`` of PEFT 0.14.0 (the version LMDeploy
pins), with the later changes that matter for adapters written by newer PEFT releases:

* ``exclude_modules`` first (PEFT >= 0.14): a string is ``fullmatch``ed, a list entry matches the
  name exactly or as a ``.``-suffix.
* ``target_modules`` as a string: ``fullmatch`` on the full name (unchanged since PEFT 0.10).
* ``target_modules`` as a list: exact name, else ``.``-suffix; only in that suffix branch are
  ``layers_to_transform`` / ``layers_pattern`` applied (an exact full name bypasses them, as in PEFT).
* the layer index regex was greedy (``.*\\.``, the last number in the name) up to PEFT 0.19 and lazy
  (``.*?\\.``, the first) from PEFT 0.20 (#3318); :data:`LAYER_RULES` names both.
* ``rank_pattern`` / ``alpha_pattern`` key rules of PEFT <= 0.13, 0.14 and >= 0.15 (#2419).

Regexes run on the ``regex`` package with a deadline, so a pattern built for catastrophic
backtracking gives up instead of hanging the server.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import regex

from .adapter_config import AdapterConfig
from .errors import AdapterError

#: Seconds of regex matching allowed per adapter field, over all module names together.
REGEX_BUDGET_S = 2.0

LAYER_RULES = ("greedy", "lazy")  # PEFT <= 0.19, PEFT >= 0.20
PATTERN_RULES = ("peft<=0.13", "peft==0.14", "peft>=0.15")


@dataclass(frozen=True)
class Match:
    """Why a module is (or is not) a LoRA target of one adapter."""

    targeted: bool
    reason: str


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(self.end - time.monotonic(), 1e-3)


class RegexField:
    """One regex-valued config field, compiled once, matched under a shared deadline."""

    def __init__(self, cfg: AdapterConfig, field: str, pattern: str, budget_s: float = REGEX_BUDGET_S) -> None:
        self.cfg, self.field, self.pattern = cfg, field, pattern
        try:
            self.compiled = regex.compile(pattern, flags=regex.VERSION0)
        except regex.error as exc:
            raise AdapterError(f"the regex {pattern!r} does not compile ({exc}).", adapter=cfg.name,
                               file=cfg.config_file, field=field,
                               fix="write a Python `re`-compatible regex, as PEFT expects.") from None
        self.deadline = _Deadline(budget_s)

    def fullmatch(self, name: str) -> bool:
        try:
            return self.compiled.fullmatch(name, timeout=self.deadline.left()) is not None
        except TimeoutError:
            raise AdapterError(
                f"the regex {self.pattern!r} took longer than {REGEX_BUDGET_S:g} s to match the model's module "
                "names (catastrophic backtracking).", adapter=self.cfg.name, file=self.cfg.config_file,
                field=self.field, fix="simplify the regex, e.g. swift's form ^(prefix.*\\.(leaf|leaf))$.") from None


def _list_hit(entries: tuple[str, ...], name: str) -> str | None:
    if name in entries:
        return f"exact name {name!r}"
    for entry in entries:
        if name.endswith("." + entry):
            return f"suffix {entry!r}"
    return None


def layer_index(name: str, layers_pattern: tuple[str, ...] | None, rule: str) -> int | None:
    """The layer number PEFT reads from a module name (``None`` when it finds none)."""
    lead = ".*?" if rule == "lazy" else ".*"
    if not layers_pattern:
        m = regex.match(lead + r"\.[^.]*\.(\d+)\.", name)
    else:
        m = None
        for pattern in layers_pattern:
            m = regex.match(lead + rf"\.{pattern}\.(\d+)\.", name)
            if m is not None:
                break
    return int(m.group(1)) if m is not None else None


class TargetMatcher:
    """Decides, per module name, whether one adapter targets it (PEFT's ``check_target_module_exists``)."""

    def __init__(self, cfg: AdapterConfig, layer_rule: str = "greedy") -> None:
        self.cfg = cfg
        self.layer_rule = layer_rule
        self._target_re = RegexField(cfg, "target_modules", cfg.target_modules) \
            if isinstance(cfg.target_modules, str) else None
        self._exclude_re = RegexField(cfg, "exclude_modules", cfg.exclude_modules) \
            if isinstance(cfg.exclude_modules, str) else None

    def match(self, name: str) -> Match:
        cfg = self.cfg
        if cfg.exclude_modules:
            if self._exclude_re is not None:
                if self._exclude_re.fullmatch(name):
                    return Match(False, f"excluded: exclude_modules regex {cfg.exclude_modules!r}")
            else:
                hit = _list_hit(cfg.exclude_modules, name)
                if hit:
                    return Match(False, f"excluded: exclude_modules {hit}")
        if self._target_re is not None:
            if self._target_re.fullmatch(name):
                return Match(True, "target_modules regex fullmatch")
            return Match(False, "target_modules regex does not fullmatch")
        assert isinstance(cfg.target_modules, tuple)
        if name in cfg.target_modules:
            return Match(True, f"target_modules exact name {name!r}")
        hit = _list_hit(cfg.target_modules, name)
        if hit is None:
            return Match(False, "not in target_modules")
        if cfg.layers_to_transform is None:
            return Match(True, f"target_modules {hit}")
        idx = layer_index(name, cfg.layers_pattern, self.layer_rule)
        if idx is None:
            return Match(False, f"target_modules {hit}, but no layer index in the name ({self.layer_rule} rule)")
        if idx in cfg.layers_to_transform:
            return Match(True, f"target_modules {hit}, layer {idx} in layers_to_transform")
        return Match(False, f"target_modules {hit}, layer {idx} not in layers_to_transform")


def pattern_key(pattern_keys: Iterable[str], name: str, rule: str) -> str | None:
    """The ``rank_pattern``/``alpha_pattern`` key PEFT applies to ``name`` under ``rule`` (None: none applies)."""
    for key in pattern_keys:
        try:
            if rule == "peft>=0.15":
                hit = regex.match(rf"(.*\.)?({key})$", name, timeout=REGEX_BUDGET_S)
            else:
                hit = regex.match(rf".*\.{key}$", name, timeout=REGEX_BUDGET_S)
        except (regex.error, TimeoutError):
            hit = None
        if hit is not None:
            return key
    # PEFT <= 0.14 falls back to the full name itself, which only helps when it is a key.
    if rule != "peft>=0.15" and name in pattern_keys:
        return name
    return None


def rank_and_alpha(cfg: AdapterConfig, name: str, rule: str) -> tuple[int, float, str]:
    """The (rank, alpha) PEFT's config gives ``name``, and which keys decided it."""
    if rule == "peft<=0.13":
        # One key from the chained dicts is used for both lookups (PEFT bug #2195).
        key = pattern_key(list(cfg.rank_pattern) + list(cfg.alpha_pattern), name, rule)
        rank_key = alpha_key = key
    else:
        rank_key = pattern_key(cfg.rank_pattern, name, rule)
        alpha_key = pattern_key(cfg.alpha_pattern, name, rule)
    rank = cfg.rank_pattern.get(rank_key, cfg.r) if rank_key is not None else cfg.r
    alpha = cfg.alpha_pattern.get(alpha_key, cfg.lora_alpha) if alpha_key is not None else cfg.lora_alpha
    why = []
    if rank_key is not None and rank_key in cfg.rank_pattern:
        why.append(f"rank_pattern[{rank_key!r}]")
    if alpha_key is not None and alpha_key in cfg.alpha_pattern:
        why.append(f"alpha_pattern[{alpha_key!r}]")
    return rank, float(alpha), ", ".join(why)


def pattern_rule_for(cfg: AdapterConfig) -> str:
    """The rank/alpha pattern rule of the PEFT release that wrote the config (newest when unknown)."""
    v = cfg.peft_version
    if v:
        try:
            parts = tuple(int(p) for p in regex.findall(r"\d+", v)[:2])
        except ValueError:
            parts = ()
        if len(parts) == 2 and parts[0] == 0:
            if parts[1] <= 13:
                return "peft<=0.13"
            if parts[1] == 14:
                return "peft==0.14"
    return "peft>=0.15"
