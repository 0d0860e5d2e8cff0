"""Generated LoRA configs for the differential tests: regex and list targets, exclusions, layer
selections, rank/alpha patterns (including the key forms on which PEFT releases disagree), rsLoRA.

One generator, two drivers: :class:`SeededChooser` (a fixed table from a seed) and
:class:`HypothesisChooser` (inside ``@given``, so failures shrink). Targets are built only from
names that PEFT can wrap (a regex or list entry that also hit a non-Linear module makes vanilla
PEFT raise); exclusions and pattern keys may hit anything.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Pools:
    """Name material of one module tree."""

    leaves: list[str]  # last name part of linears, never the suffix of a non-Linear module
    suffixes: list[str]  # last two parts, same condition
    fulls: list[str]  # full names of linears
    prefixes: list[str]  # first name part of linears (model, language_model, vision_model, ...)
    layer_words: list[str]  # the name part before a layer number (layers, layer, blocks, h)


def pools_for(linear_names: Iterable[str], other_names: Iterable[str]) -> Pools:
    """Pools from the names of a tree's linears and of its other modules."""
    linear_names = sorted(set(linear_names))
    other = [n for n in set(other_names) if n]

    def safe(suffix: str) -> bool:
        return not any(o == suffix or o.endswith("." + suffix) for o in other)

    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_names if safe(n.rsplit(".", 1)[-1])})
    suffixes = sorted({".".join(n.split(".")[-2:]) for n in linear_names
                       if n.count(".") >= 1 and safe(".".join(n.split(".")[-2:]))})
    prefixes = sorted({n.split(".", 1)[0] for n in linear_names if "." in n})
    words = sorted({parts[i - 1] for parts in (n.split(".") for n in linear_names)
                    for i in range(1, len(parts)) if parts[i].isdigit()})
    return Pools(leaves, suffixes, linear_names, prefixes, words or ["layers"])


class SeededChooser:
    """Choices from ``random.Random(seed)``."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def pick(self, seq: Sequence[Any]) -> Any:
        return self.rng.choice(list(seq))

    def coin(self, p: float = 0.5) -> bool:
        return self.rng.random() < p

    def some(self, seq: Sequence[Any], lo: int, hi: int) -> list[Any]:
        seq = list(seq)
        k = self.rng.randint(min(lo, len(seq)), min(hi, len(seq)))
        return self.rng.sample(seq, k)


class HypothesisChooser:
    """Choices drawn by hypothesis (``data.draw``), so a failing config shrinks."""

    def __init__(self, data) -> None:
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def pick(self, seq: Sequence[Any]) -> Any:
        return self.data.draw(self.st.sampled_from(list(seq)))

    def coin(self, p: float = 0.5) -> bool:
        return self.data.draw(self.st.integers(0, 99)) < int(p * 100)

    def some(self, seq: Sequence[Any], lo: int, hi: int) -> list[Any]:
        seq = list(seq)
        return self.data.draw(self.st.lists(self.st.sampled_from(seq), min_size=min(lo, len(seq)),
                                            max_size=min(hi, len(seq)), unique=True))


def _alt(names: Iterable[str]) -> str:
    return "|".join(re.escape(n) for n in names)


def _target_regex(c, p: Pools) -> str:
    leaves = c.some(p.leaves, 1, 3)
    alt = _alt(leaves)
    word = c.pick(p.layer_words)
    form = c.pick(["any", "prefix", "prefix-lookahead", "layer", "negative", "names"])
    if form == "any":
        return rf".*\.({alt})"
    if form == "prefix":  # swift v3.4 form
        return rf"^({re.escape(c.pick(p.prefixes))}.*\.({alt}))$"
    if form == "prefix-lookahead":  # swift v4 form
        return rf"^({re.escape(c.pick(p.prefixes))}(?=\.).*\.({alt}))$"
    if form == "layer":
        return rf".*\.{word}\.{c.pick([0, 1])}\..*\.({alt})"
    if form == "negative":
        return rf"(?!{re.escape(c.pick(p.prefixes))}).*\.({alt})"
    return _alt(c.some(p.fulls, 1, 4))


def _exclude(c, p: Pools) -> str | list[str]:
    if c.coin(0.5):
        word = c.pick(p.layer_words)
        return c.pick([
            rf".*\.{word}\.{c.pick([0, 1])}\..*",
            rf"{re.escape(c.pick(p.prefixes))}\..*",
            rf".*({_alt(c.some(p.leaves, 1, 2))})",
            r".*\.mlp\..*",
        ])
    return c.some(p.leaves + p.suffixes + p.fulls + p.prefixes, 1, 3)


def _pattern_key(c, p: Pools) -> str:
    word = c.pick(p.layer_words)
    kind = c.pick(["leaf", "suffix", "full", "alternation", "anchored", "bare-prefix", "layer", "full", "leaf"])
    if kind == "leaf":
        return c.pick(p.leaves)
    if kind == "suffix":
        return c.pick(p.suffixes)
    if kind == "full":
        return c.pick(p.fulls)
    if kind == "alternation":  # PEFT <= 0.14: `.*\.a|b$` is two alternatives; >= 0.15: a group
        a, b = (c.some(p.leaves, 2, 2) * 2)[:2]
        return f"{a}|{b}"
    if kind == "anchored":  # `^` only means "from the start" from PEFT 0.15 on
        return rf"^{re.escape(c.pick(p.prefixes))}\..*"
    if kind == "bare-prefix":  # no dot before it at the start of a name: only PEFT >= 0.15 matches
        return rf"{re.escape(c.pick(p.prefixes))}\..*\.{c.pick(p.leaves)}"
    return rf"{word}\.{c.pick([0, 1])}\..*"


def gen_config(c, p: Pools, *, exclude: bool = True) -> dict[str, Any]:
    """One LoraConfig (as its JSON fields) that PEFT 0.14 accepts."""
    cfg: dict[str, Any] = {"r": c.pick([4, 8, 16, 24]), "lora_alpha": c.pick([8, 16, 32]),
                           "use_rslora": c.coin(0.4)}
    if c.coin(0.5):
        cfg["target_modules"] = _target_regex(c, p)
    else:
        cfg["target_modules"] = sorted(set(c.some(p.leaves + p.suffixes + p.fulls[:6], 1, 4)))
        if c.coin(0.6):
            cfg["layers_to_transform"] = c.pick([0, 1, [0], [1], [0, 1], [1, 3]])
            if cfg["layers_to_transform"] != 0 and c.coin(0.7):  # PEFT 0.14-0.20: a pattern needs a truthy selection
                word = c.pick(p.layer_words)
                cfg["layers_pattern"] = c.pick([word, word, [word, "h"], "blocks", ""])
    if exclude and c.coin(0.35):
        cfg["exclude_modules"] = _exclude(c, p)
    if c.coin(0.6):
        cfg["rank_pattern"] = {_pattern_key(c, p): c.pick([4, 12, 16, 24, 48]) for _ in range(c.pick([1, 2, 3]))}
    if c.coin(0.6):
        cfg["alpha_pattern"] = {_pattern_key(c, p): c.pick([4, 8, 16, 32, 64]) for _ in range(c.pick([1, 2, 3]))}
    return cfg
