"""Helpers for the evaluation tests: a tiny random Hugging Face Llama with the tiny tokenizer.

Import into a test module (``from fixtures_eval import tiny_export``); needs transformers, not lm-eval.
"""

from __future__ import annotations

import shutil


def tiny_export(folder, tokenizer_dir):
    """A random 1-layer LlamaForCausalLM with the tiny tokenizer: the shape of an `ipt convert megatron-to-hf` folder."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                                   rms_norm_eps=1e-5)  # = test_eval_harness.TINY_MODEL
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder
