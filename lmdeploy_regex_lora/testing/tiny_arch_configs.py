"""config.json bodies (Hub field names and nesting, tiny values) of the architectures issue 11 covers.

Each builder names the Hub model whose config it follows. Used by :mod:`.tiny_archs`; sizes are those of
:mod:`.tiny_configs` (vocab 128, hidden 64, 4 query / 2 KV heads of 16), plus small MoE and vision sizes.
"""

from __future__ import annotations

from typing import Any

from .tiny_configs import BOS, EOS, HEAD_DIM, HEADS, HIDDEN, KV_HEADS, PAD, VIT_HEADS, VIT_HIDDEN, VOCAB
from .tiny_configs import INTERMEDIATE as INTER
from .tiny_configs import VIT_INTERMEDIATE as VIT_INTER

# MoE: 4 routed experts, 2 per token; expert FFN 48 (not hidden/2, so (E, 2I, H) and (E, H, 2I) differ)
N_EXPERTS = 4
TOPK = 2
MOE_INTER = 48
IMAGE_TOKEN = VOCAB - 1
VIDEO_TOKEN = VOCAB - 2
VISION_START = VOCAB - 4
VISION_END = VOCAB - 3
MROPE_SECTION = [2, 3, 3]  # head_dim 16 -> 8 rotary frequencies over (t, h, w)
IV_IMAGE, IV_PATCH = 28, 14
IDS = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}


def base_llm(arch: str, model_type: str, n: int, **extra) -> dict[str, Any]:
    cfg = {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTER,
        "num_hidden_layers": n, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM, "hidden_act": "silu", "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
        "tie_word_embeddings": False, "initializer_range": 0.02, "use_cache": True,
        "attention_dropout": 0.0, **IDS, "torch_dtype": "float32",
    }
    cfg.update(extra)
    return cfg


def qwen3_cfg(n):
    # Qwen/Qwen3-8B config.json fields
    return base_llm("Qwen3ForCausalLM", "qwen3", n, attention_bias=False, max_window_layers=n,
                     sliding_window=None, use_sliding_window=False)


def qwen3_moe_cfg(n):
    # Qwen/Qwen3-30B-A3B config.json fields
    return base_llm("Qwen3MoeForCausalLM", "qwen3_moe", n, attention_bias=False, max_window_layers=n,
                     sliding_window=None, use_sliding_window=False, decoder_sparse_step=1,
                     moe_intermediate_size=MOE_INTER, num_experts=N_EXPERTS, num_experts_per_tok=TOPK,
                     norm_topk_prob=True, output_router_logits=False, router_aux_loss_coef=0.001,
                     mlp_only_layers=[])


def mistral_cfg(n):
    # mistralai/Mistral-7B-Instruct-v0.3
    return base_llm("MistralForCausalLM", "mistral", n, sliding_window=None)


def mixtral_cfg(n):
    # mistralai/Mixtral-8x7B-Instruct-v0.1
    return base_llm("MixtralForCausalLM", "mixtral", n, sliding_window=None, num_local_experts=N_EXPERTS,
                     num_experts_per_tok=TOPK, output_router_logits=False, router_aux_loss_coef=0.02,
                     intermediate_size=MOE_INTER * 2)


def llama3_cfg(n):
    # meta-llama/Llama-3.1-8B-Instruct
    return base_llm("LlamaForCausalLM", "llama", n, attention_bias=False, mlp_bias=False, pretraining_tp=1,
                     rope_theta=500000.0,
                     rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 128, "rope_type": "llama3"})


def gemma2_cfg(n):
    # google/gemma-2-2b-it
    cfg = base_llm("Gemma2ForCausalLM", "gemma2", n, hidden_act="gelu_pytorch_tanh",
                    hidden_activation="gelu_pytorch_tanh", attention_bias=False, final_logit_softcapping=30.0,
                    attn_logit_softcapping=50.0, query_pre_attn_scalar=HEAD_DIM, sliding_window=64,
                    cache_implementation="hybrid", tie_word_embeddings=True)
    cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"] = 2, 1, 0
    return cfg


def gemma3_text_cfg(n, arch="Gemma3ForCausalLM"):
    # google/gemma-3-1b-it (text) ; the text_config of gemma-3-4b-it
    cfg = base_llm(arch, "gemma3_text", n, hidden_activation="gelu_pytorch_tanh", attention_bias=False,
                    final_logit_softcapping=None, attn_logit_softcapping=None, query_pre_attn_scalar=HEAD_DIM,
                    sliding_window=64, sliding_window_pattern=2, rope_local_base_freq=10000.0,
                    rope_theta=1000000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                    cache_implementation="hybrid", tie_word_embeddings=True)
    cfg.pop("hidden_act")
    cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"] = 2, 1, 0
    return cfg


def glm4_cfg(n):
    # THUDM/GLM-4-9B-0414 (Glm4ForCausalLM, transformers-native)
    return base_llm("Glm4ForCausalLM", "glm4", n, attention_bias=True, partial_rotary_factor=0.5)


def glm4_moe_cfg(n):
    # zai-org/GLM-4.5-Air: first_k_dense_replace dense layers, then MoE with a shared expert
    return base_llm("Glm4MoeForCausalLM", "glm4_moe", n, attention_bias=True, partial_rotary_factor=0.5,
                     first_k_dense_replace=1, moe_intermediate_size=MOE_INTER, n_routed_experts=N_EXPERTS,
                     n_shared_experts=1, num_experts_per_tok=TOPK, n_group=1, topk_group=1, norm_topk_prob=True,
                     routed_scaling_factor=1.0, use_qk_norm=False, num_nextn_predict_layers=0)


def deepseek_v2_cfg(n):
    # deepseek-ai/DeepSeek-V2-Lite-Chat (MLA without q_lora, MoE with shared experts, first layer dense)
    cfg = base_llm("DeepseekV2ForCausalLM", "deepseek_v2", n, attention_bias=False, first_k_dense_replace=1,
                    kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                    moe_intermediate_size=MOE_INTER, moe_layer_freq=1, n_routed_experts=N_EXPERTS,
                    n_shared_experts=1, num_experts_per_tok=TOPK, n_group=1, topk_group=1, norm_topk_prob=False,
                    routed_scaling_factor=1.0, scoring_func="softmax", topk_method="greedy", aux_loss_alpha=0.001,
                    seq_aux=True)
    cfg.pop("head_dim")
    return cfg


def deepseek_v3_cfg(n):
    # deepseek-ai/DeepSeek-V3 (MLA with q_lora, sigmoid router with e_score_correction_bias, noaux_tc)
    cfg = base_llm("DeepseekV3ForCausalLM", "deepseek_v3", n, attention_bias=False, first_k_dense_replace=1,
                    kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                    moe_intermediate_size=MOE_INTER, moe_layer_freq=1, n_routed_experts=N_EXPERTS,
                    n_shared_experts=1, num_experts_per_tok=TOPK, n_group=2, topk_group=1, norm_topk_prob=True,
                    routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc",
                    num_nextn_predict_layers=0, ep_size=1)
    cfg.pop("head_dim")
    return cfg




def text_cfg(model_type: str, arch: str | None, n: int, **extra) -> dict[str, Any]:
    cfg = base_llm(arch or "", model_type, n, **extra)
    if arch is None:
        cfg.pop("architectures")
    cfg.pop("torch_dtype")
    return cfg


def qwen3_vl_vision(n: int, model_type: str) -> dict[str, Any]:
    # Qwen/Qwen3-VL-2B-Instruct vision_config fields (patch 16, merge 2, deepstack taps)
    return {"model_type": model_type, "depth": n, "hidden_size": VIT_HIDDEN, "hidden_act": "gelu_pytorch_tanh",
            "intermediate_size": VIT_INTER, "num_heads": VIT_HEADS, "in_channels": 3, "patch_size": 16,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": HIDDEN,
            "num_position_embeddings": 16, "deepstack_visual_indexes": [0], "initializer_range": 0.02}


def qwen3_vl_cfg(n: int, moe: bool) -> dict[str, Any]:
    # Qwen/Qwen3-VL-2B-Instruct / Qwen3-VL-30B-A3B-Instruct config.json layout
    text = text_cfg("qwen3_vl_moe_text" if moe else "qwen3_vl_text", None, n, attention_bias=False,
                 rope_theta=5000000.0,
                 rope_scaling={"mrope_interleaved": True, "mrope_section": MROPE_SECTION, "rope_type": "default"})
    if moe:
        text.update(decoder_sparse_step=1, moe_intermediate_size=MOE_INTER, num_experts=N_EXPERTS,
                    num_experts_per_tok=TOPK, norm_topk_prob=True, mlp_only_layers=[])
    return {"architectures": ["Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"],
            "model_type": "qwen3_vl_moe" if moe else "qwen3_vl", "image_token_id": IMAGE_TOKEN,
            "video_token_id": VIDEO_TOKEN, "vision_start_token_id": VISION_START, "vision_end_token_id": VISION_END,
            "tie_word_embeddings": False, "text_config": text,
            "vision_config": qwen3_vl_vision(n, "qwen3_vl_moe" if moe else "qwen3_vl"), **IDS,
            "torch_dtype": "float32"}


def qwen3_5_cfg(n: int, moe: bool) -> dict[str, Any]:
    # Qwen/Qwen3.5 (Qwen3_5ForConditionalGeneration) layout: hybrid gated-delta / gated full attention.
    # One linear-attention and one full-attention layer (full_attention_interval 2) keeps both kinds.
    layer_types = [("full_attention" if (i + 1) % 2 == 0 else "linear_attention") for i in range(n)]
    text = text_cfg("qwen3_5_moe_text" if moe else "qwen3_5_text", None, n, attention_bias=False,
                 attn_output_gate=True, full_attention_interval=2, layer_types=layer_types,
                 linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                 linear_num_key_heads=2, linear_num_value_heads=4, partial_rotary_factor=0.25,
                 rope_theta=10000000.0, mtp_num_hidden_layers=0,
                 rope_scaling={"mrope_interleaved": True, "mrope_section": [1, 1, 0], "rope_type": "default"})
    if moe:
        text.update(moe_intermediate_size=MOE_INTER, num_experts=N_EXPERTS, num_experts_per_tok=TOPK,
                    shared_expert_intermediate_size=MOE_INTER, decoder_sparse_step=1, norm_topk_prob=True,
                    mlp_only_layers=[])
    vision = qwen3_vl_vision(n, "qwen3_5_moe" if moe else "qwen3_5")
    vision["deepstack_visual_indexes"] = []
    return {"architectures": ["Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"],
            "model_type": "qwen3_5_moe" if moe else "qwen3_5", "image_token_id": IMAGE_TOKEN,
            "video_token_id": VIDEO_TOKEN, "vision_start_token_id": VISION_START, "vision_end_token_id": VISION_END,
            "tie_word_embeddings": False, "text_config": text, "vision_config": vision, **IDS,
            "torch_dtype": "float32"}


def glm4v_cfg(n: int) -> dict[str, Any]:
    # zai-org/GLM-4.1V-9B-Thinking: Glm4vForConditionalGeneration, text_config (glm4v_text) + vision_config
    text = text_cfg("glm4v_text", None, n, attention_bias=True, partial_rotary_factor=0.5, rms_norm_eps=1e-5,
                 rope_scaling={"rope_type": "default", "mrope_section": MROPE_SECTION},
                 image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN)
    text.pop("head_dim")
    vision = {"model_type": "glm4v", "depth": n, "hidden_size": VIT_HIDDEN, "hidden_act": "silu",
              "intermediate_size": VIT_INTER, "num_heads": VIT_HEADS, "in_channels": 3, "image_size": 28,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": HIDDEN,
              "rms_norm_eps": 1e-5, "attention_bias": False, "initializer_range": 0.02}
    # Text fields both at the top level (the original GLM-4.1V release's flat layout, which LMDeploy's glm4_1v
    # model reads: config.vocab_size, config.attention_bias, ...) and in text_config (which transformers 5.24's
    # Glm4vConfig and LMDeploy's config builder read). Either alone fails in LMDeploy 0.18 (see REPORT.md).
    top = {k: v for k, v in text.items() if k not in ("model_type",)}
    return {**top, "architectures": ["Glm4vForConditionalGeneration"], "model_type": "glm4v",
            "image_token_id": IMAGE_TOKEN, "video_token_id": VIDEO_TOKEN, "image_start_token_id": VISION_START,
            "image_end_token_id": VISION_END, "video_start_token_id": VOCAB - 6, "video_end_token_id": VOCAB - 5,
            "tie_word_embeddings": False, "text_config": text, "vision_config": vision, **IDS,
            "torch_dtype": "float32"}


def gemma3_vl_cfg(n: int) -> dict[str, Any]:
    # google/gemma-3-4b-it: Gemma3ForConditionalGeneration, gemma3_text + siglip_vision_model (no head)
    text = gemma3_text_cfg(n, arch="Gemma3ForCausalLM")
    text.pop("architectures"), text.pop("torch_dtype")
    return {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
            "boi_token_index": VOCAB - 4, "eoi_token_index": VOCAB - 3, "image_token_index": IMAGE_TOKEN,
            "mm_tokens_per_image": 4, "initializer_range": 0.02, "eos_token_id": [1, 106 % VOCAB],
            "text_config": text,
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": VIT_HIDDEN,
                              "intermediate_size": VIT_INTER, "num_attention_heads": VIT_HEADS,
                              "num_hidden_layers": n, "image_size": 56, "patch_size": 14,
                              "vision_use_head": False, "layer_norm_eps": 1e-6},
            "torch_dtype": "float32"}


def llama4_cfg(n: int) -> dict[str, Any]:
    # meta-llama/Llama-4-Maverick-17B-128E-Instruct layout (interleave_moe_layer_step 2: dense, MoE, ...)
    text = text_cfg("llama4_text", None, n, attention_bias=False, attention_chunk_size=64,
                 interleave_moe_layer_step=2, intermediate_size=MOE_INTER, intermediate_size_mlp=INTER,
                 num_experts_per_tok=1, num_local_experts=N_EXPERTS, output_router_logits=False,
                 router_aux_loss_coef=0.001, router_jitter_noise=0.0, use_qk_norm=False, no_rope_layers=[],
                 rope_theta=500000.0, rms_norm_eps=1e-5, for_llm_compressor=False,
                 rope_scaling={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                               "original_max_position_embeddings": 128, "rope_type": "llama3"})
    text["no_rope_layers"] = [1] * n  # 1 = layer uses RoPE (transformers' convention)
    # intermediate_size = hidden / pixel_shuffle_ratio**2, as Llama 4's 1408 -> 5632: the vision adapter's fc1 reads
    # the pixel-shuffled patches with that width (with any other, LMDeploy's vision forward cannot run)
    vision = {"model_type": "llama4_vision_model", "hidden_size": VIT_HIDDEN, "intermediate_size": 4 * VIT_HIDDEN,
              "num_attention_heads": VIT_HEADS, "num_hidden_layers": n, "num_channels": 3, "image_size": 28,
              "patch_size": 14, "hidden_act": "gelu", "norm_eps": 1e-5, "pixel_shuffle_ratio": 0.5,
              "projector_input_dim": HIDDEN, "projector_output_dim": HIDDEN, "vision_output_dim": HIDDEN,
              "multi_modal_projector_bias": False, "projector_dropout": 0.0, "attention_dropout": 0.0,
              "rope_theta": 10000, "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
              "initializer_range": 0.02}
    return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
            "boi_token_index": VOCAB - 4, "eoi_token_index": VOCAB - 3, "image_token_index": IMAGE_TOKEN,
            "tie_word_embeddings": False, "text_config": text, "vision_config": vision, "torch_dtype": "float32"}



def phi3_llm(n: int) -> dict[str, Any]:
    # InternVL2-4B llm_config (Phi-3-mini-128k-instruct): fused qkv_proj / gate_up_proj, LongRoPE.
    # GQA (4 heads / 2 kv) instead of Phi-3-mini's MHA, so the fused qkv rows split unevenly.
    half = HEAD_DIM // 2
    return base_llm("Phi3ForCausalLM", "phi3", n, rms_norm_eps=1e-5, embd_pdrop=0.0, resid_pdrop=0.0,
                     original_max_position_embeddings=128, max_position_embeddings=512, sliding_window=None,
                     rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(half)],
                                   "long_factor": [1.0 + 0.5 * i for i in range(half)]},
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)



def internvl_hf_cfg(n: int, text: dict[str, Any], arch: str, model_type: str, vision_type: str):
    return {"architectures": [arch], "model_type": model_type, "downsample_ratio": 0.5, "image_seq_length": 1,
            "image_token_id": IMAGE_TOKEN, "projector_hidden_act": "gelu", "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default", "tie_word_embeddings": False, "torch_dtype": "float32",
            "text_config": text,
            "vision_config": {"model_type": vision_type, "hidden_size": VIT_HIDDEN, "num_attention_heads": VIT_HEADS,
                              "intermediate_size": VIT_INTER, "num_hidden_layers": n,
                              "image_size": [IV_IMAGE, IV_IMAGE], "patch_size": [IV_PATCH, IV_PATCH],
                              "num_channels": 3, "hidden_act": "gelu", "attention_bias": True, "use_qk_norm": False,
                              "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "use_mask_token": False,
                              "use_mean_pooling": True, "use_absolute_position_embeddings": True,
                              "layer_scale_init_value": 0.1}}



INTERNS1_CONFIG_PY = '''\
"""Minimal Intern-S1 config (tiny test checkpoints); follows internlm/Intern-S1-mini's configuration_interns1.py."""
from transformers import CONFIG_MAPPING
from transformers.configuration_utils import PretrainedConfig
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig


class InternS1VisionConfig(InternVLVisionConfig):
    model_type = "interns1_vision"

    def __init__(self, *args, drop_path_rate=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.drop_path_rate = drop_path_rate


class InternS1Config(PretrainedConfig):
    model_type = "interns1"
    sub_configs = {"vision_config": InternS1VisionConfig}

    def __init__(self, vision_config=None, text_config=None, image_token_id=151667, image_seq_length=256,
                 downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
                 vision_feature_select_strategy="default", **kwargs):
        self.image_token_id = image_token_id
        self.image_seq_length = image_seq_length
        self.downsample_ratio = downsample_ratio
        self.projector_hidden_act = projector_hidden_act
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy
        if isinstance(vision_config, dict):
            vision_config = InternS1VisionConfig(**vision_config)
        self.vision_config = vision_config if vision_config is not None else InternS1VisionConfig()
        if isinstance(text_config, dict):
            text_config = CONFIG_MAPPING[text_config["model_type"]](**text_config)
        self.text_config = text_config
        super().__init__(**kwargs)
'''



MINICPMV_CONFIG_PY = '''\
"""Minimal MiniCPM-V 2.6 config (tiny test checkpoints); follows openbmb/MiniCPM-V-2_6's configuration_minicpm.py:
a Qwen2Config carrying the vision / slicing fields."""
from transformers import Qwen2Config
from transformers.configuration_utils import PretrainedConfig
from transformers.models.siglip.configuration_siglip import SiglipVisionConfig


class MiniCPMVSliceConfig(PretrainedConfig):
    model_type = "minicpmv"

    def __init__(self, patch_size=14, max_slice_nums=9, scale_resolution=448, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution


class MiniCPMVConfig(Qwen2Config):
    model_type = "minicpmv"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, use_cache=True, query_num=64, image_size=448, drop_vision_last_layer=True,
                 batch_vision_input=True, slice_config=None, vision_config=None, use_image_id=True,
                 vision_batch_size=16, **kwargs):
        self.use_cache = use_cache
        self.query_num = query_num
        self.image_size = image_size
        self.drop_vision_last_layer = drop_vision_last_layer
        self.batch_vision_input = batch_vision_input
        self.use_image_id = use_image_id
        self.vision_batch_size = vision_batch_size
        self.slice_config = MiniCPMVSliceConfig(**(slice_config or {"max_slice_nums": 1}))
        self.slice_mode = True
        if isinstance(vision_config, dict):
            vision_config = SiglipVisionConfig(**vision_config)
        self.vision_config = vision_config if vision_config is not None else SiglipVisionConfig()
        self.patch_size = self.vision_config.patch_size
        super().__init__(**kwargs)
'''

