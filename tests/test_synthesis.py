import json

import pytest
from fixtures_synth import save_tiny_llama, smollm2_path, smollm2_tokenizer, tiny_llama_path  # noqa: F401 (fixtures)

from data_prep.engines import TransformersEngine
from data_prep.errors import DataPrepError
from data_prep.synthesize import synthesize_documents
from megatron_ipt.config import SynthesisConfig

PROMPTS = ["A short prompt.", "A much longer prompt about the while statement and its else clause, " * 3, "Mid length prompt here."]
DOCS = [
    {"id": "a", "split": "train", "text": "The pass statement does nothing. " * 40},
    {"id": "b", "split": "heldout", "text": "Sets are unordered collections."},
    {"id": "c", "split": "train", "text": "The break statement ends the loop."},
]
RECORD_KEYS = {"id", "split", "text", "pairs", "raw_output", "dropped"}
COUNT_KEYS = {
    "documents", "documents_with_pairs", "pairs_kept", "pairs_dropped", "generated_tokens", "generation_seconds",
    "generated_tokens_per_second", "model", "prompt_format", "parse_mode", "pair_structure", "prompts",
    "chunked_documents", "rounds", "chained_documents", "resumed_prompts", "dtype",
}


@pytest.fixture(scope="module")
def tiny_engine(tiny_llama_path):
    return TransformersEngine(tiny_llama_path, device="cpu")


def _cfg(model, **kw):
    kw = {"prompt_format": "lmops", "max_context_tokens": 32, "chunking": False, "batch_size": 2, **kw}  # fast tests
    return SynthesisConfig(model=str(model), device="cpu", max_new_tokens=8, **kw)


def test_engine_returns_results_in_input_order_whatever_the_batching(tiny_engine):
    batched = tiny_engine.generate(PROMPTS, max_new_tokens=6, batch_size=2)
    alone = [tiny_engine.generate([p], max_new_tokens=6, batch_size=1)[0] for p in PROMPTS]
    assert [r.text for r in batched] == [r.text for r in alone]


def test_engine_generates_max_new_tokens_when_no_eos_comes(tiny_engine):
    results = tiny_engine.generate(PROMPTS, max_new_tokens=5, batch_size=3)
    assert [r.num_generated_tokens for r in results] == [5, 5, 5]


def test_engine_pads_on_the_left(tiny_engine):
    assert tiny_engine.tokenizer.padding_side == "left" and tiny_engine.tokenizer.pad_token is not None


def test_engine_stops_at_eos(tmp_path):
    folder = save_tiny_llama(tmp_path / "eos_model", eos_token_id=0, zero_lm_head=True)  # greedy picks id 0 = EOS
    results = TransformersEngine(folder, device="cpu").generate(PROMPTS, max_new_tokens=20, batch_size=2)
    assert [(r.text, r.num_generated_tokens) for r in results] == [("", 0)] * 3


def test_synthesis_writes_one_record_per_document_in_input_order(tiny_llama_path, tiny_engine, tmp_path):
    out = tmp_path / "synth.jsonl"
    synthesize_documents(_cfg(tiny_llama_path), DOCS, out, progress=False, engine=tiny_engine)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["a", "b", "c"]
    assert all(set(r) == RECORD_KEYS for r in records)
    assert [r["split"] for r in records] == ["train", "heldout", "train"]


def test_synthesis_keeps_the_full_text_when_the_prompt_is_truncated(tiny_llama_path, tiny_engine, tmp_path):
    out = tmp_path / "synth.jsonl"
    synthesize_documents(_cfg(tiny_llama_path, max_context_tokens=16), DOCS[:1], out, progress=False, engine=tiny_engine)
    assert json.loads(out.read_text())["text"] == DOCS[0]["text"]


def test_synthesis_raw_output_starts_with_the_fewshot_prefill(tiny_llama_path, tiny_engine, tmp_path):
    out = tmp_path / "synth.jsonl"
    synthesize_documents(_cfg(tiny_llama_path, prompt_format="fewshot"), DOCS, out, progress=False, engine=tiny_engine)
    assert all(json.loads(line)["raw_output"].startswith("<QUE>") for line in out.read_text().splitlines())


def test_synthesis_returns_counts(tiny_llama_path, tiny_engine, tmp_path):
    counts = synthesize_documents(_cfg(tiny_llama_path), DOCS, tmp_path / "s.jsonl", progress=False, engine=tiny_engine)
    assert set(counts) == COUNT_KEYS
    assert counts["documents"] == 3 and counts["model"] == str(tiny_llama_path)
    assert counts["dtype"] == tiny_engine.dtype  # the compute dtype used, synthesis.dtype auto resolved
    assert 0 < counts["generated_tokens"] <= 3 * 8
    assert (counts["prompt_format"], counts["parse_mode"]) == ("lmops", "lenient")
    families = {k: v for k, v in counts["pair_structure"].items() if not k.startswith("issue:")}
    assert sum(families.values()) == counts["pairs_kept"]  # every kept pair has one family


def test_synthesis_loads_its_engine_from_the_config_and_shows_progress(tiny_llama_path, tmp_path):
    counts = synthesize_documents(_cfg(tiny_llama_path, parse_mode="strict"), DOCS[1:], tmp_path / "s.jsonl")
    assert counts["documents"] == 2 and counts["parse_mode"] == "strict"


def test_synthesis_of_no_documents_is_an_error(tiny_llama_path, tmp_path):
    with pytest.raises(DataPrepError, match="no documents to synthesize"):
        synthesize_documents(_cfg(tiny_llama_path), [], tmp_path / "s.jsonl", progress=False)


def test_synthesis_rejects_a_document_without_text(tiny_llama_path, tmp_path):
    with pytest.raises(DataPrepError, match="document 0 .* no field\\(s\\) text"):
        synthesize_documents(_cfg(tiny_llama_path), [{"id": "x", "split": "train"}], tmp_path / "s.jsonl", progress=False)
    assert not (tmp_path / "s.jsonl").exists()


@pytest.mark.e2e
def test_smollm2_synthesizes_pairs_for_pydoc_topics(smollm2_path, tmp_path):
    from pydoc_data.topics import topics

    docs = [{"id": k, "split": "train", "text": topics[k]} for k in ("break", "global", "lambda")]
    cfg = SynthesisConfig(model="smollm2-135m-instruct", max_new_tokens=64, max_context_tokens=256, batch_size=3,
                          chunking=False)
    out = tmp_path / "synth.jsonl"
    counts = synthesize_documents(cfg, docs, out, progress=False)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["break", "global", "lambda"]
    assert all(set(r) == RECORD_KEYS and r["raw_output"].startswith("<QUE>") for r in records)
    assert counts["pairs_kept"] == sum(len(r["pairs"]) for r in records) >= 1
    assert counts["documents_with_pairs"] == sum(bool(r["pairs"]) for r in records)
    assert all(set(p) == {"question", "answer"} and p["question"] and p["answer"] for r in records for p in r["pairs"])
    assert 0 < counts["generated_tokens"] <= 3 * 64


def test_generate_batch_size_defaults_to_the_whole_round_for_vllm_and_8_for_transformers(tiny_llama_path):
    from data_prep.synthesize import TRANSFORMERS_BATCH_SIZE, generate_batch_size

    vllm = SynthesisConfig(model="m", engine="vllm")
    assert vllm.batch_size is None
    assert generate_batch_size(vllm, 1234) == 1234  # the reference: one LLM.generate call per round
    assert generate_batch_size(vllm, 0) == 1
    assert generate_batch_size(SynthesisConfig(model="m", engine="vllm", batch_size=64), 1234) == 64
    assert generate_batch_size(SynthesisConfig(model="m"), 1234) == TRANSFORMERS_BATCH_SIZE == 8


def test_unset_batch_size_journals_transformers_batches_of_8(tiny_llama_path, tiny_engine, tmp_path):
    from data_prep.shards import ShardJournal

    docs = [{"id": f"d{i}", "split": "train", "text": f"Document {i} is about loops. " * 3} for i in range(10)]
    batches = {}
    for size in (None, 4):
        journal = ShardJournal(tmp_path / f"j{size}.jsonl")
        synthesize_documents(_cfg(tiny_llama_path, batch_size=size), docs, tmp_path / f"s{size}.jsonl",
                             progress=False, engine=tiny_engine, journal=journal)
        batches[size] = journal.batches
    assert batches == {None: 2, 4: 3}  # 10 prompts: 8 + 2, and 4 + 4 + 2


def test_redirected_output_shows_progress_lines_and_a_resume_says_how_much_was_done(tiny_llama_path, tiny_engine,
                                                                                   tmp_path, capsys, monkeypatch):
    """With stdout not a terminal (as under Slurm or nohup) synthesis prints plain progress lines, not a bar drawn
    once at the end; a rerun on the same journal says how many prompts it already holds."""
    from data_prep.shards import ShardJournal

    monkeypatch.setenv("IPT_PROGRESS_SECONDS", "0")
    journal = ShardJournal(tmp_path / "j.jsonl", key="k")
    synthesize_documents(_cfg(tiny_llama_path), DOCS, tmp_path / "a.jsonl", engine=tiny_engine, journal=journal)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("synthesize: ")]
    assert lines[0].startswith("synthesize: 2/3 prompts (67%) | ") and "generated tokens/s" in lines[0]
    assert lines[-1].startswith("synthesize: 3/3 prompts (100%)")
    synthesize_documents(_cfg(tiny_llama_path), DOCS, tmp_path / "b.jsonl", engine=tiny_engine,
                         journal=ShardJournal(tmp_path / "j.jsonl", key="k"))
    out = capsys.readouterr().out
    assert "synthesize: resuming: 3 of 3 prompts already done" in out
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_an_answer_identical_to_another_documents_is_dropped_from_both(smollm2_tokenizer, smollm2_path, tmp_path):
    from fixtures_synth import ScriptedEngine

    # the scripted engine answers with the text's first sentence: documents 0 and 1 share it
    docs = [{"id": "if", "split": "train", "text": "Conditional execution uses if statements. Then elif may follow."},
            {"id": "else", "split": "train", "text": "Conditional execution uses if statements. An else may close it."},
            {"id": "while", "split": "train", "text": "Repeated execution uses while loops. They test an expression."}]
    cfg = SynthesisConfig(model=str(smollm2_path), device="cpu", prompt_format="lmops", parse_mode="strict",
                          max_context_tokens=64, max_new_tokens=16, chunking=False, min_grounding=0.3)
    out = tmp_path / "pairs.jsonl"
    counts = synthesize_documents(cfg, docs, out, progress=False, engine=ScriptedEngine(smollm2_tokenizer))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(r["pairs"]) for r in records] == [0, 0, 1]
    assert [r["dropped"] for r in records] == [{"duplicate_answer": 1}, {"duplicate_answer": 1}, {}]
    assert counts["pairs_dropped"] == {"duplicate_answer": 2} and counts["documents_with_pairs"] == 1
