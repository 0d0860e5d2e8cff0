"""Target matching and per-module rank/alpha with PEFT's rules, on the trainer's module names.

Mirrors ``check_target_module_exists`` and the rank/alpha lookup of every PEFT release from 0.10
to 0.21 (read from each release's source; tests run them against these functions):

* ``exclude_modules`` first (PEFT >= 0.14): a string is ``re.fullmatch``-ed, a list entry matches the
  name exactly or as a ``.``-suffix.
* ``target_modules`` as a string: ``re.fullmatch`` on the full name (unchanged since PEFT 0.10); the string
  ``all-linear`` (any case) is PEFT's shorthand, expanded as PEFT 0.14 expands it (:func:`all_linear_leaves`).
* ``target_modules`` as a list: exact name, else ``.``-suffix; only in that suffix branch are
  ``layers_to_transform`` / ``layers_pattern`` applied (an exact full name bypasses them, as in PEFT).
* The layer index is read from the name with a regex that changed twice (:data:`LAYER_RULES`):
  greedy ``.*\\.`` (the *last* ``.N.`` in the name) up to PEFT 0.19, lazy ``.*?\\.`` (the first) in
  0.20 (#3318), and from 0.21 a ``layers_pattern`` may also start the name. The three only differ on
  names with two numbered parts (MoE experts) or a top-level layer list. We follow the release that
  wrote the config when it records ``peft_version`` (PEFT >= 0.18 does) and otherwise the greedy rule
  of the releases that did not record it; when that rule does not select exactly the modules the
  adapter has tensors for and another rule does, the tensors win and the plan says so.
* ``rank_pattern`` / ``alpha_pattern`` key rules of PEFT <= 0.13, 0.14 and >= 0.15 (#2419)
  (:data:`PATTERN_RULES`). Tensor shapes fix every module's rank; the config's rule must reproduce
  them. The recorded release's rule wins; without a record we follow PEFT >= 0.15 and flag, per
  module, an alpha that an older rule consistent with the tensors would have set differently.
  Keys are tried in the file's order, which is what PEFT reloads: every release's ``save_pretrained``
  sorts the JSON keys, so where keys overlap the trained model (dict order at training time) and PEFT's
  own reload of it can differ; only the reload is recorded anywhere.

Regexes run on the ``regex`` package with a deadline (:mod:`.safe_regex`), so a pattern built for
catastrophic backtracking gives up instead of hanging the server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import regex

from ..errors import AdapterError, Blame, describe_names
from .config import AdapterConfig
from .safe_regex import MAX_EXPANDED_REGEX, REGEX_BUDGET_S, Deadline, RegexField, expanded_size

__all__ = ["MAX_EXPANDED_REGEX", "REGEX_BUDGET_S", "RegexField", "expanded_size", "TargetMatcher", "PatternKeys",
           "resolve_targets", "all_linear_leaves", "layer_index", "layer_rules_for", "pattern_rule_for"]

logger = logging.getLogger("lmdeploy.regex_lora")

#: Layer-index rules, oldest first, and the PEFT releases that use each.
LAYER_RULES = ("greedy", "lazy", "lazy-start")
LAYER_RULE_RELEASES = {"greedy": "PEFT<=0.19", "lazy": "PEFT 0.20", "lazy-start": "PEFT>=0.21"}
#: rank_pattern / alpha_pattern key rules, oldest first.
PATTERN_RULES = ("peft<=0.13", "peft==0.14", "peft>=0.15")


def peft_release(version: str | None) -> tuple[int, int] | None:
    """(major, minor) of a recorded ``peft_version`` such as ``'0.20.1.dev0@abc'``; None when absent or unreadable."""
    if not version:
        return None
    m = regex.match(r"\s*v?(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def layer_rules_for(cfg: AdapterConfig) -> tuple[str, ...]:
    """Layer-index rules to try, the writing release's first (greedy when the config records none)."""
    release = peft_release(cfg.peft_version)
    if release is None or release < (0, 20):
        return ("greedy", "lazy", "lazy-start")
    if release < (0, 21):
        return ("lazy", "lazy-start", "greedy")
    return ("lazy-start", "lazy", "greedy")


def pattern_rule_for(cfg: AdapterConfig) -> str:
    """The rank/alpha key rule of the PEFT release that wrote the config (PEFT >= 0.15 when it records none)."""
    release = peft_release(cfg.peft_version)
    if release is not None and release[0] == 0:
        if release[1] <= 13:
            return "peft<=0.13"
        if release[1] == 14:
            return "peft==0.14"
    return "peft>=0.15"


@dataclass(frozen=True)
class Match:
    """Why a module is (or is not) a LoRA target of one adapter."""

    targeted: bool
    reason: str


def _blame(cfg: AdapterConfig) -> Blame:
    return Blame(cfg.name, cfg.config_file)


def _list_hit(entries: tuple[str, ...], name: str) -> str | None:
    if name in entries:
        return f"exact name {name!r}"
    for entry in sorted(entries):
        if name.endswith("." + entry):
            return f"suffix {entry!r}"
    return None


def _layer_regexes(layers_pattern: tuple[str, ...] | None, rule: str) -> list[str]:
    lead = ".*" if rule == "greedy" else ".*?"
    if not layers_pattern:
        return [lead + r"\.[^.]*\.(\d+)\."]
    start = "(?:^|.*?\\.)" if rule == "lazy-start" else lead + r"\."
    return [start + pattern + r"\.(\d+)\." for pattern in layers_pattern]


def _layer_fields(blame: Blame, layers_pattern: tuple[str, ...] | None, rule: str,
                  deadline: Deadline | None = None) -> list[RegexField]:
    return [RegexField(blame, "layers_pattern", p, what="the layer regex built from layers_pattern", deadline=deadline)
            for p in _layer_regexes(layers_pattern, rule)]


def _first_layer_index(fields: list[RegexField], name: str) -> int | None:
    for field in fields:
        m = field.match(name)
        if m is not None:
            return int(m.group(1))
    return None


def layer_index(name: str, layers_pattern: tuple[str, ...] | None, rule: str) -> int | None:
    """The layer number PEFT reads from a module name under ``rule`` (``None`` when it finds none)."""
    return _first_layer_index(_layer_fields(Blame(), layers_pattern, rule), name)


class TargetMatcher:
    """Decides, per module name, whether one adapter targets it (PEFT's ``check_target_module_exists``)."""

    def __init__(self, cfg: AdapterConfig, layer_rule: str = "greedy",
                 all_linear_leaves: frozenset[str] | None = None) -> None:
        if layer_rule not in LAYER_RULES:
            raise ValueError(f"layer_rule must be one of {LAYER_RULES}, got {layer_rule!r}")
        self.cfg = cfg
        self.layer_rule = layer_rule
        blame = _blame(cfg)
        self._all_linear = all_linear_leaves if cfg.all_linear else None
        self._target_re = RegexField(blame, "target_modules", cfg.target_modules) \
            if isinstance(cfg.target_modules, str) and not cfg.all_linear else None
        self._exclude_re = RegexField(blame, "exclude_modules", cfg.exclude_modules) \
            if isinstance(cfg.exclude_modules, str) and cfg.exclude_modules else None
        self._layer_fields = [] if cfg.layers_to_transform is None else _layer_fields(blame, cfg.layers_pattern,
                                                                                      layer_rule)

    def match(self, name: str) -> Match:
        cfg = self.cfg
        if cfg.exclude_modules:
            if self._exclude_re is not None:
                if self._exclude_re.fullmatch(name):
                    return Match(False, f"excluded: exclude_modules regex {cfg.exclude_modules!r} fullmatches")
            elif isinstance(cfg.exclude_modules, tuple):
                hit = _list_hit(cfg.exclude_modules, name)
                if hit:
                    return Match(False, f"excluded: exclude_modules {hit}")
        if self._all_linear is not None:  # PEFT turns the shorthand into a set of leaf names (see all_linear_leaves)
            if name.rsplit(".", 1)[-1] in self._all_linear:
                return Match(True, "target_modules 'all-linear'")
            return Match(False, "all-linear leaves out the output layer")
        if self._target_re is not None:
            if self._target_re.fullmatch(name):
                return Match(True, "target_modules regex fullmatch")
            return Match(False, "target_modules regex does not fullmatch")
        assert isinstance(cfg.target_modules, tuple)
        if name in cfg.target_modules:
            return Match(True, "target_modules exact name")
        hit = _list_hit(cfg.target_modules, name)
        if hit is None:
            return Match(False, "not in target_modules")
        if cfg.layers_to_transform is None:
            return Match(True, f"target_modules {hit}")
        layers = list(cfg.layers_to_transform)
        where = f"{self.layer_rule} layer-index rule, {LAYER_RULE_RELEASES[self.layer_rule]}"
        idx = _first_layer_index(self._layer_fields, name)
        if idx is None:
            return Match(False, f"target_modules {hit}, but no layer index in the name ({where})")
        if idx in cfg.layers_to_transform:
            return Match(True, f"target_modules {hit}, layer {idx} in layers_to_transform {layers} ({where})")
        return Match(False, f"target_modules {hit}, layer {idx} not in layers_to_transform {layers} ({where})")


class PatternKeys:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup for one adapter, under each release's rule."""

    def __init__(self, cfg: AdapterConfig) -> None:
        self.cfg = cfg
        self._fields: dict[tuple[str, str, str], RegexField] = {}
        self._deadline = Deadline(REGEX_BUDGET_S)
        # Compile every key under both regex forms now, so a bad key is refused whatever the rule.
        for field, keys in (("rank_pattern", cfg.rank_pattern), ("alpha_pattern", cfg.alpha_pattern)):
            for key in keys:
                for rule in ("peft==0.14", "peft>=0.15"):
                    self._regex(field, key, rule)

    def _regex(self, field: str, key: str, rule: str) -> RegexField:
        form = "new" if rule == "peft>=0.15" else "old"
        cached = self._fields.get((field, key, form))
        if cached is None:
            source = rf"(.*\.)?({key})$" if form == "new" else rf".*\.{key}$"
            cached = self._fields[(field, key, form)] = RegexField(
                _blame(self.cfg), field, source, what=f"the regex built from key {key!r}:", deadline=self._deadline,
                label=key)
        return cached

    def _hits(self, field: str, key: str, name: str, rule: str) -> bool:
        return self._regex(field, key, rule).match(name) is not None

    def key(self, fields: Iterable[tuple[str, str]], name: str, rule: str) -> str | None:
        """The first (field, key) whose key applies to ``name`` under ``rule``; PEFT's full-name fallback last."""
        fields = list(fields)
        for field, key in fields:
            if self._hits(field, key, name, rule):
                return key
        # PEFT falls back to the full name itself, which only helps when it is a key.
        if any(key == name for _, key in fields):
            return name
        return None

    def rank_and_alpha(self, name: str, rule: str) -> tuple[int, float, str | None, str | None]:
        """(rank, alpha, rank key, alpha key) that PEFT's config gives ``name`` under ``rule``."""
        cfg = self.cfg
        rank_keys = [("rank_pattern", k) for k in cfg.rank_pattern]
        alpha_keys = [("alpha_pattern", k) for k in cfg.alpha_pattern]
        if rule == "peft<=0.13":
            # One key, found in the chained dicts, is looked up in both (PEFT bug #2195).
            rank_key = alpha_key = self.key(rank_keys + alpha_keys, name, rule)
        else:
            rank_key = self.key(rank_keys, name, rule)
            alpha_key = self.key(alpha_keys, name, rule)
        rank_key = rank_key if rank_key in cfg.rank_pattern else None
        alpha_key = alpha_key if alpha_key in cfg.alpha_pattern else None
        rank = cfg.rank_pattern[rank_key] if rank_key is not None else cfg.r
        alpha = cfg.alpha_pattern[alpha_key] if alpha_key is not None else cfg.lora_alpha
        return rank, float(alpha), rank_key, alpha_key


def _pattern_why(rank_key: str | None, alpha_key: str | None, rule: str) -> str:
    why = []
    if rank_key is not None:
        why.append(f"rank_pattern[{rank_key!r}]")
    if alpha_key is not None:
        why.append(f"alpha_pattern[{alpha_key!r}]")
    return ", ".join(why) + f" ({rule} key rule)" if why else ""


# -- resolution against the adapter's own tensors ---------------------------------------------------

@dataclass(frozen=True)
class ModuleChoice:
    """One targeted module: rank (from the tensors), alpha and scaling (from the config), and why."""

    name: str
    rank: int
    alpha: float
    scaling: float
    reason: str


@dataclass
class Resolution:
    """Which modules an adapter targets, under which PEFT rules, with what rank and scaling."""

    layer_rule: str | None  # None: the config selects no layers, so the rule does not matter
    pattern_rule: str | None  # None: no rank_pattern / alpha_pattern
    verdicts: dict[str, Match]
    modules: dict[str, ModuleChoice]


def all_linear_leaves(names: Iterable[str], output_layer: str | None) -> frozenset[str]:
    """What PEFT 0.14 (``tuners_utils._maybe_include_all_linear_layers``) makes of ``"all-linear"``: the leaf
    names of every linear layer, minus the output layer's *full* name. Only an output layer at the top of the
    model (``lm_head``) is left out; a VLM's ``language_model.lm_head`` keeps its leaf, so it is targeted."""
    return frozenset(n.rsplit(".", 1)[-1] for n in names) - ({output_layer} if output_layer else set())


def _drop_non_linear(cfg: AdapterConfig, names: list[str], trained: set[str], rules: tuple[str, ...],
                     not_linear: Callable[[set[str]], set[str]] | None, output_layer: str | None) -> list[str]:
    """Names are a model's candidate layers; those a rule selects without tensors are asked about once more
    (``not_linear``): an embedding or a router that is a bare parameter is no linear layer, so no target."""
    for _ in range(3) if not_linear is not None else ():
        leaves = all_linear_leaves(names, output_layer) if cfg.all_linear else None
        untrained = {n for rule in rules for n in names if n not in trained
                     and TargetMatcher(cfg, rule, leaves).match(n).targeted}
        dropped = not_linear(untrained) if untrained else set()
        if not dropped:
            break
        names = [n for n in names if n not in dropped]
    return names


def _select(cfg: AdapterConfig, names: Iterable[str], trained: set[str], weights_file: str,
            not_linear: Callable[[set[str]], set[str]] | None = None, output_layer: str | None = None
            ) -> tuple[str | None, dict[str, Match], set[str]]:
    rules = layer_rules_for(cfg) if cfg.layers_to_transform is not None else ("greedy",)
    names = _drop_non_linear(cfg, list(names), trained, rules, not_linear, output_layer)
    leaves = all_linear_leaves(names, output_layer) if cfg.all_linear else None
    attempts = []
    for rule in rules:
        matcher = TargetMatcher(cfg, rule, leaves)
        verdicts = {n: matcher.match(n) for n in names}
        selected = {n for n, v in verdicts.items() if v.targeted}
        attempts.append((rule, verdicts, selected))
        if selected == trained:
            layer_rule = rule if cfg.layers_to_transform is not None else None
            if rule != rules[0]:
                written = f"peft_version {cfg.peft_version}" if cfg.peft_version else "no peft_version"
                note = (f"; the config records {written}, whose {rules[0]} layer-index rule does not select the "
                        f"trained modules; the {rule} rule ({LAYER_RULE_RELEASES[rule]}) does")
                verdicts = {n: Match(v.targeted, v.reason + note) if v.targeted else v for n, v in verdicts.items()}
            return layer_rule, verdicts, selected
    # Report under the rule that came closest (most trained modules selected; the writing release's on ties).
    _, verdicts, selected = min(attempts, key=lambda a: (-len(a[2] & trained), len(a[2] ^ trained)))
    extra, missing = trained - selected, selected - trained
    if not selected:
        raise AdapterError(
            f"target_modules {cfg.describe_targets()} matches none of the model's linear layers.",
            adapter=cfg.name, file=cfg.config_file, field="target_modules",
            fix="check that the adapter belongs to this base model; target names are matched against full module "
                "names as the Hugging Face model names them.")
    if extra:
        first = sorted(extra)[0]
        raise AdapterError(
            f"holds LoRA tensors for {len(extra)} module(s) that the config does not target: {describe_names(extra)} "
            f"({verdicts[first].reason}).", adapter=cfg.name, file=weights_file, module=first,
            fix="use the adapter_config.json saved with these weights; the config and weights disagree.")
    first = sorted(missing)[0]
    raise AdapterError(
        f"has no lora_A/lora_B for {len(missing)} module(s) the config targets: {describe_names(missing)}.",
        adapter=cfg.name, file=weights_file, module=first,
        fix="the weights file is incomplete or belongs to another config; save the adapter again.")


def resolve_targets(cfg: AdapterConfig, names: Iterable[str], trained_ranks: Mapping[str, int],
                    weights_file: str, not_linear: Callable[[set[str]], set[str]] | None = None,
                    output_layer: str | None = None) -> Resolution:
    """Match ``cfg`` against the model's linear ``names`` and check it against the tensors' ranks.

    The config must select exactly the modules the adapter has tensors for, under some PEFT layer
    rule, and give each the rank of its tensors under some PEFT rank/alpha rule; anything else is
    an :class:`AdapterError` (the config and weights disagree, so what was trained is unknown).
    """
    layer_rule, verdicts, selected = _select(cfg, names, set(trained_ranks), weights_file, not_linear, output_layer)
    keys = PatternKeys(cfg)
    preferred = pattern_rule_for(cfg)
    ordered = [preferred] + [r for r in reversed(PATTERN_RULES) if r != preferred]
    has_patterns = bool(cfg.rank_pattern or cfg.alpha_pattern)
    by_rule = {rule: {n: keys.rank_and_alpha(n, rule) for n in selected} for rule in (ordered if has_patterns
                                                                                     else [preferred])}
    consistent = [r for r, got in by_rule.items() if all(got[n][0] == trained_ranks[n] for n in selected)]
    if not consistent:
        bad = next(n for n in sorted(selected) if by_rule[preferred][n][0] != trained_ranks[n])
        rank, _, rank_key, _ = by_rule[preferred][bad]
        source = f"rank_pattern[{rank_key!r}]" if rank_key is not None else "r"
        raise AdapterError(
            f"lora_A/lora_B have rank {trained_ranks[bad]}, but the config gives this module rank {rank} "
            f"({source}, {preferred} key rule).", adapter=cfg.name, file=weights_file, module=bad,
            field="rank_pattern" if rank_key is not None else "r",
            fix="use the adapter_config.json saved with these weights.")
    chosen = consistent[0]
    note = ""
    if chosen != preferred:
        note = (f"; the config's {'peft_version ' + cfg.peft_version if cfg.peft_version else 'default'} "
                f"{preferred} key rule gives ranks the tensors do not have, the {chosen} rule reproduces them")

    modules: dict[str, ModuleChoice] = {}
    ambiguous: list[str] = []
    for n in sorted(selected):
        rank = trained_ranks[n]
        _, alpha, rank_key, alpha_key = by_rule[chosen][n]
        reason = verdicts[n].reason
        why = _pattern_why(rank_key, alpha_key, chosen)
        if why:
            reason += "; " + why
        reason += note
        if cfg.peft_version is None and has_patterns:
            others = {r: by_rule[r][n][1] for r in consistent if by_rule[r][n][1] != alpha}
            if others:
                alt = ", ".join(f"{r} would give alpha {a:g}" for r, a in others.items())
                reason += (f"; AMBIGUOUS: the config records no peft_version and {alt}; set \"peft_version\" "
                           "in adapter_config.json to the release that trained it")
                ambiguous.append(f"{n!r}: alpha {alpha:g}, but {alt}")
        modules[n] = ModuleChoice(n, rank, alpha, cfg.scaling(rank, alpha), reason)
    if ambiguous:
        more = f" and {len(ambiguous) - 3} more" if len(ambiguous) > 3 else ""
        logger.warning("adapter %r: the config records no peft_version and PEFT releases disagree on the alpha of "
                       "%d module(s); following the %s key rule: %s%s. Set \"peft_version\" in %s to the release "
                       "that trained it.", cfg.name, len(ambiguous), chosen, "; ".join(ambiguous[:3]), more,
                       cfg.config_file)
    return Resolution(layer_rule=layer_rule, pattern_rule=chosen if has_patterns else None,
                      verdicts=verdicts, modules=modules)
