import re
from collections import Counter

import pytest

from data_prep import templates as T
from data_prep.format import (FormatOptions, _qa, build_chains, format_documents, parse_item, render_answer,
                              render_chain, render_question)

RECORDS = [
    {"id": "a", "split": "train", "text": "Doc A text.", "pairs": [{"question": "What is A?", "answer": "A letter."}]},
    {"id": "b", "split": "train", "text": "Doc B text.", "pairs": []},
    {"id": "c", "split": "heldout", "text": "Doc C text.", "pairs": [{"question": "Q c?", "answer": "Ans c."}]},
    {"id": "d", "split": "heldout", "text": "Doc D text.", "pairs": []},
]
PLAIN = {"question": "What does the parser return?", "answer": "A list of pairs."}
OPTIONS = {"question": "Which keyword starts a loop?\nOptions:\n- while\n- class\n- import", "answer": "while"}
COT = {"question": "Is 7 prime? Let's think step by step.", "answer": "7 has no divisor but 1 and 7.\nTherefore, the answer is yes"}
OPTIONS_COT = {"question": "Which is larger?\nOptions:\n- 3\n- 9\nLet's think step by step.",
               "answer": "9 is three times 3.\nTherefore, the answer is 9"}
CLASSIC_ONLY = FormatOptions(mode_weights={"classic": 1.0}, dialog_share_few_pairs=0.0, inversion=0.0, read_wrapper=0.0,
                             lead_in=0.0)


def docs(n, pairs=(PLAIN,), split="train", prefix="d"):
    return [{"id": f"{prefix}{i}", "split": split, "text": f"Document number {i} about parsing.", "pairs": list(pairs)}
            for i in range(n)]


def test_augmented_text_starts_with_document_and_contains_pairs():
    out, counts = format_documents(RECORDS, seed=0, options=CLASSIC_ONLY)
    text = out["train_ipt"][0]["text"]
    assert text.startswith("Doc A text.")
    assert "What is A?" in text and text.endswith("A letter.")
    assert counts["augmented_chains"] == 1


def test_document_without_pairs_stays_plain_text():
    out, counts = format_documents(RECORDS)
    assert out["train_ipt"][1] == {"id": "b", "text": "Doc B text."}
    assert counts["plain_chains_without_pairs"] == 1


def test_heldout_documents_go_to_raw_and_pairs_sets():
    out, _ = format_documents(RECORDS)
    assert [r["id"] for r in out["heldout_raw"]] == ["c", "d"]
    assert [r["id"] for r in out["heldout_pairs"]] == ["c"]
    assert "Doc C" not in out["heldout_pairs"][0]["text"] and "Ans c." in out["heldout_pairs"][0]["text"]
    assert [r["id"] for r in out["train_raw"]] == ["a", "b"]


def test_output_is_identical_whatever_the_number_of_workers():
    many = docs(300, pairs=(PLAIN, OPTIONS, COT)) + docs(20, split="heldout", prefix="h")
    one, c1 = format_documents(many, seed=3, options=FormatOptions(group_consecutive=2), workers=1)
    two, c2 = format_documents(many, seed=3, options=FormatOptions(group_consecutive=2), workers=2)
    assert one == two and c1 == c2
    other, _ = format_documents(many, seed=4, options=FormatOptions(group_consecutive=2))
    assert other != one


def test_a_chain_renders_the_same_in_any_shard():
    many = docs(100, pairs=(PLAIN, OPTIONS))
    whole, _ = format_documents(many, seed=1)
    half, _ = format_documents(many[50:], seed=1)
    assert whole["train_ipt"][50:] == half["train_ipt"]


@pytest.mark.parametrize("mode", T.MODES)
@pytest.mark.parametrize("inverted", [False, True])
def test_every_mode_renders_every_family_without_leftover_placeholders(mode, inverted):
    opts = FormatOptions(mode_weights={mode: 1.0}, inversion=1.0 if inverted else 0.0)
    many = docs(40, pairs=(PLAIN, OPTIONS, COT, OPTIONS_COT))
    out, counts = format_documents(many, seed=0, options=opts)
    assert set(counts["modes"]) == {mode + ("+inverted" if inverted and mode in ("classic", "numbered") else "")}
    for rec in out["train_ipt"]:
        text = rec["text"]
        assert not re.search(r"\{\w*\}", text), text
        for needle in ("Document number", "What does the parser return?", "A list of pairs.", "Which keyword starts a loop?",
                       "while", "Is 7 prime?", "7 has no divisor", "9 is three times 3."):
            assert needle in text, (needle, text)
        assert "<s>" not in text and "</s>" not in text


def test_chain_documents_share_one_template_set():
    chain = docs(3, pairs=(PLAIN, COT))
    for seed in range(20):
        r = render_chain(chain, seed, CLASSIC_ONLY)
        ts = r["template"]
        assert r["text"].count(ts.chain_sep) >= 2
        for d in chain:  # every document's pairs rendered with the chain's one pattern
            for item in (parse_item(PLAIN)[0],):
                q, order = render_question(item, ts, None)
                assert _qa(q, render_answer(item, ts, order), ts) in r["text"]
            cot = parse_item(COT)[0]
            assert f"{cot.stem}{ts.cot_trigger}" in r["text"] and f"{ts.cot_final_lead}{cot.answer}" in r["text"]
            assert d["text"] in r["text"]


def test_consecutive_documents_group_into_chains_of_m():
    out, counts = format_documents(docs(10), options=FormatOptions(group_consecutive=3))
    assert [r["id"] for r in out["train_ipt"]] == ["d0+d1+d2", "d3+d4+d5", "d6+d7+d8", "d9"]
    assert counts["chain_lengths"] == {"1": 1, "3": 3}
    assert len(out["train_raw"]) == 10


def test_chains_are_rebuilt_from_prev_id_links():
    recs = [{"id": "x2", "prev_id": "x1"}, {"id": "y1", "prev_id": None}, {"id": "x1"}, {"id": "x3", "prev_id": "x2"},
            {"id": "z1", "prev_id": "heldout-doc"}]
    chains = build_chains(recs)
    assert [[r["id"] for r in c] for c in chains] == [["y1"], ["x1", "x2", "x3"], ["z1"]]


def test_dropped_options_and_chain_of_thought_answers_are_counted():
    bad_options = {"question": "Pick one\nOptions:\n- red\n- blue", "answer": "green"}
    bad_cot = {"question": "Why? Let's think step by step.", "answer": "Because it is so."}
    out, counts = format_documents(docs(2, pairs=(PLAIN, bad_options, bad_cot)) + docs(1, pairs=(bad_cot,), prefix="e"))
    assert counts["dropped"] == {"cot_without_final_answer": 3, "options_answer_matches_no_option": 2}
    assert counts["families"] == {"plain": 2}
    assert out["train_ipt"][-1]["text"] == "Document number 0 about parsing."  # no pair left: plain text
    assert "green" not in out["train_ipt"][0]["text"]


def test_pairs_are_sorted_into_families_by_the_synthesizer_conventions():
    assert [parse_item(p)[0].family for p in (PLAIN, OPTIONS, COT, OPTIONS_COT)] == ["plain", "options", "cot", "options_cot"]
    item = parse_item(OPTIONS)[0]
    assert item.options == ("while", "class", "import") and item.correct == 0
    assert parse_item(COT)[0].answer == "yes" and parse_item(COT)[0].reasoning == "7 has no divisor but 1 and 7."


def test_option_order_and_markers_are_randomised_and_the_answer_follows():
    positions, markers = Counter(), Counter()
    for seed in range(200):
        r = render_chain(docs(1, pairs=(OPTIONS,)), seed, CLASSIC_ONLY)
        ts = r["template"]
        first_option = min(("while", "class", "import"), key=lambda o: r["text"].index(o, r["text"].index("Which keyword")))
        positions[first_option] += 1
        markers[ts.option_markers[0]] += 1
    assert len(positions) == 3 and min(positions.values()) > 30
    assert len(markers) >= 8


def test_mode_mix_follows_the_paper_defaults():
    _, counts = format_documents(docs(4000, pairs=(PLAIN, PLAIN)))
    modes = Counter()
    for k, v in counts["modes"].items():
        modes[k.split("+")[0]] += v
    assert 0.77 < modes["classic"] / 4000 < 0.83
    for m in ("dialog", "numbered", "fewshot", "next_turn"):
        assert 0.03 < modes[m] / 4000 < 0.07
    inverted = sum(v for k, v in counts["modes"].items() if k.endswith("+inverted"))
    assert 0.03 < inverted / (modes["classic"] + modes["numbered"]) < 0.07
    _, single = format_documents(docs(2000))
    assert set(single["modes"]) <= {"classic", "classic+inverted", "dialog"}
    assert 0.03 < single["modes"]["dialog"] / 2000 < 0.07


def test_no_single_pair_rendering_dominates():
    out, _ = format_documents(docs(1000), options=FormatOptions(mode_weights={"classic": 1.0}, dialog_share_few_pairs=0.0))
    answers = Counter(re.search(r"([^\n]*)A list of pairs\.", r["text"]).group(1) for r in out["train_ipt"])
    assert len(answers) > 15 and answers.most_common(1)[0][1] < 0.2 * 1000


def test_bank_has_dozens_of_variants_per_family_and_mode():
    counts = T.variant_counts()
    assert all(counts[f"family.{f}"] >= 24 for f in T.FAMILIES)
    assert all(counts[f"mode.{m}"] >= 24 for m in T.MODES)


def test_raw_replay_adds_a_share_of_chains_as_plain_text():
    out, counts = format_documents(docs(1000), options=FormatOptions(raw_replay=0.2))
    replay = [r for r in out["train_ipt"] if r["id"].startswith("replay:")]
    assert 150 < len(replay) < 250 and counts["raw_replay_texts"] == len(replay)
    assert replay[0]["text"].startswith("Document number")
