"""The SDPA core attention (``model.attention_backend``, megatron_ipt/training/attention.py) against megatron-core's
unfused ``DotProductAttention``: same logits and gradients within 1e-5 (float32) for causal training, padding
masks, document masks and grouped-query attention (2 and 1 key/value heads) at TP=1 and TP=2; same parameter names
(checkpoints load either way); dropout in training only; greedy generation, cached and batched with left padding,
gives the same ids with either backend; the KV cache of generation holds keys after RoPE (the rotated-key-cache
``SelfAttention``) and decodes as megatron-core's own. Runs on the installed megatron-core (both supported versions in CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import attention_worker  # noqa: E402
from train_fixtures import VOCAB, tiny_config  # noqa: E402

from megatron_ipt.config import ModelConfig, ParallelConfig  # noqa: E402
from megatron_ipt.training import cpu_backend, mcore, parallel  # noqa: E402
from megatron_ipt.training.attention import AttentionBackendError, resolve_attention_backend  # noqa: E402
from megatron_ipt.training.model import build_model  # noqa: E402
from megatron_ipt.training.presets import resolve_preset  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-path tests")
TOLERANCE = 1e-5
WORKER = Path(__file__).parent / "attention_worker.py"


def assert_equal_within_tolerance(results: dict) -> None:
    for case, r in results.items():
        assert r["names"], f"{case}: parameter names differ between the backends"
        assert r["logits"] <= TOLERANCE, f"{case}: logits differ by {r['logits']}"
        assert r["grads"] <= TOLERANCE, f"{case}: gradients differ by {r['grads']}"
        assert r["grad_scale"] > 1e3 * TOLERANCE, f"{case}: gradients too small to compare ({r['grad_scale']})"


@pytest.mark.parametrize("num_query_groups", [2, 1])
def test_sdpa_logits_and_gradients_equal_unfused_at_tp1(num_query_groups):
    # llama-test: 4 heads over 2 key/value groups (GQA) or 1 (multi-query); causal, left padding, documents
    assert_equal_within_tolerance(attention_worker.compare(num_query_groups=num_query_groups))


def test_sdpa_in_bf16_agrees_with_unfused_to_bf16_rounding():
    # bf16 parameters (Float16Module): logits within a few bf16 steps (1/256 at 0.65), gradients likewise
    for case, r in attention_worker.compare(precision="bf16").items():
        assert r["names"] and r["logits"] <= 2e-2 and r["grads"] <= 2e-2 * r["grad_scale"], (case, r)


@pytest.mark.e2e
def test_sdpa_logits_and_gradients_equal_unfused_at_tp2():
    # TP=2: each rank holds 2 heads over 1 key/value group
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(WORKER), "--tp", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # each rank prints one "RESULT {json}" line; torchrun may join the two ranks' lines into one
    ranks = [json.JSONDecoder().raw_decode(part)[0] for part in out.stdout.split("RESULT ")[1:]]
    assert len(ranks) == 2
    for results in ranks:
        assert_equal_within_tolerance(results)


def test_attention_backend_resolves_per_layer_implementation():
    assert resolve_attention_backend("auto", "local") == "sdpa"
    assert resolve_attention_backend("sdpa", "local") == "sdpa"
    assert resolve_attention_backend("unfused", "local") == "unfused"
    assert resolve_attention_backend("auto", "transformer_engine") is None
    with pytest.raises(AttentionBackendError, match="model.attention_backend = sdpa .*transformer_engine"):
        resolve_attention_backend("sdpa", "transformer_engine")
    with pytest.raises(ValueError, match="attention_backend"):
        ModelConfig(attention_backend="flash")


@pytest.fixture
def world():
    preset = resolve_preset(ModelConfig(preset="llama-test"))
    with cpu_backend.cpu_backend(enabled=True):
        layout = parallel.setup(ParallelConfig(), torch.device("cpu"), micro_batch_size=1, global_batch_size=1,
                                num_layers=preset.num_layers, num_attention_heads=preset.num_attention_heads,
                                num_query_groups=preset.num_query_groups, seed=0)
        try:
            yield preset, layout
        finally:
            parallel.teardown()


def core_attentions(model) -> list:
    return [m.core_attention for m in model.modules() if hasattr(m, "core_attention")]


def test_auto_builds_sdpa_in_every_layer_and_unfused_keeps_megatrons_own(world):
    preset, layout = world
    models = {b: build_model(preset, layout, vocab_size=256, seq_length=32, device=torch.device("cpu"),
                             attention_backend=b) for b in ("auto", "unfused")}
    base = mcore.dot_product_attention_class()
    assert [type(c).__name__ for c in core_attentions(models["auto"])] == ["SDPADotProductAttention"] * preset.num_layers
    assert all(type(c) is base for c in core_attentions(models["unfused"]))
    assert all(mcore.applies_attention_masks(m) for m in models.values())  # batched generation keeps its mask
    names = {b: [type(m.self_attention).__name__ for m in model.modules() if hasattr(m, "self_attention")]
             for b, model in models.items()}
    assert names == {"auto": ["RotatedKeyCacheSelfAttention"] * preset.num_layers,
                     "unfused": ["SelfAttention"] * preset.num_layers}


def _cached_decode(model, prompt: list[int], steps: int, max_len: int):
    """Logits of the prefill and of ``steps`` greedy decoding steps over megatron-core's static KV cache, and the
    context (its ``key_value_memory_dict``: layer -> (keys, values) ``[max_len, b, groups, d]``)."""
    kwargs = mcore.kv_cache_forward_kwargs(model.forward, max_batch_size=1, max_sequence_length=max_len)
    context = kwargs.get("inference_context", kwargs.get("inference_params"))
    rows, new = [], list(prompt)
    with torch.inference_mode():
        for _ in range(steps + 1):
            start = context.sequence_len_offset
            if start and hasattr(context, "enable_decode_mode"):
                context.enable_decode_mode()
            pos = torch.arange(start, start + len(new)).unsqueeze(0)
            logits = model(input_ids=torch.tensor([new]), position_ids=pos, attention_mask=None, **kwargs)[0, -1]
            context.sequence_len_offset = start + len(new)
            rows.append(logits.clone())
            new = [int(logits.argmax())]
    return torch.stack(rows), context


def test_kv_cache_holds_keys_after_rope_and_decodes_as_megatrons_own(world):
    """megatron-core caches keys before RoPE and rotates them all again at every step; the SDPA backend's
    self-attention caches them rotated: the cache is megatron's rotated by the positions' embedding, the logits
    of prefill and decoding steps are the same within 1e-5, and the parameter names are the same (state dicts
    load across)."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    preset, layout = world
    models = {b: build_model(preset, layout, vocab_size=256, seq_length=32, device=torch.device("cpu"),
                             attention_backend=b).eval() for b in ("auto", "unfused")}
    models["auto"].load_state_dict(models["unfused"].state_dict())  # strict: the same names
    prompt, steps, max_len = [3, 17, 250, 9, 9, 41, 2], 6, 16
    (ours, our_cache), (theirs, their_cache) = (_cached_decode(models[b], prompt, steps, max_len)
                                                for b in ("auto", "unfused"))
    assert torch.allclose(ours, theirs, atol=TOLERANCE, rtol=0), float((ours - theirs).abs().max())
    n = len(prompt) + steps
    freqs = models["unfused"].rotary_pos_emb(max_len)[:n]  # [n, 1, 1, d]
    for layer, (keys, values) in their_cache.key_value_memory_dict.items():
        our_keys, our_values = our_cache.key_value_memory_dict[layer]
        rotated = apply_rotary_pos_emb(keys[:n].clone(), freqs, config=models["unfused"].config)
        assert not torch.allclose(keys[:n], our_keys[:n], atol=1e-3)  # megatron's own holds them before RoPE
        torch.testing.assert_close(our_keys[:n], rotated, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(our_values[:n], values[:n], atol=TOLERANCE, rtol=0)


def test_dropout_applies_in_training_only_and_follows_the_model_parallel_rng(world):
    preset, layout = world
    model = build_model(preset, layout, vocab_size=256, seq_length=32, device=torch.device("cpu"))
    core = core_attentions(model)[0]
    core.attention_dropout.p = 0.5
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(16, 2, n, 16, generator=gen) for n in (4, 2, 2))  # [s, b, heads or groups, d]

    def run(training: bool) -> torch.Tensor:
        core.train(training)
        mcore.model_parallel_cuda_manual_seed(7)
        return core(q, k, v, None)

    assert torch.equal(run(True), run(True))  # same tracker seed, same dropped entries
    assert not torch.allclose(run(True), run(False))
    core.attention_dropout.p = 0.0
    torch.testing.assert_close(run(True), run(False))


@pytest.mark.parametrize("batched", [False, True])
def test_greedy_generation_ids_equal_with_either_backend(batched):
    from megatron_ipt.evaluate.scorers import MegatronScorer

    prompts = [[5], [5, 6, 7, 8], list(range(3, 40, 3)), [200, 17, 17, 17, 90, 4, 4, 249, 1, 33]]
    ids = {}
    for backend in ("unfused", "sdpa"):
        with MegatronScorer(tiny_config(model__attention_backend=backend), VOCAB, None) as scorer:
            if batched:
                ids[backend] = scorer.generate_batch(prompts, 12)
                assert scorer.no_batched_kv_cache is None
            else:
                ids[backend] = [scorer.generate(p, 12) for p in prompts]
            assert scorer.no_kv_cache is None
    assert ids["sdpa"] == ids["unfused"]
