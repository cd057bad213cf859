"""Evaluation scoring on hand-computed examples, task files and their errors, results tables."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_ipt.cli import main
from megatron_ipt.evaluate import rc, scoring
from megatron_ipt.evaluate.run import markdown, write_results


def test_answer_logprob_on_known_logits():
    # vocabulary 3; position t's logits predict token t+1. Context [0], answer [1, 2].
    logits = torch.tensor([[0.0, math.log(3.0), 0.0],   # p(1) = 3/5
                           [0.0, 0.0, math.log(2.0)],   # p(2) = 2/4
                           [0.0, 0.0, 0.0]])
    lp, n = scoring.answer_logprob(logits, torch.tensor([0, 1, 2]), start=1)
    assert n == 2 and lp == pytest.approx(math.log(3 / 5) + math.log(2 / 4))
    assert scoring.mean_nll(lp, n) == pytest.approx(-(math.log(0.6) + math.log(0.5)) / 2)
    with pytest.raises(ValueError):
        scoring.answer_logprob(logits, torch.tensor([0, 1, 2]), start=3)


def test_option_choice_and_text_metrics():
    assert scoring.choose_option([2.0, 0.5, 0.5, 3.0]) == 1
    assert scoring.exact_match("The Answer!", "answer") == 1.0
    assert scoring.token_f1("a red fox", "the red dog") == pytest.approx(0.5)
    assert scoring.token_f1("", "x") == 0.0


def test_task_files_and_prompt_construction(tmp_path):
    f = tmp_path / "task.jsonl"
    f.write_text(json.dumps({"id": "d1", "text": "T1", "question": "Q1?", "answer": "A1"}) + "\n"
                 + json.dumps({"id": "d2", "text": "T2", "question": "Q2?", "answer": "B", "options": ["A", "B"]}) + "\n")
    docs = rc.load_heldout_pairs(f)
    ex = rc.build_examples(docs, shots=1)
    assert ex[0].prompt == "Question: Q2?\nAnswer: B\n\nT1\n\nQuestion: Q1?\nAnswer:"
    assert ex[1].options == ["A", "B"] and ex[1].prompt.startswith("Question: Q1?\nAnswer: A1\n\nT2")
    assert rc.build_examples(docs, shots=1) == ex  # deterministic


@pytest.mark.parametrize("content, message", [
    ('{"text": "t", "question": "q"}\n', r"task.jsonl:1: missing field\(s\) \['answer'\]"),
    ('{"text": "t", "question": "q", "answer": "a"}\nnot json\n', r"task.jsonl:2: not valid JSON"),
    ('{"id": "x", "split": "train", "text": "t", "pairs": [{"question": "q", "answer": "a"}]}\n',
     "no held-out document"),
])
def test_bad_task_files_name_the_file(tmp_path, content, message):
    (tmp_path / "task.jsonl").write_text(content)
    with pytest.raises(rc.EvalDataError, match=message):
        rc.load_heldout_pairs(tmp_path / "task.jsonl")


def test_results_files_and_compare(tmp_path, capsys):
    a = write_results(tmp_path / "a.json", {"name": "base"}, "rc_heldout_0shot", {"metrics": {"answer_nll": 3.0}, "n": 5}, {})
    write_results(tmp_path / "b.json", {"name": "cpt"}, "rc_heldout_0shot", {"metrics": {"answer_nll": 2.5}, "n": 5}, {})
    assert set(a) >= {"model", "task", "metrics", "n", "settings", "created"}
    assert main(["eval", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "| task | metric | base | cpt |" in out and "| rc_heldout_0shot | answer_nll | 3.0000 | 2.5000 |" in out
    (tmp_path / "c.json").write_text("{}")
    assert main(["eval", "compare", str(tmp_path / "c.json")]) == 2
    assert "not a results file" in capsys.readouterr().err
    assert markdown([a]).count("\n") == 4


def test_hf_folder_scorer_runs_the_task(tmp_path, tiny_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    from data_prep.encoders import load_encoder
    from megatron_ipt.evaluate.run import evaluate_rc
    from megatron_ipt.evaluate.scorers import HFScorer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    docs = [{"id": "a", "text": "The while loop repeats.", "pairs": [{"question": "What repeats?", "answer": "The loop",
                                                                       "options": ["The loop", "Nothing"]}]},
            {"id": "b", "text": "A class defines objects.", "pairs": [{"question": "What defines objects?", "answer": "A class"}]}]
    with HFScorer(tmp_path / "hf") as scorer:
        result = evaluate_rc(scorer, load_encoder(tiny_tokenizer_dir), docs, shots=1, max_length=64)
    assert result["n"] == 2 and result["n_multiple_choice"] == 1
    # an untrained model over 512 tokens: about log(512) nats per answer token
    assert abs(result["metrics"]["answer_nll"] - math.log(512)) < 1.0
    assert result["metrics"]["mc_accuracy"] in (0.0, 1.0)


@pytest.mark.parametrize("prediction, reference, em, f1", [
    ("  The Eiffel Tower. ", "eiffel tower", 1.0, 1.0),           # case, article, punctuation, spaces
    ("Paris, France", "Paris", 0.0, 2 * (1 / 2) * 1 / (1 / 2 + 1)),  # precision 1/2, recall 1 -> 2/3
    ("the cat sat on the mat", "a cat on a mat", 0.0, 2 * (3 / 4) * 1 / (3 / 4 + 1)),  # 3 common of 4 / 3
    ("x x y", "x y y", 0.0, 2 / 3),                                 # counts clip: common {x: 1, y: 1}
    ("An apple", "the", 0.0, 0.0),                                   # reference empty after normalisation
])
def test_exact_match_and_token_f1_on_hand_computed_examples(prediction, reference, em, f1):
    assert scoring.exact_match(prediction, reference) == em
    assert scoring.token_f1(prediction, reference) == pytest.approx(f1)


def test_greedy_generation_stops_at_the_stop_token_and_takes_the_first_line():
    from megatron_ipt.evaluate.generate import answer_text, greedy_generate

    def next_is_plus_one(ids):  # logits whose argmax at each position is (token + 1) mod 5
        return torch.nn.functional.one_hot((torch.tensor(ids) + 1) % 5, 5).float()

    assert greedy_generate(next_is_plus_one, [1], max_new_tokens=10, stop_id=4) == [2, 3]
    assert greedy_generate(next_is_plus_one, [1], max_new_tokens=2) == [2, 3]
    assert answer_text(" The loop\n\nQuestion: x") == "The loop"


def tiny_hf_model(folder, vocab=512):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_free_form_answers_by_hf_generate_match_the_greedy_loop(tmp_path, tiny_tokenizer_dir, capsys):
    from data_prep.encoders import load_encoder
    from megatron_ipt.evaluate.generate import greedy_generate
    from megatron_ipt.evaluate.run import evaluate_rc
    from megatron_ipt.evaluate.scorers import HFScorer

    encoder = load_encoder(tiny_tokenizer_dir)
    docs = [{"id": "a", "text": "The while loop repeats.", "pairs": [{"question": "What repeats?", "answer": "The loop"}]},
            {"id": "b", "text": "A class defines objects.", "pairs": [{"question": "What defines?", "answer": "A class"}]}]
    with HFScorer(tiny_hf_model(tmp_path / "hf")) as scorer:
        prompt = encoder.encode_batch(["The while loop repeats.\n\nQuestion: What repeats?\nAnswer:"])[0]
        assert scorer.generate(prompt, 8, encoder.eod_id) == greedy_generate(scorer.logits, prompt, 8, encoder.eod_id)
        result = evaluate_rc(scorer, encoder, docs, shots=0, max_length=64, max_new_tokens=8)
    assert len(result["generations"]) == result["n"] == 2
    for g in result["generations"]:
        assert g["exact_match"] == scoring.exact_match(g["prediction"], g["reference"])
        assert g["f1"] == pytest.approx(scoring.token_f1(g["prediction"], g["reference"]))
    assert result["metrics"]["exact_match"] == pytest.approx(sum(g["exact_match"] for g in result["generations"]) / 2)
    assert 0.0 <= result["metrics"]["f1"] <= 1.0
    err = capsys.readouterr().err  # progress on stderr (not a terminal here: plain lines), results stay on stdout
    assert "eval: scoring: 2/2 sequences (100%)" in err and "eval: generating: 2/2 answers (100%)" in err


@pytest.mark.parametrize("record, message", [
    ({"model": {"name": "m"}, "task": "t", "metrics": {}, "n": 3}, "metrics: "),
    ({"model": {"name": "m"}, "task": "t", "metrics": {"acc": 0.5}, "n": 0}, "n: "),
    ({"model": {}, "task": "t", "metrics": {"acc": 0.5}, "n": 3}, "model.name: "),
    ({"model": {"name": "m"}, "task": "t", "metrics": {"acc": "high"}, "n": 3}, "metrics.acc: "),
    ({"model": {"name": "m"}, "task": "t", "metrics": {"nll": float("nan")}, "n": 3}, "not finite"),
])
def test_results_records_are_validated_on_write_and_on_compare(tmp_path, capsys, record, message):
    from megatron_ipt.evaluate.schema import ResultsFileError, read_results

    with pytest.raises(ResultsFileError, match=f"{tmp_path / 'r.json'}: not a results file .*{message}"):
        write_results(tmp_path / "r.json", record["model"], record["task"],
                      {"metrics": record["metrics"], "n": record["n"]}, {})
    assert not (tmp_path / "r.json").exists()
    (tmp_path / "r.json").write_text(json.dumps(record))
    with pytest.raises(ResultsFileError, match=message):
        read_results(tmp_path / "r.json")
    assert main(["eval", "compare", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(tmp_path / "r.json") in err and len(err.splitlines()) == 1


def test_an_empty_evaluation_file_names_the_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(rc.EvalDataError, match=f"{tmp_path / 'empty.jsonl'}: no held-out document"):
        rc.load_heldout_pairs(tmp_path / "empty.jsonl")


def test_compare_puts_one_model_in_one_column_across_tasks():
    def rec(name, task, metrics, n):
        return {"model": {"name": name}, "task": task, "metrics": metrics, "n": n}

    table = markdown([rec("base", "rc", {"answer_nll": 3.0}, 5), rec("cpt", "rc", {"answer_nll": 2.0}, 5),
                      rec("cpt", "heldout_perplexity", {"raw_nll": 1.5}, 7), rec("cpt", "rc", {"answer_nll": 2.5}, 5)])
    assert table.splitlines() == [
        "| task | metric | base | cpt | cpt (2) |", "| --- | --- | --- | --- | --- |",
        "| rc | answer_nll | 3.0000 | 2.0000 | 2.5000 |", "| rc | examples | 5 | 5 | 5 |",
        "| heldout_perplexity | raw_nll |  | 1.5000 |  |", "| heldout_perplexity | windows scored |  | 7 |  |"]
