"""Batched evaluation: several sequences per forward give the batch-1 results. Scoring (right padding) gives the
same answer NLLs (1e-5 relative) and multiple-choice accuracy (exact); greedy generation over one KV cache (left
padding, padding keys masked) gives the same token ids as one prompt at a time, rows ending at different steps.
Megatron scorer on the installed megatron-core (both supported versions in CI), Hugging Face scorer where
transformers is installed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megatron_ipt.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import VOCAB, tiny_config  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-path tests")

PROMPTS = [[5], [5, 6, 7, 8], list(range(3, 40, 3)), [200, 17, 17, 17, 90, 4, 4, 249, 1, 33], [9, 9]]
NEW = 20

TASK = [  # a task JSONL: texts of different lengths, two multiple-choice pairs
    {"text": "The while loop repeats its body while the condition holds.", "question": "What repeats?",
     "answer": "The body", "options": ["The body", "The condition", "Nothing"]},
    {"text": "A class defines objects.", "question": "What defines objects?", "answer": "A class"},
    {"text": "Python imports a module once; later imports reuse the cached module object from sys.modules, "
             "so its top-level code runs a single time.", "question": "How often does top-level code run?",
     "answer": "once", "options": ["twice", "once"]},
    {"text": "Lists are mutable.", "question": "Are lists mutable?", "answer": "yes"},
    {"text": "A generator yields values lazily, one at a time, when iterated.", "question": "How?",
     "answer": "lazily"},
]


@pytest.fixture
def scorer():  # one test at a time: a megatron scorer holds the process's one model-parallel world
    from megatron_ipt.evaluate.scorers import MegatronScorer

    with MegatronScorer(tiny_config(), VOCAB, None) as s:
        yield s


def stop_id_ending_rows_at_different_steps(outputs: list[list[int]]) -> int:
    """A token that ends at least two rows, at different steps, while another row never makes it."""
    for token in sorted({t for out in outputs for t in out}):
        ends = [out.index(token) if token in out else None for out in outputs]
        stopped = {e for e in ends if e is not None}
        if len(stopped) >= 2 and None in ends:
            return token
    raise AssertionError(f"no such stop token in {outputs}")


def test_megatron_logits_batch_rows_are_the_batch_1_logits(scorer):
    rows = scorer.logits_batch(PROMPTS)
    assert [r.shape for r in rows] == [(len(p), VOCAB) for p in PROMPTS]
    for prompt, row in zip(PROMPTS, rows):
        assert torch.allclose(row, scorer.logits(prompt), atol=1e-5, rtol=0)
    assert scorer.logits_batch([]) == []


def test_megatron_batched_greedy_ids_equal_batch_1_cached_ids(scorer):
    alone = [scorer.generate(p, NEW) for p in PROMPTS]
    assert scorer.no_kv_cache is None and all(len(out) == NEW for out in alone)
    assert scorer.generate_batch(PROMPTS, NEW) == alone
    assert scorer.no_batched_kv_cache is None  # one batched cache, no fallback
    stop = stop_id_ending_rows_at_different_steps(alone)
    cut = [out[: out.index(stop)] if stop in out else out for out in alone]
    assert scorer.generate_batch(PROMPTS, NEW, stop_id=stop) == cut
    assert [scorer.generate(p, NEW, stop_id=stop) for p in PROMPTS] == cut
    assert scorer.generate_batch(PROMPTS, 0) == [[] for _ in PROMPTS]


def test_megatron_batched_cache_logits_match_each_rows_full_forward(scorer):
    """Every step, each row's logits are those of its own sequence alone, padding and all."""
    step = scorer.kv_batch_step(len(PROMPTS), max(map(len, PROMPTS)) + 6)
    seqs, new = [list(p) for p in PROMPTS], [list(p) for p in PROMPTS]
    for _ in range(6):
        cached = step(new)
        assert cached.shape == (len(PROMPTS), VOCAB)
        full = torch.stack([scorer.logits(s)[-1] for s in seqs])
        assert torch.allclose(cached, full, atol=1e-4, rtol=0), float((cached - full).abs().max())
        new = [[int(t)] for t in full.argmax(-1)]
        seqs = [s + n for s, n in zip(seqs, new)]
    with pytest.raises(ValueError, match="same number of tokens"):
        step([[1], [2, 3], [4], [5], [6]])
    step(new)  # the cache is now full
    with pytest.raises(ValueError, match="KV cache holds"):
        step([[1]] * len(PROMPTS))


def test_without_masked_attention_the_batch_runs_one_prompt_at_a_time(scorer, monkeypatch, capsys):
    """Stands in for a model whose attention is Transformer Engine's (not installed here), which may not apply
    the per-row padding mask: each prompt alone through the cache, the same ids, said once on stderr."""
    from megatron_ipt.training import mcore

    expected = [scorer.generate(p, 8) for p in PROMPTS]
    monkeypatch.setattr(mcore, "applies_attention_masks", lambda model: False)
    monkeypatch.setattr(scorer, "no_batched_kv_cache", None)
    assert scorer.generate_batch(PROMPTS, 8) == expected
    assert scorer.generate_batch(PROMPTS, 8) == expected
    err = capsys.readouterr().err
    assert err.count("one prompt at a time") == 1 and "DotProductAttention" in err


def test_megatron_batched_rc_metrics_equal_batch_1(tiny_tokenizer_dir):
    from data_prep.encoders import load_encoder
    from megatron_ipt.evaluate.run import evaluate_rc
    from megatron_ipt.evaluate.scorers import MegatronScorer

    encoder = load_encoder(tiny_tokenizer_dir)
    docs = [{"id": f"d{i}", "text": t["text"], "pairs": [{k: v for k, v in t.items() if k != "text"}]}
            for i, t in enumerate(TASK)]
    with MegatronScorer(tiny_config(), encoder.vocab_size, None) as scorer:
        one, four = (evaluate_rc(scorer, encoder, docs, shots=1, max_length=64, max_new_tokens=8, batch_size=b)
                     for b in (1, 4))
        with pytest.raises(ValueError, match="batch size must be at least 1"):
            evaluate_rc(scorer, encoder, docs, shots=0, max_length=64, batch_size=0)
    assert_same_results(one, four)


def assert_same_results(one: dict, batched: dict) -> None:
    assert one["n"] == batched["n"] == len(TASK) and one["n_multiple_choice"] == batched["n_multiple_choice"] == 2
    assert one["truncated"] == batched["truncated"]
    assert batched["metrics"]["answer_nll"] == pytest.approx(one["metrics"]["answer_nll"], rel=1e-5)
    for exact in ("mc_accuracy", "exact_match", "f1"):
        assert batched["metrics"][exact] == one["metrics"][exact]
    assert batched["generations"] == one["generations"]


def test_hf_batched_logits_generation_and_rc_metrics_equal_batch_1(tmp_path, tiny_tokenizer_dir):
    pytest.importorskip("transformers")
    from data_prep.encoders import load_encoder
    from fixtures_eval import tiny_export
    from megatron_ipt.evaluate.run import evaluate_rc
    from megatron_ipt.evaluate.scorers import HFScorer

    encoder = load_encoder(tiny_tokenizer_dir)
    docs = [{"id": f"d{i}", "text": t["text"], "pairs": [{k: v for k, v in t.items() if k != "text"}]}
            for i, t in enumerate(TASK)]
    with HFScorer(tiny_export(tmp_path / "hf", tiny_tokenizer_dir)) as scorer:
        for prompt, row in zip(PROMPTS, scorer.logits_batch(PROMPTS)):
            assert torch.allclose(row, scorer.logits(prompt), atol=1e-5, rtol=0)
        alone = [scorer.generate(p, NEW) for p in PROMPTS]
        assert all(len(out) == NEW for out in alone)
        assert scorer.generate_batch(PROMPTS, NEW) == alone
        stop = stop_id_ending_rows_at_different_steps(alone)
        cut = [out[: out.index(stop)] if stop in out else out for out in alone]
        assert scorer.generate_batch(PROMPTS, NEW, stop_id=stop) == cut
        assert [scorer.generate(p, NEW, stop_id=stop) for p in PROMPTS] == cut
        one, three = (evaluate_rc(scorer, encoder, docs, shots=1, max_length=64, max_new_tokens=8, batch_size=b)
                      for b in (1, 3))
    assert_same_results(one, three)


def eval_experiment(tmp_path: Path, tokenizer_dir: Path) -> tuple[Path, Path]:
    """An experiment YAML for ``ipt eval`` (tiny config, run folder under ``tmp_path`` whose tokenize manifest names
    ``tokenizer_dir``) and a reading-comprehension task JSONL of :data:`TASK`; returns ``(config, task)``."""
    from data_prep.encoders import load_encoder
    from megatron_ipt.manifest import write_manifest
    from megatron_ipt.pipeline import stage_path

    cfg = tiny_config()
    cfg.run_dir = str(tmp_path / "run")
    encoder = load_encoder(tokenizer_dir)
    write_manifest(stage_path(cfg, "tokenize"), stage="tokenize", fingerprint="test", config={},
                   tokenizer={"path": str(tokenizer_dir), "vocab_size": encoder.vocab_size, "eod_id": encoder.eod_id})
    config, task = tmp_path / "exp.yaml", tmp_path / "task.jsonl"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    task.write_text("".join(json.dumps(t) + "\n" for t in TASK))
    return config, task


def test_eval_cli_batch_size_is_validated_and_recorded(tmp_path, tiny_tokenizer_dir, capsys):
    assert main(["eval", str(tmp_path / "missing.yaml"), "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1 (got 0)" in capsys.readouterr().err
    config, task = eval_experiment(tmp_path, tiny_tokenizer_dir)
    records = {}
    for size in ("1", "3"):
        out = tmp_path / f"rc-{size}.json"
        assert main(["eval", str(config), "--init", "--data", str(task), "--batch-size", size, "--generate",
                     "--max-new-tokens", "6", "--output", str(out)]) == 0
        records[size] = json.loads(out.read_text())
        assert records[size]["settings"]["batch_size"] == int(size)
    assert_same_results(records["1"], records["3"])
