from data_prep.format import format_documents

RECORDS = [
    {"id": "a", "split": "train", "text": "Doc A text.", "pairs": [{"question": "What is A?", "answer": "A letter."}]},
    {"id": "b", "split": "train", "text": "Doc B text.", "pairs": []},
    {"id": "c", "split": "heldout", "text": "Doc C text.", "pairs": [{"question": "Q c?", "answer": "Ans c."}]},
    {"id": "d", "split": "heldout", "text": "Doc D text.", "pairs": []},
]


def test_augmented_text_starts_with_document_and_contains_pairs():
    out, counts = format_documents(RECORDS, seed=0)
    text = out["train_ipt"][0]["text"]
    assert text.startswith("Doc A text.\n\n")
    assert "What is A?" in text and text.endswith("A letter.")
    assert counts["augmented_documents"] == 1


def test_document_without_pairs_stays_plain_text():
    out, counts = format_documents(RECORDS)
    assert out["train_ipt"][1] == {"id": "b", "text": "Doc B text."}
    assert counts["plain_documents_without_pairs"] == 1


def test_heldout_documents_go_to_raw_and_pairs_sets():
    out, _ = format_documents(RECORDS)
    assert [r["id"] for r in out["heldout_raw"]] == ["c", "d"]
    assert [r["id"] for r in out["heldout_pairs"]] == ["c"]
    assert "Doc C" not in out["heldout_pairs"][0]["text"] and "Ans c." in out["heldout_pairs"][0]["text"]
    assert [r["id"] for r in out["train_raw"]] == ["a", "b"]


def test_formatting_is_deterministic_per_seed():
    many = [{"id": str(i), "split": "train", "text": f"T{i}", "pairs": [{"question": "q", "answer": "a"}]} for i in range(40)]
    a, _ = format_documents(many, seed=0)
    b, _ = format_documents(many, seed=0)
    c, _ = format_documents(many, seed=1)
    assert a == b
    assert a != c


def test_templates_vary_across_documents():
    many = [{"id": str(i), "split": "train", "text": f"T{i}", "pairs": [{"question": "q", "answer": "a"}]} for i in range(60)]
    _, counts = format_documents(many)
    assert len(counts["patterns"]) >= 4
