"""The plugin's config semantics against PEFT itself.

Three kinds of reference, each named where it is used:

* **PEFT 0.14 (installed)**: real ``get_peft_model`` injection into the module trees of the covered
  models; every wrapped ``LoraLayer``'s ``r`` and ``scaling`` is compared with what the plugin
  resolves from the adapter PEFT saved (:func:`test_injection_differential`), and PEFT's
  ``merge_and_unload`` is compared with the served model end to end (:func:`test_served_equals_merged`).
* **PEFT 0.10 .. 0.21 (their own source)**: the matching and rank/alpha code of each release, read from
  its wheel (``tests/support/peft_releases.py``), against the plugin's rules for that ``peft_version``
  (:func:`test_every_release_matches_like_the_plugin`).
* **Hand-derived tables** from the rule tables in ``lora-serving-peers.md`` §2, for the rules of the
  releases that are not installed (:func:`test_pattern_rules_by_hand`, :func:`test_layer_index_by_hand`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import tempfile
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lmdeploy_regex_lora.errors import AdapterError
from lmdeploy_regex_lora.serve.config import parse_adapter_config, read_adapter_config
from lmdeploy_regex_lora.serve.matching import (
    PatternKeys,
    TargetMatcher,
    layer_index,
    layer_rules_for,
    pattern_rule_for,
    resolve_targets,
)
from lmdeploy_regex_lora.serve.model_map import ModelMap
from lmdeploy_regex_lora.serve.plan import target_names
from lmdeploy_regex_lora.serve.weights import read_adapter_tensors
from lmdeploy_regex_lora.testing.build import build_lmdeploy_model
from tests.support.config_gen import HypothesisChooser, SeededChooser, gen_config, pools_for
from tests.support.peft_fixtures import build_hf_module_tree, make_peft_adapter, merge_adapter_checkpoint
from tests.support.peft_releases import RELEASES, load_oracle

# arch -> naming of the tree the adapters are trained on (internvl_hf: transformers >= 4.52 names).
ARCHS = {
    "qwen2": "checkpoint", "llama": "checkpoint", "internlm2": "checkpoint", "internvl2_internlm2": "checkpoint",
    "internvl_qwen2": "checkpoint", "internvl_hf": "tf452", "qwen2_vl": "checkpoint", "llava": "checkpoint",
}
CONFIGS_PER_ARCH = 40  # real PEFT injections per arch in the differential (8 archs)
RELEASE_TABLE = 120  # seeded configs per tree in the cross-release test ...
RELEASE_EXAMPLES = 60  # ... then hypothesis examples


def cfg_of(raw: dict, name: str = "gen", path: str = "/nonexistent-adapter") -> object:
    return parse_adapter_config(name, path, raw)


# -- module trees ---------------------------------------------------------------------------------------

class Env:
    """One arch: PEFT's tree (HF names), LMDeploy's model map, and name pools for the generator."""

    def __init__(self, arch: str, base: Path) -> None:
        self.arch, self.base, self.naming = arch, base, ARCHS[arch]
        self.tree = build_hf_module_tree(base, self.naming)
        self.linears = [n for n, m in self.tree.named_modules() if isinstance(m, nn.Linear)]
        others = [n for n, m in self.tree.named_modules() if not isinstance(m, nn.Linear)]
        self.pools = pools_for(self.linears, others)
        self.model_map = ModelMap(build_lmdeploy_model(base))


@pytest.fixture(scope="module")
def env(tiny_model):
    cache: dict[str, Env] = {}

    def get(arch: str) -> Env:
        if arch not in cache:
            cache[arch] = Env(arch, tiny_model(arch))
        return cache[arch]

    return get


def moe_names(top_level: bool = False) -> list[str]:
    """Linear names of a small MoE decoder (two numbered parts per expert name)."""
    root = "" if top_level else "model."
    names = []
    for i in range(2):
        names.append(f"{root}layers.{i}.self_attn.q_proj")
        for j in range(3):
            names += [f"{root}layers.{i}.mlp.experts.{j}.{leaf}" for leaf in ("gate_proj", "up_proj", "down_proj")]
    return names


def _containers(names: list[str]) -> list[str]:
    return sorted({".".join(n.split(".")[:k]) for n in names for k in range(1, n.count(".") + 1)})


def moe_tree(top_level: bool = False) -> nn.Module:
    root = nn.Module()
    for name in moe_names(top_level):
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(leaf, nn.Linear(8, 8, bias=False))
    return root


# -- PEFT 0.10 .. 0.21, from their own source ------------------------------------------------------------

@pytest.fixture(scope="module")
def oracles():
    out = {}
    for version in RELEASES:
        oracle = load_oracle(version)
        if isinstance(oracle, str):
            pytest.skip(f"PEFT {version}'s source is not available here: {oracle}")
        out[version] = oracle
    return out


def test_release_oracle_is_peft_itself(oracles):
    """The 0.14 code read from the wheel decides exactly as the installed PEFT 0.14 does."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    pools = pools_for(moe_names(), _containers(moe_names()))
    checked = 0
    for seed in range(60):
        raw = gen_config(SeededChooser(seed), pools)
        real = LoraConfig(**raw)
        for name in moe_names():
            assert oracles["0.14.0"].targets(raw, name) == bool(check_target_module_exists(real, name)), (raw, name)
            checked += 1
    assert checked == 60 * len(moe_names())


TREES = ("qwen2", "internvl2_internlm2", "internvl_hf", "moe", "moe-top-level")


@pytest.mark.parametrize("tree", TREES)
def test_every_release_matches_like_the_plugin(tree, oracles, env):
    """For generated configs, each release's own code and the plugin (told that release) agree on every module:
    targeted or not, and the rank and alpha its rank_pattern / alpha_pattern give. A fixed seeded table
    (whose coverage of every rule change is asserted) and then hypothesis (which shrinks a failure)."""
    if tree.startswith("moe"):
        names = moe_names(top_level=tree == "moe-top-level")
        pools = pools_for(names, _containers(names))
    else:
        names, pools = env(tree).linears, env(tree).pools
    seen = Counter()

    def compare(base: dict) -> None:
        verdicts = {}
        for version, oracle in oracles.items():
            raw = dict(base, peft_version=version)
            if tuple(int(x) for x in version.split(".")[:2]) < (0, 14):
                raw.pop("exclude_modules", None)  # the field does not exist before PEFT 0.14
            cfg = cfg_of(raw)
            matcher = TargetMatcher(cfg, layer_rules_for(cfg)[0])
            keys, rule = PatternKeys(cfg), pattern_rule_for(cfg)
            for name in names:
                theirs = oracle.targets(raw, name)
                assert matcher.match(name).targeted == theirs, (version, raw, name, matcher.match(name).reason)
                r_alpha = oracle.r_alpha(raw, name)
                assert keys.rank_and_alpha(name, rule)[:2] == r_alpha, (version, raw, name)
                seen["targeted" if theirs else "not targeted"] += 1
                verdicts[version, name] = (theirs, r_alpha)
        seen["configs"] += 1
        # Count the configs on which neighbouring releases really decide differently.
        for old, new in zip(RELEASES, RELEASES[1:], strict=False):
            if old == "0.13.2" and "exclude_modules" in base:
                continue  # differs because the field is new in 0.14
            if any(verdicts[old, n] != verdicts[new, n] for n in names):
                seen[f"{old} != {new}"] += 1

    for seed in range(RELEASE_TABLE):
        compare(gen_config(SeededChooser(zlib.crc32(f"{tree}:{seed}".encode())), pools))
    print(f"\n{tree}: {dict(seen)}")
    assert seen["configs"] == RELEASE_TABLE and seen["targeted"] and seen["not targeted"], seen
    # Every rule change the tree can show was exercised.
    assert seen["0.13.2 != 0.14.0"] and seen["0.14.0 != 0.15.2"], seen
    if tree == "moe":
        assert seen["0.19.1 != 0.20.0"], seen
    if tree == "moe-top-level":
        assert seen["0.20.0 != 0.21.2"], seen

    @settings(max_examples=RELEASE_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def explore(data):
        compare(gen_config(HypothesisChooser(data), pools))

    explore()


# -- hand-derived rule tables (releases that are not installed) ------------------------------------------

Q0, V0, Q1 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj"
RULES = ("peft<=0.13", "peft==0.14", "peft>=0.15")
# (r, lora_alpha, rank_pattern, alpha_pattern, name, {rule: (rank, alpha)}), each derived by hand from
# lora-serving-peers.md §2: <=0.13 one key from chain(rank, alpha) for both; 0.14 re.match(rf".*\.{key}$")
# per dict, full-name fallback; >=0.15 re.match(rf"(.*\.)?({key})$"), first key in dict order.
PATTERN_TABLE = [
    (8, 8, {"q_proj": 16}, {}, Q0, {r: (16, 8) for r in RULES}),
    # bug #2195: <=0.13 looks the rank key up in alpha_pattern too, so alpha falls back to lora_alpha
    (8, 8, {"q_proj": 16}, {Q0: 64}, Q0, {"peft<=0.13": (16, 8), "peft==0.14": (16, 64), "peft>=0.15": (16, 64)}),
    # alternation: before 0.15 `.*\.q_proj|v_proj$` is (.*\.q_proj) | (v_proj$ at the start)
    (8, 8, {"q_proj|v_proj": 4}, {}, Q0, {r: (4, 8) for r in RULES}),
    (8, 8, {"q_proj|v_proj": 4}, {}, V0, {"peft<=0.13": (8, 8), "peft==0.14": (8, 8), "peft>=0.15": (4, 8)}),
    # `^` only anchors from 0.15 on
    (8, 8, {r"^model\.layers\.1\..*": 24}, {}, Q1, {"peft<=0.13": (8, 8), "peft==0.14": (8, 8),
                                                    "peft>=0.15": (24, 8)}),
    (8, 8, {r"^model\.layers\.1\..*": 24}, {}, Q0, {r: (8, 8) for r in RULES}),
    # a top-level module: the full-name fallback before 0.15, the optional prefix from 0.15
    (8, 8, {"lm_head": 4}, {"lm_head": 2}, "lm_head", {r: (4, 2) for r in RULES}),
    (8, 8, {"lm_head": 4}, {}, "language_model.lm_head", {r: (4, 8) for r in RULES}),
    # dict order: from 0.15 the first matching key wins; before, the full name needs a dot in front
    (8, 8, {Q0: 4, "q_proj": 16}, {}, Q0, {"peft<=0.13": (16, 8), "peft==0.14": (16, 8), "peft>=0.15": (4, 8)}),
    (8, 8, {"q_proj": 16, Q0: 4}, {}, Q0, {r: (16, 8) for r in RULES}),
    # <=0.13: the first key (from rank_pattern) is used for alpha too
    (8, 8, {r"layers\.0\..*": 12}, {"q_proj": 2}, Q0, {"peft<=0.13": (12, 8), "peft==0.14": (12, 2),
                                                      "peft>=0.15": (12, 2)}),
    (8, 8, {r"layers\.0\..*": 12}, {"q_proj": 2}, Q1, {r: (8, 2) for r in RULES}),
    (8, 8, {}, {"v_proj": 32}, V0, {r: (8, 32) for r in RULES}),
    (4, 16, {"self_attn.q_proj": 32}, {}, Q0, {r: (32, 16) for r in RULES}),
]


@pytest.mark.parametrize("row", range(len(PATTERN_TABLE)))
def test_pattern_rules_by_hand(row):
    r, alpha, rank_pattern, alpha_pattern, name, expected = PATTERN_TABLE[row]
    cfg = cfg_of({"r": r, "lora_alpha": alpha, "target_modules": ["q_proj"], "rank_pattern": rank_pattern,
                  "alpha_pattern": alpha_pattern})
    keys = PatternKeys(cfg)
    got = {rule: keys.rank_and_alpha(name, rule)[:2] for rule in RULES}
    assert got == expected


# name, layers_pattern, {rule: index}: greedy `.*\.` takes the last ".N.", lazy the first; from 0.21 a
# layers_pattern may also start the name.
LAYER_TABLE = [
    ("model.layers.3.mlp.experts.7.gate_proj", None, {"greedy": 7, "lazy": 3, "lazy-start": 3}),
    ("model.layers.3.mlp.experts.7.gate_proj", ("layers",), {"greedy": 3, "lazy": 3, "lazy-start": 3}),
    ("model.layers.3.mlp.experts.7.gate_proj", ("experts",), {"greedy": 7, "lazy": 7, "lazy-start": 7}),
    ("layers.2.mlp.down_proj", None, {"greedy": None, "lazy": None, "lazy-start": None}),
    ("layers.2.mlp.down_proj", ("layers",), {"greedy": None, "lazy": None, "lazy-start": 2}),
    ("model.layers.0.self_attn.q_proj", None, {"greedy": 0, "lazy": 0, "lazy-start": 0}),
    ("vision_model.encoder.layers.1.attn.qkv", None, {"greedy": 1, "lazy": 1, "lazy-start": 1}),
    ("mlp1.1", None, {"greedy": None, "lazy": None, "lazy-start": None}),
    ("transformer.h.5.attn.c_attn", ("layers", "h"), {"greedy": 5, "lazy": 5, "lazy-start": 5}),
]


@pytest.mark.parametrize("row", range(len(LAYER_TABLE)))
def test_layer_index_by_hand(row):
    name, pattern, expected = LAYER_TABLE[row]
    assert {rule: layer_index(name, pattern, rule) for rule in expected} == expected


@pytest.mark.parametrize("version, layer_rule, pattern_rule", [
    (None, "greedy", "peft>=0.15"), ("0.10.0", "greedy", "peft<=0.13"), ("0.13.2", "greedy", "peft<=0.13"),
    ("0.14.0", "greedy", "peft==0.14"), ("0.15.0", "greedy", "peft>=0.15"), ("0.19.1", "greedy", "peft>=0.15"),
    ("0.20.0", "lazy", "peft>=0.15"), ("0.20.1.dev0@0123abc", "lazy", "peft>=0.15"),
    ("0.21.2", "lazy-start", "peft>=0.15"), ("1.0.0", "lazy-start", "peft>=0.15"),
    ("unknown", "greedy", "peft>=0.15"),
])
def test_recorded_version_picks_its_rules(version, layer_rule, pattern_rule):
    raw = {"target_modules": ["q_proj"]} | ({"peft_version": version} if version else {})
    cfg = cfg_of(raw)
    assert layer_rules_for(cfg)[0] == layer_rule and pattern_rule_for(cfg) == pattern_rule


# -- the layer rule the tensors ask for ------------------------------------------------------------------

def _peft014_model(tree: nn.Module, raw: dict):
    """Real PEFT 0.14 injection into a copy of ``tree``."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(tree), LoraConfig(**raw, init_lora_weights=False))


def _peft014_reload(tree: nn.Module, folder: Path):
    """PEFT 0.14 loading a saved adapter onto a copy of ``tree`` (what it serves)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(tree), str(folder))


def _wrapped(model) -> dict[str, tuple[int, float]]:
    """Wrapped module name -> (r, scaling), read from PEFT's LoraLayer objects."""
    from peft.tuners.lora import LoraLayer

    return {n: (m.r["default"], m.scaling["default"]) for n, m in model.base_model.model.named_modules()
            if isinstance(m, LoraLayer)}


def test_layer_rule_follows_the_tensors(oracles):
    """MoE names: greedy (PEFT <= 0.19: real PEFT 0.14), lazy (PEFT 0.20's code) and lazy-start (0.21's code)
    select different experts; the plugin serves whichever the adapter's tensors were trained with."""
    raw = {"r": 8, "target_modules": ["gate_proj", "q_proj"], "layers_to_transform": [1]}
    names = moe_names()
    greedy = set(_wrapped(_peft014_model(moe_tree(), raw)))
    lazy = {n for n in names if oracles["0.20.0"].targets(raw, n)}
    assert greedy != lazy  # the rules really differ on this tree
    for trained, version, rule, noted in [(greedy, None, "greedy", False), (lazy, None, "lazy", True),
                                          (lazy, "0.20.0", "lazy", False), (greedy, "0.20.0", "greedy", True)]:
        cfg = cfg_of(raw | ({"peft_version": version} if version else {}))
        res = resolve_targets(cfg, names, dict.fromkeys(trained, 8), "w.safetensors")
        assert set(res.modules) == trained and res.layer_rule == rule
        assert all(("layer-index rule does not select" in m.reason) == noted for m in res.modules.values())
    # A layers_pattern at the very start of the name counts only from PEFT 0.21 on.
    top = moe_names(top_level=True)
    raw = {"r": 8, "target_modules": ["gate_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}
    trained = {n for n in top if oracles["0.21.2"].targets(raw, n)}
    assert trained and not any(oracles["0.20.0"].targets(raw, n) for n in top)
    res = resolve_targets(cfg_of(raw | {"peft_version": "0.21.2"}), top, dict.fromkeys(trained, 8), "w")
    assert set(res.modules) == trained and res.layer_rule == "lazy-start"
    # Tensors no rule selects: refused, naming a module.
    with pytest.raises(AdapterError, match="has no lora_A/lora_B") as info:
        resolve_targets(cfg_of(raw), top, dict.fromkeys(sorted(trained)[:1], 8), "w")
    assert info.value.module in trained


# -- rank/alpha rule choice, recorded versions, ambiguity -------------------------------------------------

def test_pattern_rule_recorded_ambiguous_and_forced(caplog):
    names = [Q0, V0, Q1]
    # #2195: ranks cannot tell <=0.13 (alpha 8) from later rules (alpha 64).
    raw = {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "rank_pattern": {"q_proj": 16},
           "alpha_pattern": {Q0: 64}}
    ranks = {Q0: 16, Q1: 16}
    with caplog.at_level(logging.WARNING, logger="lmdeploy.regex_lora"):
        res = resolve_targets(cfg_of(raw), names, ranks, "w")
    q0 = res.modules[Q0]
    assert (q0.alpha, q0.scaling) == (64.0, 4.0) and res.pattern_rule == "peft>=0.15"
    assert "AMBIGUOUS" in q0.reason and "peft<=0.13 would give alpha 8" in q0.reason
    assert "AMBIGUOUS" not in res.modules[Q1].reason and "peft<=0.13 would give alpha 8" in caplog.text
    for version, alpha in [("0.13.2", 8.0), ("0.14.0", 64.0), ("0.17.1", 64.0)]:
        res = resolve_targets(cfg_of(raw | {"peft_version": version}), names, ranks, "w")
        assert res.modules[Q0].alpha == alpha and "AMBIGUOUS" not in res.modules[Q0].reason
    # Dict order: >= 0.15 gives Q0 rank 4, <= 0.14 rank 16. Tensors of rank 16 force the old rule.
    raw = {"r": 8, "target_modules": ["q_proj"], "rank_pattern": {Q0: 4, "q_proj": 16}}
    for version in (None, "0.16.0"):
        res = resolve_targets(cfg_of(raw | ({"peft_version": version} if version else {})), names,
                              {Q0: 16, Q1: 16}, "w")
        assert res.pattern_rule == "peft==0.14" and "the peft==0.14 rule reproduces them" in res.modules[Q0].reason
    res = resolve_targets(cfg_of(raw), names, {Q0: 4, Q1: 16}, "w")
    assert res.pattern_rule == "peft>=0.15" and res.modules[Q0].rank == 4
    with pytest.raises(AdapterError) as info:
        resolve_targets(cfg_of(raw), names, {Q0: 5, Q1: 16}, "w")
    assert info.value.field == "rank_pattern" and info.value.module == Q0 and "rank 5" in str(info.value)
    with pytest.raises(AdapterError) as info:
        resolve_targets(cfg_of(raw | {"target_modules": ["q_proj", "v_proj"]}), names, {Q0: 4, Q1: 16, V0: 12}, "w")
    assert info.value.field == "r" and info.value.module == V0 and "config gives this module rank 8" in str(info.value)


def test_bad_pattern_regex_is_refused():
    with pytest.raises(AdapterError) as info:
        PatternKeys(cfg_of({"target_modules": ["q_proj"], "alpha_pattern": {"q_proj(": 4}}))
    assert info.value.field == "alpha_pattern" and "q_proj(" in str(info.value)
    with pytest.raises(AdapterError) as info:
        TargetMatcher(cfg_of({"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "a(b"}))
    assert info.value.field == "layers_pattern"


# -- the differential against real PEFT 0.14 injection -----------------------------------------------------

def _resolve_saved(env: Env, folder: Path, name: str = "gen"):
    cfg = read_adapter_config(name, folder)
    tensors = read_adapter_tensors(name, folder)
    names, not_linear = target_names(env.model_map.naming_for(name, tensors.file, tensors.pairs), env.model_map)
    return resolve_targets(cfg, names, {n: p.rank for n, p in tensors.pairs.items()}, tensors.file, not_linear)


def _features(raw: dict) -> list[str]:
    out = ["regex" if isinstance(raw["target_modules"], str) else "list"]
    out += [k for k in ("exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern")
            if raw.get(k)]
    return out + (["use_rslora"] if raw["use_rslora"] else [])


STATS: dict[str, Counter] = {}


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_injection_differential(arch, env):
    """For generated configs, the plugin resolves exactly the modules real PEFT 0.14 wraps when it loads the
    saved adapter into the same tree, each with PEFT's r and scaling; with the config recording peft_version
    0.14.0, and without a version (then a module whose alpha the releases disagree on must be flagged
    AMBIGUOUS, naming PEFT 0.14's alpha)."""
    e = env(arch)
    stats = STATS.setdefault(arch, Counter())
    for seed in range(CONFIGS_PER_ARCH):
        raw = gen_config(SeededChooser(zlib.crc32(f"{arch}:{seed}".encode())), e.pools)
        stats.update(_features(raw))
        try:
            model = _peft014_model(e.tree, raw)
        except ValueError as exc:
            assert "not found in the base model" in str(exc) or "No modules were targeted" in str(exc), (raw, exc)
            matcher = TargetMatcher(cfg_of(raw))
            assert not any(matcher.match(n).targeted for n in e.linears), raw
            stats["peft: no target"] += 1
            continue
        trained = _wrapped(model)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            model.save_pretrained(str(folder))
            config_file = folder / "adapter_config.json"
            saved = json.loads(config_file.read_text())
            # The reference is PEFT loading the saved adapter. save_pretrained sorts the JSON keys, so where
            # pattern keys overlap, first-match-wins can pick another key than at training time.
            try:
                wrapped = _wrapped(_peft014_reload(e.tree, folder))
            except RuntimeError as exc:  # PEFT cannot load its own adapter: ranks changed with the key order
                assert "size mismatch" in str(exc), exc
                for version in ("0.14.0", None):
                    config_file.write_text(json.dumps(saved | ({"peft_version": version} if version else {})))
                    with pytest.raises(AdapterError, match="rank"):
                        _resolve_saved(e, folder)
                stats["PEFT cannot reload (both refuse)"] += 1
                continue
            stats["PEFT reload differs from training"] += wrapped != trained
            for version in ("0.14.0", None):
                config_file.write_text(json.dumps(saved | ({"peft_version": version} if version else {})))
                res = _resolve_saved(e, folder)
                assert set(res.modules) == set(wrapped), (raw, version)
                for n, (r, scaling) in wrapped.items():
                    got = res.modules[n]
                    if version is None and got.scaling != scaling:
                        alpha_peft = scaling * (math.sqrt(r) if raw["use_rslora"] else r)
                        assert "AMBIGUOUS" in got.reason and f"peft==0.14 would give alpha {alpha_peft:g}" in \
                            got.reason, (raw, n, got)
                        stats["ambiguous modules"] += 1
                        continue
                    assert (got.rank, got.scaling) == (r, scaling), (raw, version, n, got, (r, scaling))
                    if version == "0.14.0":
                        assert "AMBIGUOUS" not in got.reason
                stats[f"compared ({version or 'no version'})"] += 1
            stats["wrapped modules"] += len(wrapped)
    print(f"\n{arch}: {dict(stats)}")
    assert stats["compared (0.14.0)"] >= CONFIGS_PER_ARCH // 2, stats
    for feature in ("regex", "list", "exclude_modules", "layers_to_transform", "rank_pattern", "alpha_pattern",
                    "use_rslora"):
        assert stats[feature] >= 3, (feature, stats)


# -- end to end: served == PEFT's merge -------------------------------------------------------------------

EQUIVALENCE = {
    "qwen2-layers-patterns-exclude": ("qwen2", "checkpoint", [
        dict(target_modules=["q_proj", "o_proj", "down_proj"], r=16, lora_alpha=32, use_rslora=True,
             rank_pattern={"down_proj": 48}, alpha_pattern={"o_proj": 4},
             extra_config={"layers_to_transform": [1], "layers_pattern": "layers"}),
        dict(target_modules=r".*\.(q_proj|k_proj|gate_proj)", r=8, lora_alpha=16, rank_pattern={"gate_proj": 24},
             extra_config={"exclude_modules": ["model.layers.0.self_attn.k_proj"]}),
    ]),
    "internlm2-exclude-regex": ("internlm2", "checkpoint", [
        dict(target_modules=["wqkv", "w1", "w2"], r=8, lora_alpha=16,
             rank_pattern={"model.layers.0.attention.wqkv": 12}, alpha_pattern={"w2": 64},
             extra_config={"exclude_modules": r"model\.layers\.1\.feed_forward\..*"}),
        dict(target_modules=["wo"], r=24, lora_alpha=8, use_rslora=True, extra_config={"layers_to_transform": 0}),
    ]),
    # An anchored rank_pattern key: PEFT 0.14 (which trained it) ignores it, PEFT >= 0.15 would apply it. The
    # tensors' ranks make the plugin follow 0.14; the second adapter records its version.
    "internvl-qwen2-anchored-keys": ("internvl_qwen2", "checkpoint", [
        dict(target_modules=["q_proj", "v_proj", "up_proj"], r=8, lora_alpha=16,
             rank_pattern={r"^language_model\.model\.layers\.1\..*": 48}, extra_config={"exclude_modules": "mlp1.*"}),
        dict(target_modules=r"^(language_model(?=\.).*\.(q_proj|v_proj|o_proj))$", r=16, lora_alpha=16,
             alpha_pattern={"q_proj|v_proj": 64}, extra_config={"peft_version": "0.14.0"}),
    ]),
    # swift v2.3-v2.6 form on an LLM: also fullmatches the decoder layers, attention/MLP blocks and norms
    # (vanilla PEFT refuses it; swift's hook kept the linears), combined with a rank_pattern.
    "qwen2-swift-v2.6-container-regex": ("qwen2", "checkpoint", [
        dict(target_modules=r"^(model)(?!.*(lm_head|output|emb|wte|shared)).*", r=24, lora_alpha=32,
             rank_pattern={"mlp.down_proj": 48}),
        dict(target_modules=["k_proj"], r=8, lora_alpha=16, use_rslora=True),
    ]),
    "internvl-hf-exclude-vision": ("internvl_hf", "tf452", [
        dict(target_modules=["q_proj", "k_proj"], r=24, lora_alpha=24, use_rslora=True,
             extra_config={"exclude_modules": r"model\.vision_tower\..*", "layers_to_transform": [0, 1],
                           "layers_pattern": "layers"}),
        dict(target_modules=["gate_proj"], r=8, lora_alpha=16, rank_pattern={"layers.1.mlp.gate_proj": 48}),
    ]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(EQUIVALENCE))
def test_served_equals_merged(case, tiny_model, tmp_path, plugin_installed):
    """Served through LMDeploy's (hooked) add_adapters == PEFT's merge_and_unload, module by module."""
    from lmdeploy.pytorch.models import patch

    from lmdeploy_regex_lora.serve.loader import resolve
    from lmdeploy_regex_lora.testing.compare import compare, load_models

    arch, naming, specs = EQUIVALENCE[case]
    base_dir = tiny_model(arch)
    adapters, merged_dirs = {}, {}
    for i, spec in enumerate(specs):
        adir = make_peft_adapter(base_dir, tmp_path / f"a{i}", seed=31 + i, naming=naming, **spec)
        adapters[f"a{i}"] = str(adir)
        merged_dirs[i + 1] = merge_adapter_checkpoint(base_dir, adir, tmp_path / f"a{i}-merged")
    base, merged = load_models(base_dir, merged_dirs)
    served = build_lmdeploy_model(base_dir)
    plan = resolve(served, adapters).plan
    patch.add_adapters(served, adapters, dtype=torch.float32, device=torch.device("cpu"))
    stats = compare(served, base, merged)
    assert stats["targeted"] >= 2, stats
    # What each case is about shows in the plan.
    reasons = " | ".join(m.reason for a in plan.adapters for m in a.modules)
    if case == "qwen2-layers-patterns-exclude":
        assert "layer 1 in layers_to_transform [1]" in reasons and "rank_pattern['down_proj']" in reasons
        assert {m.rank for m in plan.adapters[0].modules} == {16, 48}
        assert not any(".layers.0." in m.hf_name for m in plan.adapters[0].modules)
        assert "model.layers.0.self_attn.k_proj" not in {m.hf_name for m in plan.adapters[1].modules}
    if case.startswith("internvl-qwen2"):
        assert "the peft==0.14 rule reproduces them" in reasons and plan.adapters[1].pattern_rule == "peft==0.14"
        v_alpha = {m.alpha for m in plan.adapters[1].modules if m.hf_name.endswith("v_proj")}
        assert v_alpha == {16.0}  # PEFT 0.14: `.*\.q_proj|v_proj$` does not reach v_proj
    if case.startswith("qwen2-swift"):
        assert len(plan.adapters[0].modules) == 14 and {m.rank for m in plan.adapters[0].modules} == {24, 48}
    if case.startswith("internvl-hf"):
        assert not any("vision" in m.hf_name for m in plan.adapters[0].modules)


# -- swift's regex forms (swift-adapters.md §1): only linears count, tensors decide ------------------------

SWIFT_FORMS = [
    # (arch, swift version, regex)
    ("internvl2_internlm2", "v2.2.4", r".*(wqkv|wo|w[123]|mlp1\.(1|3))$"),
    ("internvl_qwen2", "v2.2.4 (llama-like LLM)", r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
                                                  r"|mlp1\.(1|3))$"),
    ("internvl2_internlm2", "v2.3-v2.6", r"^(language_model|mlp1)(?!.*(lm_head|output|emb|wte|shared)).*"),
    ("internvl_qwen2", "v2.3-v2.6", r"^(language_model|mlp1)(?!.*(lm_head|output|emb|wte|shared)).*"),
    ("qwen2_vl", "v2.3-v2.6", r"^(model)(?!.*(lm_head|output|emb|wte|shared)).*"),
    ("llava", "v2.3-v2.6", r"^(language_model|multi_modal_projector)(?!.*(lm_head|output|emb|wte|shared)).*"),
    ("qwen2", "v2.3-v2.6 (regex on an LLM)", r"^(model)(?!.*(lm_head|output|emb|wte|shared)).*"),
    ("internvl2_internlm2", "v3.0.0", r"(?!^(mlp1))^(language_model)(?!.*(lora_A|lora_B|base_layer|emb|wte|shared"
                                      r"|lm_head|output)).*"),
    ("internvl_qwen2", "v3.0.3", r"(?!^(mlp1))^(language_model)(?!.*(lora_A|lora_B|base_layer|emb|wte|shared"
                                 r"|lm_head|output|score|v_head|classifier)).*"),
    ("qwen2_vl", "v3.0.3 freeze_vit=False", r"(?!^(visual.merger))^(model|visual)(?!.*(lora_A|lora_B|base_layer"
                                            r"|emb|wte|shared|lm_head|output|score|v_head|classifier)).*"),
    ("internvl2_internlm2", "v3.3.0.post1", r"(?!^(mlp1))^(language_model)(?!.*\b(lora_A|lora_B|base_layer"
                                            r"|\w*emb\w*|wte|shared|lm_head|output|score|v_head|classifier)\b).*"),
    ("internvl2_internlm2", "v3.3.1", r"^(language_model).*\.(output|w2|w3|w1|wo|wqkv)$"),
    ("internvl2_internlm2", "v3.4.1", r"^(language_model.*\.(output|w2|w3|w1|wo|wqkv))$"),
    ("internvl2_internlm2", "v4", r"^(language_model(?=\.).*\.(output|w2|w3|w1|wo|wqkv))$"),
    ("internvl2_internlm2", "v3.5 freeze_vit/aligner=False", r"^(language_model.*\.(output|w2|w3|w1|wo|wqkv)"
                                                             r"|vision_model.*\.(fc1|fc2|proj|qkv)|mlp1.*\.(1|3))$"),
    ("internvl2_internlm2", "v3.5 freeze_llm", r"^(vision_model.*\.(fc1|fc2|proj|qkv))$"),
    ("qwen2_vl", "v3.5", r"^(model.*\.(v_proj|gate_proj|o_proj|down_proj|q_proj|k_proj|up_proj))$"),
    ("llava", "v3.5", r"^(language_model.*\.(v_proj|gate_proj|o_proj|down_proj|q_proj|k_proj|up_proj))$"),
    ("llama", "v4 (regex on an LLM)", r"^(model(?=\.).*\.(q_proj|k_proj|v_proj|o_proj))$"),
]


@pytest.mark.parametrize("form", range(len(SWIFT_FORMS)), ids=[f"{a}-{v}" for a, v, _ in SWIFT_FORMS])
def test_swift_forms_select_exactly_the_linears(form, env, tmp_path):
    """A swift regex that also fullmatches blocks, norms or embeddings selects exactly the Linear layers it
    fullmatches (what swift's PEFT hook injected); its adapter resolves against LMDeploy's model without error."""
    arch, _, regex = SWIFT_FORMS[form]
    e = env(arch)
    pattern = re.compile(regex)
    expected = {n for n in e.linears if pattern.fullmatch(n)}
    matched_other = [n for n, m in e.tree.named_modules()
                     if n and pattern.fullmatch(n) and not isinstance(m, nn.Linear)]
    assert expected
    adir = make_peft_adapter(e.base, tmp_path / "a", target_modules=regex, r=8, naming=e.naming)
    res = _resolve_saved(e, adir)
    assert set(res.modules) == expected
    assert all(m.reason.startswith("target_modules regex fullmatch") for m in res.modules.values())
    # The forms that need swift's hook really hit non-linear modules, which the plugin never considers.
    if "v2.3" in SWIFT_FORMS[form][1] or "v3.0" in SWIFT_FORMS[form][1]:
        assert matched_other


def test_swift_v330_embedding_bug_is_refused(tiny_model, tmp_path):
    """swift v3.3.0's `\\bemb\\b` does not exclude tok_embeddings, so swift put LoRA on the embedding too
    (lora_embedding_A/B): refused by the tensors, naming the embedding."""
    from lmdeploy_regex_lora.serve.loader import resolve

    regex = (r"(?!^(mlp1))^(language_model)(?!.*\b(lora_A|lora_B|base_layer|emb|wte|shared|lm_head|output"
             r"|score|v_head|classifier)\b).*")
    base = tiny_model("internvl2_internlm2")
    adir = make_peft_adapter(base, tmp_path / "a", target_modules=regex, r=8)
    with pytest.raises(AdapterError) as info:
        resolve(build_lmdeploy_model(base), {"swift330": str(adir)})
    assert "tok_embeddings" in str(info.value) and "embedding" in str(info.value)


# -- the plan is plain data with reasons -----------------------------------------------------------------

def test_plan_says_why_each_module_matched(tiny_model, tmp_path):
    from lmdeploy_regex_lora.serve.loader import resolve

    base = tiny_model("qwen2")
    a = make_peft_adapter(base, tmp_path / "a", target_modules=["q_proj", "down_proj"], r=8, lora_alpha=16,
                          rank_pattern={"down_proj": 24}, extra_config={"layers_to_transform": [1]})
    b = make_peft_adapter(base, tmp_path / "b", target_modules=r".*\.(v_proj|up_proj)", r=4, lora_alpha=8,
                          use_rslora=True, alpha_pattern={"up_proj": 2},
                          extra_config={"exclude_modules": r".*\.layers\.0\.mlp\..*", "peft_version": "0.16.0"})
    plan = resolve(build_lmdeploy_model(base), {"a": str(a), "b": str(b)}).plan
    text = plan.render()
    data = json.loads(plan.to_json())
    by_name = {(ad["name"], m["hf_name"]): m for ad in data["adapters"] for m in ad["modules"]}
    q = by_name[("a", "model.layers.1.self_attn.q_proj")]
    assert "suffix 'q_proj'" in q["reason"] and "layer 1 in layers_to_transform [1]" in q["reason"]
    assert "greedy layer-index rule" in q["reason"] and q["rank"] == 8 and q["scaling"] == 2.0
    down = by_name[("a", "model.layers.1.mlp.down_proj")]
    assert "rank_pattern['down_proj']" in down["reason"] and down["rank"] == 24 and down["scaling"] == 16 / 24
    assert ("a", "model.layers.0.self_attn.q_proj") not in by_name
    up = by_name[("b", "model.layers.1.mlp.up_proj")]
    assert up["reason"].startswith("target_modules regex fullmatch") and "alpha_pattern['up_proj']" in up["reason"]
    assert "peft>=0.15 key rule" in up["reason"] and up["scaling"] == 2 / math.sqrt(4)
    assert ("b", "model.layers.0.mlp.up_proj") not in by_name  # excluded
    assert {ad["name"]: (ad["layer_rule"], ad["pattern_rule"]) for ad in data["adapters"]} == {
        "a": ("greedy", "peft>=0.15"), "b": (None, "peft>=0.15")}
    for reason in (q["reason"], down["reason"], up["reason"]):
        assert reason in text
