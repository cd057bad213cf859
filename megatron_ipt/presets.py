"""Model presets as data: Llama-architecture sizes (RoPE, SwiGLU, RMSNorm, grouped-query attention).

Every preset is one :class:`ModelPreset` row in :data:`PRESETS`; there are no per-model branches.
``ModelConfig`` fields (``num_layers``, ``hidden_size``, ...) override a preset's fields in
:func:`resolve_preset`. The published sizes of llama3-8b / llama3-70b / qwen2.5-7b follow their Hugging
Face ``config.json``; ``vocab_size`` there is the model's own vocabulary, while a training run uses the
tokenizer's vocabulary padded by :func:`padded_vocab_size`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_ipt.config import ModelConfig


@dataclass(frozen=True)
class ModelPreset:
    """Architecture of a decoder-only Llama-style model (no biases unless ``add_qkv_bias``; untied embeddings)."""

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

    @property
    def kv_channels(self) -> int:
        """Head dimension: hidden_size / num_attention_heads."""
        return self.hidden_size // self.num_attention_heads


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

_OVERRIDABLE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")


def resolve_preset(model: ModelConfig) -> ModelPreset:
    """The preset named by ``model.preset`` with the non-None ``ModelConfig`` overrides applied.

    Raises ValueError naming the unknown preset and listing the known ones, or when the overrides
    leave ``hidden_size`` not divisible by ``num_attention_heads``.
    """
    if model.preset not in PRESETS:
        raise ValueError(f"model.preset = {model.preset!r}: unknown; choose one of {sorted(PRESETS)}")
    overrides = {k: getattr(model, k) for k in _OVERRIDABLE if getattr(model, k) is not None}
    preset = dataclasses.replace(PRESETS[model.preset], **overrides)
    if preset.hidden_size % preset.num_attention_heads:
        raise ValueError(
            f"model: hidden_size {preset.hidden_size} is not divisible by num_attention_heads {preset.num_attention_heads}"
        )
    return preset


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int, multiple: int = 128) -> int:
    """Round ``vocab_size`` up to a multiple of ``multiple * TP`` (Megatron-LM's ``_vocab_size_with_padding``)."""
    step = multiple * tensor_model_parallel_size
    return ((vocab_size + step - 1) // step) * step
