import pytest
from fixtures_synth import smollm2_path, smollm2_tokenizer  # noqa: F401 (fixtures)

from data_prep.parse import Pair, parse_pairs
from data_prep.prompts import (
    FEWSHOT_DEMONSTRATIONS,
    build_prompt,
    fewshot_prompt,
    lmops_prompt,
    render_pairs,
    truncate_to_tokens,
)


def test_lmops_prompt_is_the_released_synthesizer_format_byte_for_byte():
    assert lmops_prompt("Sets are unordered.") == "<s> <CON> Sets are unordered. </CON>\n\n"


def test_render_pairs_joins_pairs_with_blank_lines():
    pairs = [Pair("q1", "a1"), Pair("q2", "a2")]
    assert render_pairs(pairs) == "<QUE> q1 <ANS> a1 </END>\n\n<QUE> q2 <ANS> a2 </END>"


def test_rendered_pairs_parse_back_strictly():
    pairs = [Pair("What is a set?", "An unordered collection."), Pair("Can sets be sliced?", "No.")]
    assert parse_pairs(render_pairs(pairs), "strict").pairs == pairs


def test_lmops_prompt_ids_for_smollm2_have_no_added_or_doubled_bos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt = build_prompt("Sets are unordered.", "lmops", tok, max_context_tokens=512)
    ids = tok(prompt.text, add_special_tokens=prompt.add_special_tokens)["input_ids"]
    literal_bos = tok("<s>", add_special_tokens=False)["input_ids"]
    assert prompt.add_special_tokens is False
    assert ids[: len(literal_bos)] == literal_bos
    assert not set(ids) & set(tok.all_special_ids)


def test_fewshot_prompt_ends_with_the_document_and_a_prefilled_question_tag():
    prompt = fewshot_prompt("  The pass statement does nothing.\n")
    assert prompt.endswith("<CON> The pass statement does nothing. </CON>\n\n<QUE>")


def test_fewshot_demonstrations_have_two_pairs_each_that_parse_strictly():
    assert 2 <= len(FEWSHOT_DEMONSTRATIONS) <= 3
    for text, pairs in FEWSHOT_DEMONSTRATIONS:
        assert len(pairs) == 2
        assert parse_pairs(render_pairs(pairs), "strict").pairs == list(pairs)
        assert fewshot_prompt("doc").count(f"<CON> {text} </CON>") == 1


def test_fewshot_build_prompt_records_the_prefill(smollm2_tokenizer):
    prompt = build_prompt("The pass statement does nothing.", "fewshot", smollm2_tokenizer, 512)
    assert prompt.prefill == "<QUE>" and prompt.text.endswith(prompt.prefill)


def test_truncation_keeps_at_most_max_tokens_and_a_prefix_of_the_text(smollm2_tokenizer):
    from pydoc_data.topics import topics

    text = topics["assert"] * 4
    cut = truncate_to_tokens(text, smollm2_tokenizer, 50)
    assert len(smollm2_tokenizer(cut, add_special_tokens=False)["input_ids"]) <= 50
    assert text.startswith(cut) and len(cut) > 100


def test_truncation_leaves_a_short_text_unchanged(smollm2_tokenizer):
    assert truncate_to_tokens("short text", smollm2_tokenizer, 50) == "short text"


def test_build_prompt_truncates_the_document(smollm2_tokenizer):
    prompt = build_prompt("word " * 1000, "lmops", smollm2_tokenizer, max_context_tokens=16)
    assert prompt.text.startswith("<s> <CON> word") and prompt.text.count("word") <= 16


def test_lmops_prompt_token_ids_are_pinned_for_smollm2(smollm2_tokenizer):
    # SmolLM2's tokenizer has no '<s>' token: the literal is plain text (ids 44 99 46), as the released
    # synthesizer's prompt would be for this vocabulary; no BOS is added.
    prompt = build_prompt("Sets are unordered.", "lmops", smollm2_tokenizer, 512)
    assert prompt.text.encode() == b"<s> <CON> Sets are unordered. </CON>\n\n"
    ids = smollm2_tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens)["input_ids"]
    assert ids == [44, 99, 46, 2067, 10835, 46, 34987, 359, 551, 19590, 30, 22577, 10835, 46, 1116]


def test_chat_prompt_renders_smollm2_chatml_with_demonstrations_and_prefill(smollm2_tokenizer):
    prompt = build_prompt("The pass statement does nothing.", "chat", smollm2_tokenizer, 512, instruction="Write pairs.")
    assert prompt.prefill == "<QUE>" and prompt.add_special_tokens is False
    assert prompt.text.startswith("<|im_start|>system\nWrite pairs.<|im_end|>\n")
    assert prompt.text.endswith(
        "<|im_start|>user\n<CON> The pass statement does nothing. </CON><|im_end|>\n<|im_start|>assistant\n<QUE>"
    )
    assert prompt.text.count("<|im_start|>assistant\n<QUE> ") == len(FEWSHOT_DEMONSTRATIONS)
    ids = smollm2_tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
    assert ids.count(smollm2_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2 * len(FEWSHOT_DEMONSTRATIONS) + 3


def test_chat_prompt_needs_a_chat_template(smollm2_tokenizer, monkeypatch):
    monkeypatch.setattr(smollm2_tokenizer, "chat_template", None)
    with pytest.raises(ValueError, match="chat template"):
        build_prompt("doc", "chat", smollm2_tokenizer, 512)
