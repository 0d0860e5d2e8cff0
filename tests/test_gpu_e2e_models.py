"""benchmarks/gpu_e2e: the model, adapter and merged-checkpoint files, the tokenizer and the prompts, on CPU.

The files are real and checked against the outside: transformers loads the Qwen2 folder strictly, PEFT reads each
swift-style adapter and its own merge equals ours, and LMDeploy's ``Tokenizer`` names every id as the server will.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.gpu_e2e.dry_run import check_tokenizer
from benchmarks.gpu_e2e.models import ADAPTERS, ARCHS, LM_HEAD, Dims, make_prompts, prepare_models
from benchmarks.gpu_e2e.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, token_id, token_string

SMALL = Dims(vocab=64, hidden=32, intermediate=48, heads=4, kv_heads=2, layers=2)


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory):
    return prepare_models(tmp_path_factory.mktemp("gpu_e2e_small"), ARCHS, SMALL, seed=3)


def test_every_adapter_trains_its_regex_targets(small_sets):
    for arch, ms in small_sets.items():
        attn, head = ADAPTERS[arch]
        assert attn.r == 24 and head.r == 8
        head_module = LM_HEAD[arch]
        assert head_module in ms.targets[head.name] and head_module not in ms.targets[attn.name]
        # 2 layers: attention has 4 linears (qwen2) / 2 (internlm2) per layer, the MLP 3 plus the head.
        assert len(ms.targets[attn.name]) == {"qwen2": 8, "internlm2": 4}[arch]
        assert len(ms.targets[head.name]) == 2 * 3 + 1
        cfg = json.loads((ms.adapters[attn.name] / "adapter_config.json").read_text())
        assert cfg["target_modules"] == attn.regex and cfg["r"] == 24


def test_qwen2_folder_loads_strictly_into_transformers(small_sets):
    """transformers' own Qwen2 class takes every tensor at its shape (missing or extra keys would fail)."""
    from transformers import AutoModelForCausalLM

    ms = small_sets["qwen2"]
    model, info = AutoModelForCausalLM.from_pretrained(str(ms.base), dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.hidden_size == SMALL.hidden and model.lm_head.weight.shape == (SMALL.vocab, SMALL.hidden)


def test_base_weights_have_the_scales_the_run_assumes(small_sets):
    """The weights come from the package's tiny-model generator, rescaled (``TINY_STD``): embeddings std 1 with a
    zero padding row, linears 1/sqrt(fan_in), the LM head 2/sqrt(hidden), norms ~1; the special token ids of
    ``generation_config.json`` (the package's) are the tokenizer's."""
    for arch, ms in small_sets.items():
        weights = load_file(str(ms.base / "model.safetensors"))
        for key, t in weights.items():
            leaf = key.rsplit(".", 2)[-2]
            if t.dim() == 1:
                mean = 0.0 if key.endswith(".bias") else 1.0  # std 0.02 either way
                assert abs(t.mean().item() - mean) < 0.02 and t.std().item() < 0.04, key
                continue
            if leaf in ("embed_tokens", "tok_embeddings"):
                assert not t[PAD].any() and t[PAD + 1:].std().item() == pytest.approx(
                    1.0, rel=0.1), key
                continue
            want = (2.0 if leaf == LM_HEAD[arch] else 1.0) / t.shape[1] ** 0.5
            assert t.std().item() == pytest.approx(want, rel=0.1), key
        gen_cfg = json.loads((ms.base / "generation_config.json").read_text())
        ids = (gen_cfg["pad_token_id"], gen_cfg["bos_token_id"], gen_cfg["eos_token_id"])
        assert ids == (PAD, BOS, EOS)


def test_merged_checkpoints_equal_peft_merge(small_sets, tmp_path):
    """PEFT reads each swift-style adapter and its ``merge_and_unload`` gives our merged checkpoint."""
    from peft import LoraConfig

    from tests.support.peft_fixtures import merge_adapter_checkpoint

    for arch, ms in small_sets.items():
        for spec in ADAPTERS[arch]:
            cfg = LoraConfig.from_pretrained(str(ms.adapters[spec.name]))
            assert cfg.target_modules == spec.regex and cfg.r == spec.r and cfg.use_rslora == spec.use_rslora
            adapter = ms.adapters[spec.name]
            if arch == "internlm2":
                # PEFT's merge runs on a generic module tree here (InternLM2 is remote code), which PEFT's
                # CAUSAL_LM wrapper refuses; task_type only picks that wrapper, not the merge arithmetic.
                adapter = tmp_path / f"{arch}-{spec.name}-adapter"
                shutil.copytree(ms.adapters[spec.name], adapter)
                cfg_path = adapter / "adapter_config.json"
                cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "task_type": None}))
            ref = load_file(str(merge_adapter_checkpoint(ms.base, adapter, tmp_path / f"{arch}-{spec.name}")
                                / "model.safetensors"))
            ours = load_file(str(ms.merged[spec.name] / "model.safetensors"))
            base = load_file(str(ms.base / "model.safetensors"))
            assert ref.keys() == ours.keys()
            changed = {k for k in ours if not torch.equal(ours[k], base[k])}
            assert changed == {f"{t}.weight" for t in ms.targets[spec.name]}
            for key in ours:
                torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=1e-5, msg=f"{arch} {spec.name} {key}")


def test_tokenizer_names_every_id(small_sets):
    """Through LMDeploy's Tokenizer: ids map to the token strings the server's log-probabilities carry."""
    for ms in small_sets.values():
        info = check_tokenizer(ms)
        assert info["eos"] == EOS and info["vocab"] == SMALL.vocab
    ids = range(SMALL.vocab)
    assert [token_id(token_string(i)) for i in ids] == list(ids)
    with pytest.raises(ValueError):
        token_id("hello")


def test_prompts_are_ordinary_tokens_of_distinct_lengths():
    prompts = make_prompts(8, 512)
    assert [len(p) for p in prompts] == [5 + 6 * i for i in range(8)]
    assert all(len(SPECIAL_TOKENS) <= t < 512 for p in prompts for t in p)
    assert prompts == make_prompts(8, 512) and prompts != make_prompts(8, 512, seed=1)
