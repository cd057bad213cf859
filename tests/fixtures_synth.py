"""Fixtures for the synthesis tests: the converted SmolLM2 folder, its tokenizer, a tiny random Llama.

Import the fixtures into a test module (``from fixtures_synth import ...``). The SmolLM2 conversion
(about 25 s, once per cache) goes to ``$IPT_CACHE_DIR`` or ``~/.cache/megatron-ipt``; later runs reuse it.
"""

from __future__ import annotations

import functools
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@functools.lru_cache(maxsize=None)
def _smollm2_path():
    from data_prep.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@functools.lru_cache(maxsize=None)
def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_smollm2_path())


@pytest.fixture(scope="session")
def smollm2_path():
    """The converted SmolLM2-135M-Instruct folder."""
    return _smollm2_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer (49,152 tokens), loaded from the converted folder."""
    return _smollm2_tokenizer()


def save_tiny_llama(folder, eos_token_id=None, zero_lm_head=False):
    """Save a random LlamaForCausalLM (hidden 64, 2 layers, 2 heads of 32) with SmolLM2's tokenizer.

    ``zero_lm_head``: all logits are 0, so greedy decoding always picks token id 0; with
    ``eos_token_id=0`` every sequence ends at once.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id if eos_token_id is None else eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if zero_lm_head:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    """A tiny random Llama folder with SmolLM2's tokenizer (for engine plumbing, not for quality)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


class ScriptedEngine:
    """A synthesizer stand-in with predictable outputs, for the driver's rounds, chains, chunks and resume.

    A real model cannot be told which documents should get pairs, so these tests script the output; the real
    engines are tested in test_synthesis.py/test_engines.py and end to end with SmolLM2. Interface and
    tokenizer (SmolLM2's) are the engines'. For the last ``<CON> text </CON>`` of a prompt it writes one pair,
    ``<QUE> What does the text say about {first two words}? <ANS> {first sentence} </END>`` (without the
    ``<QUE>`` when the prompt prefills it), or nothing when the text contains ``NOPAIRS``. ``calls`` holds
    the prompts of every generate call; after ``fail_after`` calls it raises RuntimeError (a crash).
    """

    def __init__(self, tokenizer, fail_after: int | None = None):
        self.tokenizer = tokenizer
        self.fail_after = fail_after
        self.calls: list[list[str]] = []

    def generate(self, prompts, max_new_tokens, batch_size, add_special_tokens=True, stop=None):
        from data_prep.engines import GenerationResult

        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("scripted crash")
        self.calls.append(list(prompts))
        out = []
        for prompt in prompts:
            text = prompt.rsplit("<CON>", 1)[1].split("</CON>", 1)[0].strip()
            if "NOPAIRS" in text:
                reply = ""
            else:
                words = " ".join(text.split()[:2])
                reply = f"<QUE> What does the text say about {words}? <ANS> {text.split('. ')[0].rstrip('.')}. </END>"
                reply = reply[len("<QUE>"):] if prompt.endswith("<QUE>") else reply
            out.append(GenerationResult(reply, len(self.tokenizer(reply, add_special_tokens=False)["input_ids"])))
        return out
