"""Greedy generation on the megatron model with megatron-core's KV cache: the same tokens as the uncached loop
(every step reruns the whole sequence), the cached steps' logits within 1e-4 of the full forward's, and the
uncached fallback where the installed megatron-core offers no cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from megatron_ipt.evaluate.generate import greedy_generate, greedy_generate_cached

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import VOCAB, tiny_config  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-path tests")

PROMPTS = [[5], [5, 6, 7, 8], list(range(3, 40, 3)), [200, 17, 17, 17, 90, 4, 4, 250, 1, 33]]


@pytest.fixture(scope="module")
def scorer():
    from megatron_ipt.evaluate.scorers import MegatronScorer

    with MegatronScorer(tiny_config(), VOCAB, None) as s:
        yield s


def test_cached_greedy_tokens_equal_the_uncached_loop(scorer):
    for prompt in PROMPTS:
        uncached = greedy_generate(scorer.logits, prompt, 20)
        assert scorer.generate(prompt, 20) == uncached, prompt
        assert len(uncached) == 20
    assert scorer.no_kv_cache is None  # the cache was used, no fallback
    assert scorer.cpu_mode_in_decode is None  # decoding steps ran without the CPU backend's function mode
    # a stop token ends both loops at the same place, and is not returned
    prompt = PROMPTS[1]
    full = greedy_generate(scorer.logits, prompt, 20)
    stop = full[7]
    assert scorer.generate(prompt, 20, stop_id=stop) == full[: full.index(stop)]
    assert scorer.generate(prompt, 0) == []


def test_cached_step_logits_match_the_full_forward(scorer):
    for prompt in PROMPTS:
        step = scorer.kv_step(len(prompt) + 16)
        ids, new = list(prompt), list(prompt)
        for _ in range(16):
            cached = step(new)
            full = scorer.logits(ids)[-1]
            assert cached.shape == full.shape == (VOCAB,)
            assert torch.allclose(cached, full, atol=1e-4, rtol=0), float((cached - full).abs().max())
            new = [int(full.argmax())]
            ids += new
        step(new)  # the cache is now full
        with pytest.raises(ValueError, match="KV cache holds"):
            step([1])


def test_decoding_steps_run_without_the_cpu_backend_mode(scorer):
    """The prefill allocates the cache under the CPU backend's function mode; later steps run without it."""
    depth = []
    hook = scorer.model.register_forward_pre_hook(
        lambda m, args: depth.append(len(torch.overrides._get_current_function_mode_stack())))
    try:
        scorer.generate(PROMPTS[1], 4)
    finally:
        hook.remove()
    assert depth == [1, 0, 0, 0]


def test_a_decoding_step_that_needs_the_mode_is_rerun_with_it(scorer, monkeypatch):
    """Stands in for a megatron-core version that names a cuda device while decoding: a real cuda request in a
    forward hook fails without the mode; the step reruns under it, with the same ids."""
    prompt = PROMPTS[3]
    expected = scorer.generate(prompt, 12)
    monkeypatch.setattr(scorer, "cpu_mode_in_decode", None)

    def names_cuda(module, args):
        torch.zeros(1, device="cuda")

    hook = scorer.model.register_forward_pre_hook(names_cuda)
    try:
        assert scorer.generate(prompt, 12) == expected
    finally:
        hook.remove()
    assert scorer.no_kv_cache is None
    # torch's words depend on its build: "Torch not compiled with CUDA enabled" (CPU wheel), "Found no NVIDIA
    # driver on your system" (a CUDA wheel on a machine without a GPU, leg 2)
    assert scorer.cpu_mode_in_decode is not None and scorer.cpu_mode_in_decode.startswith(("RuntimeError", "AssertionError"))


def test_greedy_generate_cached_feeds_only_new_tokens():
    fed = []

    def step(new_ids):
        fed.append(list(new_ids))
        return torch.nn.functional.one_hot(torch.tensor(len(fed) + 10), 32).float()  # next id: 11, 12, 13, ...

    assert greedy_generate_cached(step, [1, 2, 3], 4, stop_id=14) == [11, 12, 13]
    assert fed == [[1, 2, 3], [11], [12], [13]]


def test_without_a_cache_the_uncached_loop_runs_and_says_why_once(scorer, monkeypatch, capsys):
    """Stands in for a megatron-core version without a static inference context (none is installed here)."""
    from megatron_ipt.training import mcore

    prompt = PROMPTS[2]
    expected = greedy_generate(scorer.logits, prompt, 16)
    monkeypatch.setattr(mcore, "kv_cache_forward_kwargs", lambda *a, **k: None)
    monkeypatch.setattr(scorer, "no_kv_cache", None)
    assert scorer.generate(prompt, 16) == expected
    assert scorer.generate(prompt, 16) == expected
    err = capsys.readouterr().err
    assert err.count("without a KV cache") == 1 and "has no static inference context" in err
