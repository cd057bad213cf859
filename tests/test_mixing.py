import json

import pytest

from data_prep.errors import DataPrepError
from data_prep.format import format_documents
from data_prep.instructions import InstructionFields, read_instructions, render_instruction
from data_prep.mixing import select_general, token_counter


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_question_response_records_render_as_question_space_response():
    assert render_instruction({"question": " What is 2+2? ", "response": "4."}) == "What is 2+2? 4."


def test_conversations_render_their_turns_without_system_turns():
    rec = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
                             {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Bye?"},
                             {"from": "gpt", "value": "Bye."}]}
    assert render_instruction(rec) == "Hi? Hello. Bye? Bye."


def test_field_mapping_reads_other_instruction_sets(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Name a colour.", "output": "Blue."}, {"other": 1}])
    out = read_instructions(path, InstructionFields(question="instruction", response="output"))
    assert [r["text"] for r in out] == ["Name a colour. Blue."]
    with pytest.raises(DataPrepError, match="no instruction found"):
        read_instructions(path)


def test_the_demo_general_set_reads():
    out = read_instructions("examples/data/general_instructions.jsonl")
    assert len(out) >= 30 and all(" " in r["text"] for r in out)


def test_achieved_token_ratio_is_within_one_percent_of_the_target(tiny_tokenizer_dir):
    count = token_counter(tiny_tokenizer_dir)
    domain = [{"id": f"d{i}", "split": "train", "text": f"Section {i}. The parser reads {i} tokens and returns pairs.",
               "pairs": [{"question": f"How many tokens does section {i} read?", "answer": f"It reads {i} tokens."}]}
              for i in range(2000)]
    general = [{"id": f"g{i}", "text": f"Question {i}: what is {i} plus {i}? Answer: {2 * i}." + " more" * (i % 7)}
               for i in range(6000)]
    for ratio in (1.0, 0.5):
        out, counts = format_documents(domain, seed=0, general=general, general_ratio=ratio, count_tokens=count)
        mix = counts["mixing"]
        domain_tokens = counts["tokens"]["train_ipt_domain"]
        general_out = [r for r in out["train_ipt"] if r["id"].startswith("g")]
        assert sum(count([r["text"] for r in general_out])) == mix["general_tokens"]
        assert abs(mix["general_tokens"] / domain_tokens - ratio) / ratio < 0.01
        assert mix["achieved_ratio"] == pytest.approx(mix["general_tokens"] / domain_tokens, abs=1e-4)
        assert counts["tokens"]["train_ipt"] == domain_tokens + mix["general_tokens"]


def test_a_small_pool_is_reported_when_it_cannot_reach_the_target():
    pool = [{"id": "g1", "text": "x"}, {"id": "g2", "text": "y"}]
    chosen, stats = select_general(pool, [10, 10], domain_tokens=1000, ratio=1.0, seed=0)
    assert len(chosen) == 2 and not stats["target_reached"] and stats["achieved_ratio"] == 0.02
    chosen, stats = select_general(pool, [10, 10], domain_tokens=100, ratio=1.0, seed=0, max_passes=10)
    assert stats["general_tokens"] == 100 and stats["general_passes"] == 5 and len({r["id"] for r in chosen}) == 10


def test_mixing_without_a_tokenizer_is_an_error():
    with pytest.raises(DataPrepError, match="tokenizer"):
        format_documents([{"id": "a", "split": "train", "text": "t", "pairs": []}], general=[{"id": "g", "text": "x"}])


def test_the_general_instructions_are_also_written_alone_for_the_vanilla_arm(tiny_tokenizer_dir):
    """``train_general`` holds exactly the general texts mixed into ``train_ipt`` (the paper's Vanilla PT arm
    blends them with raw text), and is absent without general instructions."""
    count = token_counter(tiny_tokenizer_dir)
    domain = [{"id": f"d{i}", "split": "train", "text": f"Section {i} of the manual.",
               "pairs": [{"question": f"What is section {i}?", "answer": f"Section {i} is a part."}]} for i in range(50)]
    general = [{"id": f"g{i}", "text": f"Question {i}? Answer {i}."} for i in range(400)]
    out, counts = format_documents(domain, seed=0, general=general, general_ratio=0.5, count_tokens=count)
    mixed = [r for r in out["train_ipt"] if r["id"].startswith("g")]
    assert mixed and out["train_general"] == mixed
    assert counts["tokens"]["train_general"] == counts["mixing"]["general_tokens"] == sum(count([r["text"] for r in mixed]))
    out, _ = format_documents(domain, seed=0, count_tokens=count)
    assert "train_general" not in out
