"""Presets as data: published shapes, Llama-3.1 RoPE scaling, Qwen2.5 QKV bias and Qwen3 QK-norm reach a real
megatron-core GPTModel; Hugging Face configs of unsupported variants are refused with one line."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_ipt.training import parallel
from megatron_ipt.config import ModelConfig, ParallelConfig
from megatron_ipt.training.presets import PRESETS, padded_vocab_size, preset_from_hf_config, resolve_preset

SMALL = dict(num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2)


def test_published_shapes():
    l8, l70, l31, qwen = PRESETS["llama3-8b"], PRESETS["llama3-70b"], PRESETS["llama3.1-8b"], PRESETS["qwen2.5-7b"]
    assert (l8.num_layers, l8.hidden_size, l8.ffn_hidden_size, l8.num_query_groups, l8.kv_channels) == (32, 4096, 14336, 8, 128)
    assert (l70.num_layers, l70.hidden_size, l70.ffn_hidden_size, l70.num_attention_heads) == (80, 8192, 28672, 64)
    assert l31.rope_scaling_factor == 8.0 and l31.max_position_embeddings == 131072 and l8.rope_scaling_factor is None
    assert qwen.add_qkv_bias and qwen.rotary_base == 1e6 and (qwen.num_attention_heads, qwen.num_query_groups) == (28, 4)
    # Megatron pads the tokenizer's vocabulary to 128 x TP: Llama 3's 128,256 -> 128,256 (TP 1), 129,024 (TP 8).
    assert padded_vocab_size(128256, 1) == 128256 and padded_vocab_size(151665, 4) == 152064


def test_published_shapes_of_qwen3_llama32_and_mistral():
    q06, q8, l1, l3, m7 = (PRESETS[n] for n in ("qwen3-0.6b", "qwen3-8b", "llama3.2-1b", "llama3.2-3b", "mistral-7b"))
    # Qwen3-0.6B: 16 heads of 128 on a 1024 residual stream; tied; QK-norm
    assert (q06.hidden_size, q06.num_attention_heads, q06.kv_channels, q06.head_dim) == (1024, 16, 128, 128)
    assert q06.qk_layernorm and q06.tie_word_embeddings and not q06.add_qkv_bias and q06.vocab_size == 151936
    assert q8.head_dim is None and q8.kv_channels == 128 and not q8.tie_word_embeddings  # 4096 / 32 = 128
    assert (l1.num_layers, l1.kv_channels, l1.rope_scaling_factor, l1.tie_word_embeddings) == (16, 64, 32.0, True)
    assert (l3.num_layers, l3.hidden_size, l3.num_attention_heads, l3.kv_channels) == (28, 3072, 24, 128)
    assert (m7.vocab_size, m7.rotary_base, m7.qk_layernorm, m7.rope_scaling_factor) == (32768, 1e6, False, None)


def _hf_config(tmp_path, **fields):
    base = dict(model_type="llama", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=200)
    (tmp_path / "config.json").write_text(json.dumps({**base, **fields}))
    return tmp_path / "config.json"


@pytest.mark.parametrize("fields, message", [
    ({"model_type": "mistral", "sliding_window": 0}, "sliding_window 0: expected a positive number of tokens"),
    ({"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 4096},
     "use_sliding_window true \\(sliding_window 4096\\): Qwen's sliding-window layers are not supported"),
    ({"model_type": "qwen3_moe", "use_sliding_window": True, "sliding_window": 4096, "num_experts": 4,
      "num_experts_per_tok": 2, "moe_intermediate_size": 16}, "use_sliding_window true"),
    ({"model_type": "llama", "attention_bias": True}, "attention_bias true"),
    ({"model_type": "llama", "mlp_bias": True}, "mlp_bias true"),
    ({"model_type": "gemma2"}, "model_type 'gemma2' is not supported"),
])
def test_hf_configs_of_unsupported_variants_are_refused_in_one_line(tmp_path, fields, message):
    file = _hf_config(tmp_path, **fields)
    with pytest.raises(ValueError, match=f"^{file}: .*{message}") as e:
        preset_from_hf_config(file)
    assert "\n" not in str(e.value)


def test_hf_configs_of_each_family_read_as_their_preset_fields(tmp_path):
    qwen3 = preset_from_hf_config(_hf_config(tmp_path, model_type="qwen3", head_dim=24, use_sliding_window=False,
                                             sliding_window=32768, tie_word_embeddings=True))
    assert qwen3.qk_layernorm and qwen3.kv_channels == 24 and qwen3.tie_word_embeddings and not qwen3.add_qkv_bias
    mistral = preset_from_hf_config(_hf_config(tmp_path, model_type="mistral", sliding_window=None, head_dim=16))
    assert mistral.head_dim is None and not mistral.qk_layernorm  # 16 = 64 / 4: the default spelling
    assert preset_from_hf_config(_hf_config(tmp_path, model_type="qwen2")).add_qkv_bias
    # Mistral 7B v0.1 / Mixtral: the window is on whenever sliding_window is set; Qwen2's is off without
    # use_sliding_window (its published configs carry sliding_window 32768 / 131072 with use_sliding_window false)
    assert preset_from_hf_config(_hf_config(tmp_path, model_type="mistral", sliding_window=4096)).sliding_window == 4096
    assert preset_from_hf_config(_hf_config(tmp_path, model_type="mixtral", sliding_window=16, num_local_experts=4,
                                            num_experts_per_tok=2)).sliding_window == 16
    assert preset_from_hf_config(_hf_config(tmp_path, model_type="qwen2", use_sliding_window=False,
                                            sliding_window=131072)).sliding_window is None


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU path")
def test_qwen3_has_per_head_qk_norm_and_its_own_head_dim():
    qwen3, logits = _build("qwen3-0.6b")  # SMALL sizes, head_dim 128 kept: q projection 4 x 128 from hidden 64
    params = dict(qwen3.named_parameters())
    assert params["decoder.layers.0.self_attention.q_layernorm.weight"].shape == (128,)
    assert params["decoder.layers.0.self_attention.k_layernorm.weight"].shape == (128,)
    assert params["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((4 + 2 * 2) * 128, 64)
    assert logits.shape == (1, 64, 256) and torch.isfinite(logits).all()
