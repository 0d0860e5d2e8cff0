"""Tensor parallelism, every rank of TP=2 and TP=4 simulated on CPU in this process.

LMDeploy decides each layer's shard while it builds and loads the model, from the current
``DistContext`` (``get_dist_manager().current_context()``: the config's tp and the group's rank);
the process groups themselves are only used by the forward's all-reduce. So each rank is built by
LMDeploy's own ``build_patched_model`` + ``load_model_weights`` inside a ``DistContext`` that holds
``DistConfig(tp=N)`` and this rank, without ``torch.distributed``; nothing is mocked.

The tiny models have 4 query heads and 2 KV heads, so TP=4 replicates each KV head on two ranks.
Two checks per rank and TP size:

* per rank: the plugin's slots equal ``W_merged - W_base`` where both are LMDeploy's own shards of
  the PEFT-merged and base checkpoints (``verify.compare``): the plugin cuts lora_A/lora_B exactly
  as LMDeploy cuts the base weight;
* across ranks: the ranks' slot deltas, put back together by the layout LMDeploy shards in (row
  blocks per packed section, KV replicas once, column blocks for row-parallel layers), equal the
  single-process deltas; the same reassembly applied to the base weights gives the full base
  weights back, which pins that layout to LMDeploy's.
"""

from __future__ import annotations

import pytest
import torch

from lmdeploy_regex_lora.testing.compare import compare, linear_modules, slot_delta
from tests.support.peft_fixtures import make_peft_adapter, merge_adapter_checkpoint

pytestmark = pytest.mark.slow

QWEN_LEAVES = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
CASES = {
    # packed qkv_proj / gate_up_proj (colwise), o_proj / down_proj (rowwise), lm_head (not sharded)
    "qwen2": [
        dict(target_modules=rf"^(model.*\.({QWEN_LEAVES}))$", r=24, lora_alpha=48),
        dict(target_modules=["k_proj", "v_proj", "up_proj", "lm_head"], r=8, lora_alpha=16, use_rslora=True),
    ],
    # InternLM2: wqkv is one interleaved QKV linear (not packed), w1/w3 packed into gate_up_proj
    "internlm2": [
        dict(target_modules=r"^(model.*\.(wqkv|wo|w1|w2|w3))$", r=16, lora_alpha=8),
        dict(target_modules=["wqkv", "w3"], r=4, lora_alpha=8),
    ],
}


def _dist_context(tp: int, rank: int):
    from lmdeploy.pytorch.config import DistConfig
    from lmdeploy.pytorch.distributed import DistContext, DistGroup

    config = DistConfig(tp=tp)
    groups = {f"{k}_group": DistGroup(rank=rank) for k in ("tp", "attn_tp", "mlp_tp", "moe_tp")}
    return DistContext(rank=rank, dist_config=config, **groups)


def build_rank(path, tp: int, rank: int, adapters: dict[str, str] | None = None) -> torch.nn.Module:
    """LMDeploy's model for one TP rank (BaseModelAgent._build_model's steps), adapters through the hook."""
    from lmdeploy.pytorch.config import ModelConfig
    from lmdeploy.pytorch.distributed import get_dist_manager
    from lmdeploy.pytorch.model_inputs import BuildModelContext
    from lmdeploy.pytorch.models import patch
    from lmdeploy.pytorch.weight_loader.model_weight_loader import load_model_weights

    ctx = _dist_context(tp, rank)
    with get_dist_manager().context(ctx):
        cfg = ModelConfig.from_pretrained(str(path), trust_remote_code=True, dtype="float32",
                                          dist_config=ctx.dist_config)
        build_ctx = BuildModelContext(quant_config=cfg.quant_config, fp32_lm_head=cfg.fp32_lm_head,
                                      tie_word_embeddings=cfg.tie_word_embeddings)
        model = patch.build_patched_model(cfg, device=torch.device("cpu"), build_model_ctx=build_ctx)
        load_model_weights(model, str(path), device=torch.device("cpu"))
        if adapters:
            patch.add_adapters(model, adapters, dtype=torch.float32, device=torch.device("cpu"))
    return model


def reassemble(mods: list[torch.nn.Module], shards: list[torch.Tensor]) -> torch.Tensor:
    """Put per-rank (out, in) tensors of one linear back together in LMDeploy's sharding layout."""
    first = mods[0]
    if not first.is_tp:
        for other in shards[1:]:
            assert torch.equal(other, shards[0]), "an unsharded layer differs between ranks"
        return shards[0]
    if not first.colwise:
        return torch.cat(shards, dim=1)
    world = len(mods)
    sections = []
    for index in range(len(getattr(first, "all_out_features", [first.out_features]))):
        parts = [s.split(list(getattr(m, "all_out_features", [m.out_features])), 0)[index]
                 for m, s in zip(mods, shards, strict=True)]
        replicas = getattr(first, "num_replicate_kv_heads", 1) if index in (1, 2) else 1
        if hasattr(first, "qkv_split_section") and replicas > 1:
            for r in range(world):
                assert torch.equal(parts[r], parts[r - r % replicas]), f"KV replica on rank {r} differs"
            parts = parts[::replicas]
        sections.append(torch.cat(parts, 0))
    return torch.cat(sections, 0)


@pytest.fixture(scope="module")
def adapters_for(tiny_model, tmp_path_factory):
    """arch -> (base dir, {name: adapter dir}, {adapter id: merged dir}), made once per module."""
    made = {}

    def get(arch: str):
        if arch not in made:
            base = tiny_model(arch)
            root = tmp_path_factory.mktemp(f"tp-{arch}")
            adapters, merged = {}, {}
            for i, spec in enumerate(CASES[arch]):
                adir = make_peft_adapter(base, root / f"a{i}", seed=21 + i, **spec)
                adapters[f"a{i}"] = str(adir)
                merged[i + 1] = merge_adapter_checkpoint(base, adir, root / f"a{i}-merged")
            made[arch] = (base, adapters, merged)
        return made[arch]

    return get


@pytest.mark.parametrize("arch", sorted(CASES))
def test_shards_match_lmdeploys_sharding_and_reassemble(arch, adapters_for, plugin_installed):
    base_dir, adapters, merged_dirs = adapters_for(arch)
    single = build_rank(base_dir, 1, 0, adapters)
    single_base = build_rank(base_dir, 1, 0)
    single_lin, single_base_lin = linear_modules(single), linear_modules(single_base)
    seen_replication = seen_rowwise = seen_packed = 0
    for tp in (2, 4):
        ranks = []
        for rank in range(tp):
            served = build_rank(base_dir, tp, rank, adapters)
            base = build_rank(base_dir, tp, rank)
            merged = {aid: build_rank(d, tp, rank) for aid, d in merged_dirs.items()}
            stats = compare(served, base, merged)
            assert stats["targeted"] > 0, (tp, rank, stats)
            ranks.append((linear_modules(served), linear_modules(base)))
        for name, full_mod in single_lin.items():
            mods = [served_lin[name] for served_lin, _ in ranks]
            if mods[0].is_tp:
                assert mods[0].tp == tp, (name, mods[0].tp)
            # the layout is LMDeploy's: the base shards reassemble into the full base weight
            base_shards = [base_lin[name].weight.detach().double() for _, base_lin in ranks]
            assert torch.equal(reassemble(mods, base_shards), single_base_lin[name].weight.detach().double()), name
            for aid in range(1, len(adapters) + 1):
                want = slot_delta(full_mod, aid)
                got = reassemble(mods, [slot_delta(m, aid) for m in mods])
                assert got.shape == want.shape, (name, tp, got.shape, want.shape)
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"{name} tp={tp} adapter {aid}")
            if len(full_mod.lora_adapters):
                seen_rowwise += mods[0].is_tp and not mods[0].colwise
                seen_packed += len(full_mod.lora_adapters) > 1
                seen_replication += getattr(mods[0], "num_replicate_kv_heads", 1) > 1
    # the interesting layouts were really exercised
    assert seen_rowwise and seen_replication
    if arch == "qwen2":
        assert seen_packed


def test_lmdeploys_own_lora_loader_cannot_place_replicated_kv(adapters_for, plugin_installed):
    """Why the slots are filled from the traced rows: at TP=4 with 2 KV heads, LMDeploy's ``LoRA.weight_loader_B``
    chunks a packed k_proj lora_B into 4 plain row blocks, while the rank's k section holds one whole KV head
    (the base loader's ``chunk_size = tp // num_replicate_kv_heads``); the trace of the base loader knows that."""
    from lmdeploy.pytorch.distributed import get_dist_manager

    from lmdeploy_regex_lora.serve.model_map import ModelMap
    from lmdeploy_regex_lora.serve.sites import local_lora

    base_dir, adapters, _ = adapters_for("qwen2")
    served = build_rank(base_dir, 4, 3, adapters)
    qkv = served.model.layers[0].self_attn.qkv_proj
    k_slot = qkv.lora_adapters["k_proj"]
    assert qkv.num_replicate_kv_heads == 2
    r = int(k_slot.adapter_info.ranks[1])
    full_b = torch.randn(qkv.qkv_split_section[1], r)
    with get_dist_manager().context(_dist_context(4, 3)), torch.inference_mode():
        scratch = k_slot.lora_B.detach().clone()
        with pytest.raises(RuntimeError):
            k_slot.weight_loader_B(scratch, full_b, adapter_id=1)
        site = ModelMap(served).site("model.layers.0.self_attn.k_proj")
    _, b_local = local_lora(site, torch.zeros(r, qkv.in_features), full_b)
    # rank 3 holds the second KV head: rows head_size.. of the full k section
    assert torch.equal(b_local, full_b[qkv.head_size:2 * qkv.head_size])


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("fold", [False, True], ids=["per-request", "fold-mode"])
def test_vision_layers_on_every_rank(fold, tp, tiny_model, tmp_path, plugin_installed, monkeypatch):
    """Vision-tower LoRA on a TP rank must use that rank's cut of lora_A/lora_B (InternViT's qkv is column-,
    proj/fc2 row-parallel): in the image-row slots (per request, the default) and in the folded weight
    (``LMDEPLOY_REGEX_LORA_FOLD_VISION=1``).

    At TP=4 the tiny InternViT's 2 heads leave ranks 2 and 3 no head of attention at all (an uneven split):
    the trace of LMDeploy's loader gives those ranks no rows there, so nothing is folded on them. Before
    issue 11 the hand tables could not know the full size on such a rank and refused the adapter.
    """
    from lmdeploy_regex_lora.serve.vision import ImageRowLoRA

    monkeypatch.setenv("LMDEPLOY_REGEX_LORA_FOLD_VISION", "1" if fold else "0")
    base_dir = tiny_model("internvl2_internlm2")
    specs = [dict(target_modules=r"^(vision_model.*\.(qkv|proj|fc1|fc2)|language_model.*\.(wqkv|wo))$", r=8,
                  lora_alpha=16),
             dict(target_modules=r"^(vision_model.*\.(qkv|fc2)|language_model.*\.wqkv)$", r=4, lora_alpha=8)]
    adapters, merged_dirs = {}, {}
    for i, spec in enumerate(specs):
        adir = make_peft_adapter(base_dir, tmp_path / f"a{i}", seed=51 + i, **spec)
        adapters[f"a{i}"] = str(adir)
        merged_dirs[i + 1] = merge_adapter_checkpoint(base_dir, adir, tmp_path / f"a{i}-merged")
    if fold:  # one delta per folded layer: the second adapter keeps to the LLM
        adapters["a1"] = str(make_peft_adapter(base_dir, tmp_path / "llm", seed=52, target_modules=["wqkv"], r=4))
        merged_dirs[2] = merge_adapter_checkpoint(base_dir, adapters["a1"], tmp_path / "llm-merged")
    sharded = 0
    for rank in range(tp):
        served = build_rank(base_dir, tp, rank, adapters)
        vision = {n: m for n, m in linear_modules(served).items()
                  if n.startswith("vision_model.") and m.weight.numel()}  # ranks 2, 3 of TP=4 hold no head
        sharded += sum(m.is_tp for m in vision.values())
        merged = {aid: build_rank(d, tp, rank) for aid, d in merged_dirs.items()}
        folded = set(vision) if fold else set()
        stats = compare(served, build_rank(base_dir, tp, rank), merged, folded=folded)
        assert stats["targeted"] > 0, (rank, stats)
        if fold:
            assert stats["folded"] == len(folded), (rank, stats)
        else:
            assert all(isinstance(lora, ImageRowLoRA) for m in vision.values() for lora in m.lora_adapters.values())
            assert all(m in stats["per_module"] for m in vision), (rank, stats)
    assert sharded, "no vision layer was split across ranks"
