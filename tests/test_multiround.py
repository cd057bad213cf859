"""Multi-round (M-shot) synthesis: slices, chains and prev_id links, the chain budget, long-document chunks,
resume from a shard journal, and the format stage rebuilding chains (data_prep/synthesize.py)."""

from __future__ import annotations

import json

import pytest
from fixtures_synth import ScriptedEngine, smollm2_path, smollm2_tokenizer  # noqa: F401 (fixtures)

from data_prep.format import format_documents
from data_prep.parse import Pair
from data_prep.prompts import build_prompt
from data_prep.shards import ShardJournal
from data_prep.synthesize import round_slices, synthesize_documents
from megatron_ipt.config import SynthesisConfig


def _doc(i, split="train", extra=""):
    return {"id": f"d{i}", "split": split,
            "text": f"Topic{i} is a statement number {i}. It does one thing well{extra}. Nothing else is said here."}


def _cfg(path, **kw):
    kw = {"prompt_format": "lmops", "parse_mode": "strict", "max_context_tokens": 64, "max_new_tokens": 16,
          "batch_size": 2, "rounds": 2, "chunking": False, "save_prompts": True, **kw}
    return SynthesisConfig(model=str(path), device="cpu", **kw)


def _run(path, tok, docs, tmp_path, engine=None, **kw):
    out = tmp_path / "pairs.jsonl"
    counts = synthesize_documents(_cfg(path, **kw), docs, out, progress=False, engine=engine or ScriptedEngine(tok))
    return [json.loads(line) for line in out.read_text().splitlines()], counts


def test_slices_are_consecutive_per_split_and_follow_the_same_position():
    docs = [_doc(i) for i in range(5)] + [_doc(5, "heldout"), _doc(6, "heldout")]
    assert round_slices(docs, 2) == [(0, None), (0, None), (0, None), (1, 0), (1, 1), (0, None), (1, 5)]
    assert round_slices(docs, 1) == [(0, None)] * 7
    assert [r for r, _ in round_slices(docs[:5], 3)] == [0, 0, 1, 1, 2]  # ceil(5 / 3) = 2 per slice


def test_lmops_chained_prompt_is_the_reference_concatenation(smollm2_tokenizer):
    history = [("First text.", [Pair("q1", "a1"), Pair("q2", "a2")]), ("Second text.", [Pair("q3", "a3")])]
    prompt = build_prompt("Third text.", "lmops", smollm2_tokenizer, 64, history=history)
    assert prompt.text == ("<s> <CON> First text. </CON>\n\n<QUE> q1 <ANS> a1 </END>\n\n<QUE> q2 <ANS> a2 </END></s>"
                           "<s> <CON> Second text. </CON>\n\n<QUE> q3 <ANS> a3 </END></s>"
                           "<s> <CON> Third text. </CON>\n\n")
    assert not prompt.add_special_tokens


def test_fewshot_and_chat_chains_come_after_the_demonstrations(smollm2_tokenizer):
    history = [("Earlier text.", [Pair("q1", "a1")])]
    few = build_prompt("Now.", "fewshot", smollm2_tokenizer, 64, history=history).text
    assert few.endswith("<CON> Earlier text. </CON>\n\n<QUE> q1 <ANS> a1 </END>\n\n<CON> Now. </CON>\n\n<QUE>")
    chat = build_prompt("Now.", "chat", smollm2_tokenizer, 64, history=history).text
    assert chat.index("Earlier text.") < chat.index("<QUE> q1 <ANS> a1 </END>") < chat.index("Now.")


def test_second_round_text_is_prompted_after_the_first_rounds_entry(smollm2_path, smollm2_tokenizer, tmp_path):
    docs = [_doc(0), _doc(1, extra=" NOPAIRS"), _doc(2), _doc(3)]
    records, counts = _run(smollm2_path, smollm2_tokenizer, docs, tmp_path)
    by_id = {r["id"]: r for r in records}
    assert [r["round"] for r in records] == [0, 0, 1, 1]
    assert by_id["d0"]["prev_id"] is None and by_id["d1"]["prev_id"] is None
    assert by_id["d2"]["prev_id"] == "d0"  # d0 kept a pair: chained
    assert by_id["d2"]["prompts"][0].startswith(f"<s> <CON> {docs[0]['text']} </CON>\n\n<QUE> What does")
    assert by_id["d3"]["prev_id"] is None  # d1 kept no pairs: the chain breaks, d3 is zero-shot
    assert by_id["d3"]["prompts"][0] == f"<s> <CON> {docs[3]['text']} </CON>\n\n"
    assert counts["chained_documents"] == 1 and counts["rounds"] == 2 and counts["prompts"] == 4


def test_chain_grows_over_rounds_and_breaks_where_a_text_keeps_no_pairs(smollm2_path, smollm2_tokenizer, tmp_path):
    docs = [_doc(0), _doc(1), _doc(2, extra=" NOPAIRS"), _doc(3), _doc(4), _doc(5)]
    records, _ = _run(smollm2_path, smollm2_tokenizer, docs, tmp_path, rounds=3, max_context_tokens=40)
    by_id = {r["id"]: r for r in records}
    # slices [d0 d1] [d2 d3] [d4 d5]: d3 after d1; d5 after d1 + d3; d2 kept nothing, so d4 starts afresh
    assert (by_id["d3"]["prev_id"], by_id["d5"]["prev_id"]) == ("d1", "d3")
    p5 = by_id["d5"]["prompts"][0]
    assert p5.index(docs[1]["text"]) < p5.index(docs[3]["text"]) < p5.index(docs[5]["text"])
    assert by_id["d2"]["prev_id"] is None and by_id["d4"]["prev_id"] is None
    assert docs[0]["text"] not in by_id["d4"]["prompts"][0]


def test_chain_breaks_when_the_prompt_would_not_fit_the_context(smollm2_path, smollm2_tokenizer, tmp_path):
    docs = [_doc(0), _doc(1)]
    tok = smollm2_tokenizer
    zero_shot = len(tok(f"<s> <CON> {docs[1]['text']} </CON>\n\n", add_special_tokens=False)["input_ids"])
    # room for the zero-shot prompt + max_new_tokens, not for the chained one
    records, _ = _run(smollm2_path, tok, docs, tmp_path, max_model_len=max(64, zero_shot + 16 + 5), batch_size=1)
    assert records[1]["prev_id"] is None and docs[0]["text"] not in records[1]["prompts"][0]
    records, _ = _run(smollm2_path, tok, docs, tmp_path, max_model_len=4 * zero_shot + 16, batch_size=1)
    assert records[1]["prev_id"] == "d0"


def test_format_rebuilds_the_chains_of_a_two_round_synthesis(smollm2_path, smollm2_tokenizer, tmp_path):
    docs = [_doc(0), _doc(1), _doc(2), _doc(3)]
    records, _ = _run(smollm2_path, smollm2_tokenizer, docs, tmp_path)
    outputs, counts = format_documents(records, seed=0)
    texts = {r["id"]: r["text"] for r in outputs["train_ipt"]}
    assert set(texts) == {"d0+d2", "d1+d3"}
    for first, second in ((0, 2), (1, 3)):
        text = texts[f"d{first}+d{second}"]
        assert text.index(docs[first]["text"]) < text.index(docs[second]["text"])


def test_long_document_is_chunked_and_its_pairs_carry_the_chunk(smollm2_path, smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    long_text = "\n\n".join(f"Part{i} of the manual explains step {i} of the setup in a few words." for i in range(8))
    docs = [{"id": "long", "split": "train", "text": long_text}, _doc(1)]
    records, counts = _run(smollm2_path, tok, docs, tmp_path, chunking=True, max_context_tokens=40, rounds=1)
    rec = records[0]
    assert rec["text"] == long_text and rec["chunks"] == len(rec["raw_output"]) == len(rec["prompts"]) > 1
    assert [p["chunk"] for p in rec["pairs"]] == list(range(rec["chunks"]))
    assert all(len(tok(p, add_special_tokens=False)["input_ids"]) <= 40 + 12 for p in rec["prompts"])
    assert "".join(p.split("<CON> ")[1].split(" </CON>")[0] for p in rec["prompts"]).replace("\n", "") == \
        long_text.replace("\n", "")  # every chunk is shown, in order
    assert "chunks" not in records[1] and isinstance(records[1]["raw_output"], str)
    assert counts["chunked_documents"] == 1 and counts["prompts"] == rec["chunks"] + 1


def test_a_question_repeated_by_a_later_chunk_is_dropped(smollm2_path, smollm2_tokenizer, tmp_path):
    text = "\n\n".join("Same start here, then one more sentence about another part of it." for _ in range(6))
    records, counts = _run(smollm2_path, smollm2_tokenizer, [{"id": "rep", "split": "train", "text": text}], tmp_path,
                           chunking=True, max_context_tokens=20, rounds=1)
    assert len(records[0]["pairs"]) == 1 and records[0]["dropped"]["duplicate_question"] == records[0]["chunks"] - 1


def test_resume_from_the_journal_equals_an_uninterrupted_run(smollm2_path, smollm2_tokenizer, tmp_path):
    docs = [_doc(i) for i in range(8)]
    whole, _ = _run(smollm2_path, smollm2_tokenizer, docs, tmp_path / "a")
    journal = ShardJournal(tmp_path / "b" / ".partial.jsonl")
    with pytest.raises(RuntimeError, match="scripted crash"):  # crashes in round 1, after 3 of 4 batches
        synthesize_documents(_cfg(smollm2_path), docs, tmp_path / "b" / "pairs.jsonl", progress=False,
                             engine=ScriptedEngine(smollm2_tokenizer, fail_after=3), journal=journal)
    with open(journal.path, "ab") as f:
        f.write(b'{"batch": 3, "results": [{"id": "d')  # a line cut by the crash
    engine = ScriptedEngine(smollm2_tokenizer)
    out = tmp_path / "b" / "pairs.jsonl"
    counts = synthesize_documents(_cfg(smollm2_path), docs, out, progress=False, engine=engine, journal=journal)
    assert counts["resumed_prompts"] == 6 and len(engine.calls) == 1  # only the last batch is generated again
    assert [json.loads(line) for line in out.read_text().splitlines()] == whole


SHORT_TOPICS = ("lambda", "break", "lists", "imaginary", "shifting", "else", "if", "conversions")


@pytest.mark.e2e
def test_smollm2_two_shards_two_rounds_chain_pydoc_topics(smollm2_path, tmp_path):
    """Real SmolLM2-135M, the real stage functions: 8 short pydoc topics (JSONL corpus), 2 shards, M=2, merge.
    Some text is prompted after the previous round's text and its pairs and keeps pairs itself (prev_id)."""
    from pydoc_data.topics import topics

    from megatron_ipt.config import load_config
    from megatron_ipt.pipeline import run_corpus, run_synthesize_sharded

    corpus = tmp_path / "topics.jsonl"
    corpus.write_text("".join(json.dumps({"id": k, "text": topics[k]}) + "\n" for k in SHORT_TOPICS))
    cfg = load_config("examples/quickstart.yaml", [
        f"run_dir={tmp_path / 'run'}", "corpus.source=jsonl", f"corpus.paths=['{corpus}']", "corpus.heldout_fraction=0",
        "synthesis.rounds=2", "synthesis.max_new_tokens=40", "synthesis.batch_size=4", "synthesis.save_prompts=true",
        "synthesis.min_grounding=0", "synthesis.max_repetition=1"])
    run_corpus(cfg)
    for shard in (0, 1):
        run_synthesize_sharded(cfg, 2, shard)
    result = run_synthesize_sharded(cfg, 2, merge=True)
    records = [json.loads(line) for line in (result.path / "pairs.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == list(SHORT_TOPICS)
    print({r["id"]: (r["round"], r["prev_id"], len(r["pairs"])) for r in records})
    assert {r["round"] for r in records} == {0, 1}  # each shard's documents cut into 2 slices
    by_id = {r["id"]: r for r in records}
    chained = [r for r in records if r["prev_id"] is not None]
    assert chained, "no text was chained after the previous round's entry"
    for r in chained:
        prev = by_id[r["prev_id"]]
        assert prev["round"] == r["round"] - 1 and prev["pairs"] and r["pairs"]
        assert r["prompts"][0].index(prev["text"][:200]) < r["prompts"][0].index(r["text"][:200])
    assert result.manifest["counts"]["chained_documents"] == len(chained)
    outputs, _ = format_documents(records, seed=0)
    assert any(t["id"] == f"{r['prev_id']}+{r['id']}" for r in chained for t in outputs["train_ipt"])
