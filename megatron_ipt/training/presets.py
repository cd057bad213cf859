"""Model presets as data: Llama-architecture sizes (RoPE, SwiGLU, RMSNorm, grouped-query attention).

Every preset is one :class:`ModelPreset` row in :data:`PRESETS`; there are no per-model branches. The
families differ only in fields: Qwen2 / 2.5 add a QKV bias, Qwen3 a per-head RMSNorm of queries and keys
(``qk_layernorm``) and an explicit ``head_dim``, Llama 3.1 / 3.2 RoPE scaling, the small Qwen3 and Llama 3.2
sizes tie the embeddings; Mistral is the Llama architecture, with sliding-window attention in v0.1
(``sliding_window``).
``ModelConfig`` fields (``num_layers``, ``hidden_size``, ...) override a preset's fields in
:func:`resolve_preset`. The published sizes follow each model's Hugging Face ``config.json``; ``vocab_size``
there is the model's own vocabulary, while a training run uses the tokenizer's vocabulary padded by
:func:`padded_vocab_size`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from megatron_ipt.config import ModelConfig


@dataclass(frozen=True)
class ModelPreset:
    """Architecture of a decoder-only Llama-style model (no biases unless ``add_qkv_bias``; untied embeddings
    unless ``tie_word_embeddings``)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int  # SwiGLU inner size (per gate)
    num_attention_heads: int
    num_query_groups: int  # key/value heads (grouped-query attention)
    vocab_size: int  # the published model's vocabulary; runs use the tokenizer's, padded
    max_position_embeddings: int
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    add_qkv_bias: bool = False
    init_method_std: float = 0.02
    tie_word_embeddings: bool = False  # output layer shares the input embedding (small Qwen2 models)
    rope_scaling_factor: float | None = None  # Llama-3.1 / 3.2 RoPE scaling (megatron-core's rope_scaling; 8 / 32)
    head_dim: int | None = None  # explicit head dimension (Qwen3: 128 whatever the width); None: hidden / heads
    qk_layernorm: bool = False  # RMSNorm over each query / key head before RoPE (Qwen3's q_norm / k_norm)
    # Mixture of experts (every layer's MLP; None: dense): megatron-core's MoELayer (router, token dispatcher, experts)
    num_moe_experts: int | None = None
    moe_router_topk: int = 2  # experts per token
    moe_ffn_hidden_size: int | None = None  # each expert's SwiGLU inner size (None: ffn_hidden_size)
    moe_router_pre_softmax: bool = False  # softmax over all experts, then top-k (Qwen3-MoE without norm_topk_prob)
    moe_aux_loss_coeff: float = 0.0  # load-balancing loss weight (Hugging Face router_aux_loss_coef)
    # sliding-window attention in every layer: each token sees itself and the sliding_window - 1 tokens before it
    # (Hugging Face Mistral / Mixtral sliding_window; megatron-core window_size (sliding_window - 1, 0)); None: full
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        # one spelling per architecture: a head_dim equal to hidden / heads is the default (None), so a preset
        # read back from a config.json that spells it out (transformers 5 always does) equals the row
        if self.head_dim is not None and self.head_dim * self.num_attention_heads == self.hidden_size:
            object.__setattr__(self, "head_dim", None)

    @property
    def expert_ffn_hidden_size(self) -> int:
        """Each expert's SwiGLU inner size: ``moe_ffn_hidden_size``, else ``ffn_hidden_size``."""
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def kv_channels(self) -> int:
        """Head dimension: ``head_dim`` when set, else hidden_size / num_attention_heads."""
        return self.head_dim or self.hidden_size // self.num_attention_heads


PRESETS: dict[str, ModelPreset] = {
    # Unit tests: as small as megatron-core allows while still exercising GQA, TP=2 and PP=2.
    "llama-test": ModelPreset(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
        vocab_size=1024, max_position_embeddings=1024,
    ),
    # CPU quickstart: 300 iterations at seq 256, micro batch 4, global batch 8, SmolLM2 vocab (49152).
    # The untied 49152 x 64 embedding and output layer are 6.3M of its 6.5M parameters, and the
    # output layer + cross entropy over 49152 logits per token dominate the step time: about
    # 0.7-0.8 s/iteration on 2 quiet cores (hidden 128 measured about 1.0 s/iteration).
    "llama-tiny": ModelPreset(
        num_layers=4, hidden_size=64, ffn_hidden_size=192, num_attention_heads=4, num_query_groups=2,
        vocab_size=49152, max_position_embeddings=2048, rotary_base=10000.0,
    ),
    "llama3-8b": ModelPreset(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8,
        vocab_size=128256, max_position_embeddings=8192, rotary_base=500000.0, norm_epsilon=1e-5,
    ),
    "llama3-70b": ModelPreset(
        num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64, num_query_groups=8,
        vocab_size=128256, max_position_embeddings=8192, rotary_base=500000.0, norm_epsilon=1e-5,
    ),
    "qwen2.5-7b": ModelPreset(
        num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28, num_query_groups=4,
        vocab_size=152064, max_position_embeddings=32768, rotary_base=1000000.0, norm_epsilon=1e-6,
        add_qkv_bias=True,
    ),
}

# Checked against public copies of the config.json: meta-llama/Llama-3.1-8B (every field; llama3-8b is it without
# the RoPE scaling, at 8,192 positions, not checked) and Meta-Llama-3-70B (every field). Qwen/Qwen2.5-7B: sizes,
# heads, groups, QKV bias, theta, epsilon and its 152,064-row embedding checked against slime's
# scripts/models/qwen2.5-7B.sh and a public Qwen2-7B config.json; max_position_embeddings not checked.
PRESETS["llama3.1-8b"] = dataclasses.replace(PRESETS["llama3-8b"], max_position_embeddings=131072,
                                             rope_scaling_factor=8.0)


def _qwen3(layers: int, hidden: int, ffn: int, heads: int, *, tied: bool) -> ModelPreset:
    """A Qwen3 dense size: head_dim 128, 8 KV heads, QK-norm, RoPE theta 1e6, vocabulary 151,936, 40,960 positions."""
    return ModelPreset(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                       num_query_groups=8, vocab_size=151936, max_position_embeddings=40960, rotary_base=1000000.0,
                       norm_epsilon=1e-6, head_dim=128, qk_layernorm=True, tie_word_embeddings=tied)


def _llama32(layers: int, hidden: int, heads: int) -> ModelPreset:
    """A Llama 3.2 text size: tied embeddings, RoPE theta 5e5 scaled by 32, 8 KV heads, FFN 8,192."""
    return ModelPreset(num_layers=layers, hidden_size=hidden, ffn_hidden_size=8192, num_attention_heads=heads,
                       num_query_groups=8, vocab_size=128256, max_position_embeddings=131072, rotary_base=500000.0,
                       norm_epsilon=1e-5, tie_word_embeddings=True, rope_scaling_factor=32.0)


PRESETS.update({
    # Qwen/Qwen3-*B config.json (the 0.6B, 1.7B and 4B sizes tie the embeddings). Checked against public copies of
    # the 0.6B and 4B config.json (every field) and slime's Megatron scripts/models/qwen3-{0.6B,1.7B,4B,8B,14B}.sh
    # (layers, widths, heads, groups, head size 128, theta, epsilon, vocabulary, tying); the 1.7B / 8B / 14B
    # max_position_embeddings (40,960) is not in those scripts.
    "qwen3-0.6b": _qwen3(28, 1024, 3072, 16, tied=True),
    "qwen3-1.7b": _qwen3(28, 2048, 6144, 16, tied=True),
    "qwen3-4b": _qwen3(36, 2560, 9728, 32, tied=True),
    "qwen3-8b": _qwen3(36, 4096, 12288, 32, tied=False),
    "qwen3-14b": _qwen3(40, 5120, 17408, 40, tied=False),
    # meta-llama/Llama-3.2-1B / -3B config.json (every field checked against public copies of both)
    "llama3.2-1b": _llama32(16, 2048, 32),
    "llama3.2-3b": _llama32(28, 3072, 24),
    # Qwen/Qwen3-30B-A3B config.json: 128 experts of 768, top-8 renormalised, no shared expert (sizes, heads, groups,
    # head_dim, experts, top-k, theta, epsilon checked against a public Megatron script for it, slime
    # scripts/models/qwen3-30B-A3B.sh; router_aux_loss_coef 0.001 not checked)
    "qwen3-30b-a3b": ModelPreset(
        num_layers=48, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=32, num_query_groups=4,
        vocab_size=151936, max_position_embeddings=40960, rotary_base=1000000.0, norm_epsilon=1e-6, head_dim=128,
        qk_layernorm=True, num_moe_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768, moe_aux_loss_coeff=0.001,
    ),
    # mistralai/Mixtral-8x7B-v0.1 config.json: 8 experts of 14,336, top-2 (every field, router_aux_loss_coef 0.02
    # included, checked against a public copy of its config; its sliding_window is null)
    "mixtral-8x7b": ModelPreset(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8,
        vocab_size=32000, max_position_embeddings=32768, rotary_base=1000000.0, norm_epsilon=1e-5,
        num_moe_experts=8, moe_router_topk=2, moe_aux_loss_coeff=0.02,
    ),
    # mistralai/Mistral-7B-v0.3 config.json (no sliding window; vocabulary 32,768 per its model card): sizes, heads,
    # groups, theta and epsilon checked against public copies of v0.2's (v0.3 is v0.2 with the larger vocabulary).
    # v0.1 (sliding window 4,096, vocabulary 32,000, theta 1e4) has no preset: use model.hf_config.
    "mistral-7b": ModelPreset(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8,
        vocab_size=32768, max_position_embeddings=32768, rotary_base=1000000.0, norm_epsilon=1e-5,
    ),
})


# Hugging Face model_type -> the preset fields that family fixes (all are the Llama architecture otherwise)
HF_FAMILIES: dict[str, dict] = {
    "llama": {},  # Llama 3 / 3.1 / 3.2
    "mistral": {},  # Mistral 7B v0.1 (sliding window 4,096) / v0.2 / v0.3
    "qwen2": {"add_qkv_bias": True},  # Qwen2 / 2.5
    "qwen3": {"qk_layernorm": True},  # Qwen3 dense
    "qwen3_moe": {"qk_layernorm": True},  # Qwen3-MoE (every layer sparse, no shared expert)
    "mixtral": {},  # Mixtral 8x7B / 8x22B
}


def _moe_fields(c: dict, file: Path) -> dict:
    """The MoE preset fields of a Qwen3-MoE / Mixtral config (empty for dense families).

    Both route with a softmax over the router logits and keep the top-k; Mixtral and Qwen3-MoE with
    ``norm_topk_prob`` renormalise the k weights (megatron-core: top-k, then softmax), Qwen3-MoE without it
    keeps them (``moe_router_pre_softmax``)."""
    model_type = c["model_type"]
    if model_type not in ("qwen3_moe", "mixtral"):
        return {}
    if model_type == "qwen3_moe" and (c.get("mlp_only_layers") or c.get("decoder_sparse_step", 1) != 1):
        raise ValueError(f"{file}: mlp_only_layers / decoder_sparse_step: dense layers between MoE layers are not "
                         "supported (every layer must be MoE)")
    if c.get("shared_expert_intermediate_size"):
        raise ValueError(f"{file}: shared experts are not supported")
    # Qwen3-MoE's published configs say num_experts; transformers 5 writes num_local_experts for both families
    experts = c.get("num_experts") or c["num_local_experts"]
    return dict(num_moe_experts=experts, moe_router_topk=c["num_experts_per_tok"],
                moe_ffn_hidden_size=c["moe_intermediate_size"] if model_type == "qwen3_moe" else None,
                moe_router_pre_softmax=model_type == "qwen3_moe" and not c.get("norm_topk_prob", False),
                moe_aux_loss_coeff=float(c.get("router_aux_loss_coef", 0.0)))


def _refuse_unsupported(c: dict, file: Path) -> None:
    """One-line ValueError for config settings the mapping does not carry (they would change the outputs)."""
    model_type = c.get("model_type")
    if model_type not in HF_FAMILIES:
        raise ValueError(f"{file}: model_type {model_type!r} is not supported ({', '.join(HF_FAMILIES)})")
    # Qwen2 / 3 configs carry a sliding_window that use_sliding_window turns on from layer max_window_layers on
    if c.get("use_sliding_window") and c.get("sliding_window"):
        raise ValueError(f"{file}: use_sliding_window true (sliding_window {c['sliding_window']}): Qwen's "
                         "sliding-window layers are not supported (the published Qwen2 / 2.5 / 3 configs have it false)")
    window = c.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"{file}: sliding_window {window!r}: expected a positive number of tokens or null")
    if c.get("attention_bias") and model_type != "qwen2":
        raise ValueError(f"{file}: attention_bias true (biases of q/k/v/o projections) is not supported for "
                         f"{model_type}")
    if c.get("mlp_bias"):
        raise ValueError(f"{file}: mlp_bias true is not supported")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{file}: hidden_act {c['hidden_act']!r} is not supported (SwiGLU with silu only)")


def preset_from_hf_config(path: str | Path) -> ModelPreset:
    """The architecture of a Hugging Face Llama 3 / 3.1 / 3.2, Mistral, Qwen2 / 2.5, Qwen3, Qwen3-MoE or Mixtral
    checkpoint (its ``config.json``, or the folder holding it) as a preset: sizes, GQA groups, ``head_dim``, RoPE
    theta, RMSNorm epsilon, QKV bias (Qwen2), QK-norm (Qwen3), experts and routing (:func:`_moe_fields`), tied
    embeddings and Llama-3.1 / 3.2 RoPE scaling
    (``rope_scaling.rope_type == "llama3"``; megatron-core implements the published low/high frequency factors
    1/4 and original context 8,192, so only the factor is carried).
    Mistral / Mixtral ``sliding_window`` (v0.1: 4,096) becomes the preset's ``sliding_window``.
    Raises ValueError naming the file for other architectures (:data:`HF_FAMILIES`), Qwen's sliding-window layers,
    output-projection or MLP biases, other activations, dense layers between MoE layers, shared experts, or
    missing fields."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        c = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: cannot read a Hugging Face config ({e})") from None
    _refuse_unsupported(c, file)
    # transformers < 5 writes rope_theta / rope_scaling at the top level; 5.x one rope_parameters dict
    rope = c.get("rope_parameters") or {}
    theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else {})
    if scaling and scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise ValueError(f"{file}: rope_scaling {scaling} is not supported (only Llama-3.1's 'llama3')")
    if scaling and (scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0),
                    scaling.get("original_max_position_embeddings", 8192)) != (1.0, 4.0, 8192):
        raise ValueError(f"{file}: rope_scaling {scaling}: megatron-core implements low/high frequency factors 1/4 "
                         "and original context 8192 only")
    try:
        heads = c["num_attention_heads"]
        return ModelPreset(
            num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"], ffn_hidden_size=c["intermediate_size"],
            num_attention_heads=heads, num_query_groups=c.get("num_key_value_heads") or heads,
            vocab_size=c["vocab_size"], max_position_embeddings=c.get("max_position_embeddings", 4096),
            rotary_base=float(theta), norm_epsilon=c.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            rope_scaling_factor=float(scaling["factor"]) if scaling else None,
            head_dim=c.get("head_dim"), **HF_FAMILIES[c["model_type"]], **_moe_fields(c, file),
            # Mistral / Mixtral: the window is on whenever sliding_window is set (Qwen's are refused above)
            sliding_window=c.get("sliding_window") if c["model_type"] in ("mistral", "mixtral") else None,
        )
    except KeyError as e:
        raise ValueError(f"{file}: missing field {e}") from None


_OVERRIDABLE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")


def resolve_preset(model: ModelConfig) -> ModelPreset:
    """The preset named by ``model.preset`` with the non-None ``ModelConfig`` overrides applied.

    Raises ValueError naming the unknown preset and listing the known ones, or when the overrides
    leave ``hidden_size`` not divisible by ``num_attention_heads`` (without an explicit ``head_dim``).
    """
    if getattr(model, "hf_config", None):
        base = preset_from_hf_config(model.hf_config)
    elif model.preset not in PRESETS:
        raise ValueError(f"model.preset = {model.preset!r}: unknown; choose one of {sorted(PRESETS)}")
    else:
        base = PRESETS[model.preset]
    overrides = {k: getattr(model, k) for k in _OVERRIDABLE if getattr(model, k) is not None}
    preset = dataclasses.replace(base, **overrides)
    if preset.head_dim is None and preset.hidden_size % preset.num_attention_heads:
        raise ValueError(
            f"model: hidden_size {preset.hidden_size} is not divisible by num_attention_heads {preset.num_attention_heads}"
        )
    return preset


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int, multiple: int = 128) -> int:
    """Round ``vocab_size`` up to a multiple of ``multiple * TP`` (Megatron-LM's ``_vocab_size_with_padding``)."""
    step = multiple * tensor_model_parallel_size
    return ((vocab_size + step - 1) // step) * step
