"""Engine selection, sampling settings and the missing-vLLM error (real transformers engine on a tiny Llama)."""

import importlib.util

import pytest
from fixtures_synth import tiny_llama_path  # noqa: F401 (fixture)

from data_prep.engines import TransformersEngine
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
