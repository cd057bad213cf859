"""Engine selection, sampling settings and the missing-vLLM error (real transformers engine on a tiny Llama)."""

import importlib.util

import pytest
import torch
from fixtures_synth import tiny_llama_path  # noqa: F401 (fixture)

from data_prep.engines import CPU_BF16_ATTENTION, TransformersEngine, native_bf16_cpu, resolve_dtype, shared_prefix
from data_prep.errors import DataPrepError
from data_prep.synthesize import make_engine
from megatron_ipt.config import SynthesisConfig

PROMPTS = ["The while statement", "Sets are unordered collections of distinct objects"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed in this interpreter")
def test_vllm_engine_without_vllm_names_what_to_install(tiny_llama_path):
    with pytest.raises(DataPrepError, match="pip install vllm"):
        make_engine(SynthesisConfig(engine="vllm"), tiny_llama_path)


def test_sampling_with_a_seed_is_reproducible_and_greedy_is_default(tiny_llama_path):
    greedy = make_engine(SynthesisConfig(device="cpu"), tiny_llama_path)
    assert greedy.temperature == 0.0
    runs = []
    for _ in range(2):
        engine = TransformersEngine(tiny_llama_path, device="cpu", seed=3, temperature=1.0, top_p=0.9)
        runs.append(engine.generate(PROMPTS, max_new_tokens=8, batch_size=2))
    assert runs[0] == runs[1]
    assert all(r.num_generated_tokens <= 8 for r in runs[0])


@pytest.mark.parametrize("temperature,top_p", [(-0.1, 1.0), (1.0, 0.0), (1.0, 1.5)])
def test_bad_sampling_settings_are_refused(tiny_llama_path, temperature, top_p):
    with pytest.raises(DataPrepError, match="synthesis.temperature"):
        TransformersEngine(tiny_llama_path, device="cpu", temperature=temperature, top_p=top_p)


X86_FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw {extra}\n"


@pytest.mark.parametrize("cpuinfo,native", [
    (X86_FLAGS.format(extra="avx512_bf16"), True),
    (X86_FLAGS.format(extra="amx_bf16 amx_tile"), True),
    ("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n", True),  # Arm (ARMv8.6-A BF16)
    (X86_FLAGS.format(extra=""), False),  # AVX-512 without bf16: bfloat16 is emulated
    ("", False),
])
def test_native_bfloat16_is_read_from_the_cpu_flags(cpuinfo, native):
    assert native_bf16_cpu(cpuinfo) is native


def test_dtype_auto_resolves_by_the_cpu_and_an_explicit_dtype_is_kept():
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if native_bf16_cpu() else "float32")
    assert [resolve_dtype(d, "cpu") for d in ("float32", "bfloat16", "float16")] == ["float32", "bfloat16", "float16"]
    with pytest.raises(DataPrepError, match="synthesis.dtype"):
        resolve_dtype("fp8", "cpu")


def test_cpu_generation_with_the_static_cache_gives_the_dynamic_cache_ids(tiny_llama_path):
    """The engine decodes with a preallocated (static) cache on CPU; greedy ids are those of transformers' default
    dynamic cache on the same float32 weights (left-padded batch of two prompts of different lengths)."""
    engine = TransformersEngine(tiny_llama_path, device="cpu", dtype="float32")
    ours = engine.generate(PROMPTS, max_new_tokens=12, batch_size=2)
    batch = engine.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = engine.model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=engine.tokenizer.pad_token_id,
                                    eos_token_id=engine.eos_token_ids)
    dynamic = [engine.tokenizer.decode(ids[batch["input_ids"].shape[1]:], skip_special_tokens=True) for ids in out]
    assert [r.text for r in ours] == dynamic


def test_bfloat16_on_cpu_computes_prompt_attention_in_float32(tiny_llama_path):
    """In bfloat16 on CPU the engine's attention over prompts is SDPA in float32 (CPU_BF16_ATTENTION): its logits
    match the float32 model's to bfloat16 weight precision, and generation runs (static cache)."""
    bf16 = TransformersEngine(tiny_llama_path, device="cpu", dtype="bfloat16")
    fp32 = TransformersEngine(tiny_llama_path, device="cpu", dtype="float32")
    assert bf16.model.config._attn_implementation == CPU_BF16_ATTENTION
    assert fp32.model.config._attn_implementation == "sdpa"
    batch = fp32.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        a, b = (e.model(**batch).logits.float() for e in (bf16, fp32))
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    assert all(r.num_generated_tokens <= 6 for r in bf16.generate(PROMPTS, max_new_tokens=6, batch_size=2))


def test_bfloat16_decoding_steps_skip_the_upcast(tiny_llama_path, monkeypatch):
    """In bfloat16 on CPU the prompt's forward computes attention in float32 and every decoding step in bfloat16
    (one SDPA call per layer and step, watched through a wrapper that calls PyTorch's own function)."""
    engine = TransformersEngine(tiny_llama_path, device="cpu", dtype="bfloat16")
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []

    def watched(query, *args, **kwargs):
        calls.append(query.dtype)
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", watched)
    results = engine.generate(PROMPTS, max_new_tokens=6, batch_size=2)
    layers, steps = engine.model.config.num_hidden_layers, max(r.num_generated_tokens for r in results) - 1
    assert steps > 0 and calls[:layers] == [torch.float32] * layers  # the prompts' forward
    assert calls[layers:] == [torch.bfloat16] * (len(calls) - layers) and len(calls) - layers >= layers * steps


def test_shared_prefix_keeps_each_prompts_last_token():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 7]]) == [1, 2]
    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == [1, 2]  # the shorter prompt keeps its last token
    assert shared_prefix([[1, 2, 3]]) == [1, 2]
    assert shared_prefix([[9], [9, 1]]) == [] and shared_prefix([]) == []


HEADER = ("Read the following texts and write questions about them, each followed by its answer. "
          "The answers must come from the text. ") * 3


def test_a_shared_prompt_prefix_is_computed_once_and_gives_the_same_ids(tiny_llama_path, monkeypatch):
    """On CPU the prompts' common first tokens (few-shot demonstrations) go through the model once per call; each
    batch feeds only the rest, padded after the prefix; a later call reuses it. Same greedy texts as without it (float32), batches of
    prompts whose rests differ in length."""
    import data_prep.engines as engines

    prompts = [HEADER + tail for tail in ("Text: the cat sat.", "Text: a longer text about dogs and their owners.",
                                          "Text: x, y.", "Text: rivers flow to the sea, mostly.")]
    engine = TransformersEngine(tiny_llama_path, device="cpu", dtype="float32")
    encoded = engine.tokenizer(prompts)["input_ids"]
    prefix = shared_prefix(encoded)
    assert len(prefix) >= engines.MIN_SHARED_PREFIX
    fed = []
    hook = engine.model.register_forward_pre_hook(lambda m, a, kw: fed.append(tuple(kw["input_ids"].shape)),
                                                  with_kwargs=True)
    try:
        ours = engine.generate(prompts, max_new_tokens=10, batch_size=3)
    finally:
        hook.remove()
    rests = sorted((len(ids) - len(prefix) for ids in encoded), reverse=True)
    assert fed[0] == (1, len(prefix))  # the prefix, once
    prefills = [shape for shape in fed[1:] if shape[1] > 1]
    assert prefills == [(3, rests[0]), (1, rests[3])]  # each batch: only the rest of its prompts
    fed.clear()
    hook = engine.model.register_forward_pre_hook(lambda m, a, kw: fed.append(tuple(kw["input_ids"].shape)),
                                                  with_kwargs=True)
    try:
        again = engine.generate(prompts[1:], max_new_tokens=10, batch_size=3)  # a later call: the prefix is held
    finally:
        hook.remove()
    assert fed[0][0] == 3 and [r.text for r in again] == [r.text for r in ours[1:]]
    monkeypatch.setattr(engines, "MIN_SHARED_PREFIX", 10**9)  # the whole prompts, left-padded
    assert [r.text for r in ours] == [r.text for r in engine.generate(prompts, max_new_tokens=10, batch_size=3)]
    assert all(r.num_generated_tokens > 0 for r in ours)
