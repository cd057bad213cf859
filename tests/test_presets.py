"""Presets as data: published shapes, Llama-3.1 RoPE scaling and Qwen2.5 QKV bias reach a real megatron-core GPTModel."""

from __future__ import annotations

import pytest
import torch

from megatron_ipt.training import parallel
from megatron_ipt.config import ModelConfig, ParallelConfig
from megatron_ipt.training.presets import PRESETS, padded_vocab_size, resolve_preset

SMALL = dict(num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2)


def test_published_shapes():
    l8, l70, l31, qwen = PRESETS["llama3-8b"], PRESETS["llama3-70b"], PRESETS["llama3.1-8b"], PRESETS["qwen2.5-7b"]
    assert (l8.num_layers, l8.hidden_size, l8.ffn_hidden_size, l8.num_query_groups, l8.kv_channels) == (32, 4096, 14336, 8, 128)
    assert (l70.num_layers, l70.hidden_size, l70.ffn_hidden_size, l70.num_attention_heads) == (80, 8192, 28672, 64)
    assert l31.rope_scaling_factor == 8.0 and l31.max_position_embeddings == 131072 and l8.rope_scaling_factor is None
    assert qwen.add_qkv_bias and qwen.rotary_base == 1e6 and (qwen.num_attention_heads, qwen.num_query_groups) == (28, 4)
    # Megatron pads the tokenizer's vocabulary to 128 x TP: Llama 3's 128,256 -> 128,256 (TP 1), 129,024 (TP 8).
    assert padded_vocab_size(128256, 1) == 128256 and padded_vocab_size(151665, 4) == 152064


def _build(preset_name: str, seq_length: int = 64):
    from megatron_ipt.training.cpu_backend import cpu_backend
    from megatron_ipt.training.model import build_model

    preset = resolve_preset(ModelConfig(preset=preset_name, **SMALL))
    with cpu_backend():
        layout = parallel.setup(ParallelConfig(), torch.device("cpu"), micro_batch_size=1, global_batch_size=1,
                                num_layers=1, num_attention_heads=4, num_query_groups=2, seed=1, seq_length=seq_length)
        try:
            model = build_model(preset, layout, vocab_size=256, seq_length=seq_length, device=torch.device("cpu"))
            tokens = torch.randint(0, 256, (1, seq_length))
            logits = model(input_ids=tokens, position_ids=torch.arange(seq_length)[None], attention_mask=None)
        finally:
            parallel.teardown()
    return model, logits


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU path")
def test_llama31_rope_scaling_reaches_the_rotary_embedding():
    plain, _ = _build("llama3-8b")
    scaled, logits = _build("llama3.1-8b")
    assert logits.shape == (1, 64, 256)
    # Llama-3.1 scaling divides the low frequencies by 8 and keeps the high ones (megatron-core's rope_scaling).
    f_plain, f_scaled = plain.rotary_pos_emb.inv_freq, scaled.rotary_pos_emb.inv_freq
    assert torch.equal(f_plain[:2], f_scaled[:2]) and torch.allclose(f_scaled[-1], f_plain[-1] / 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU path")
def test_qwen25_has_qkv_bias_and_llama_does_not():
    qwen, _ = _build("qwen2.5-7b")
    llama, _ = _build("llama3-8b")
    names = lambda m: {n for n, _ in m.named_parameters()}  # noqa: E731
    assert any(n.endswith("linear_qkv.bias") for n in names(qwen))
    assert not any(n.endswith(".bias") for n in names(llama))
