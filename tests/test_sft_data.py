"""SFT data: conversations -> token ids + loss mask (data_prep.sft), checked by decoding the masked spans."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_prep.errors import DataPrepError
from data_prep.sft import MASK_SUFFIX, SFTFields, SFTOptions, conversation, render_plain, tokenize_conversations

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "What is a list?"},
                  {"role": "assistant", "content": "A mutable sequence of items."}]},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Name a loop."},
                  {"role": "assistant", "content": "The for loop."},
                  {"role": "user", "content": "And another?"},
                  {"role": "assistant", "content": "The while loop, which repeats while a condition holds."}]},
    {"question": "What does def define?", "response": "A function."},
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "Hello there."}]},
]


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tiny_tokenizer_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    tok.chat_template = CHATML
    out = tmp_path_factory.mktemp("chat_tokenizer")
    tok.save_pretrained(out)
    return out


def _write(path, records, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(extra_lines))
    return path


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens, mask = IndexedDataset(str(prefix)), IndexedDataset(f"{prefix}{MASK_SUFFIX}")
    assert len(tokens) == len(mask)
    assert np.array_equal(tokens.sequence_lengths, mask.sequence_lengths)
    assert np.array_equal(tokens.document_indices, mask.document_indices)
    return [(np.array(tokens[i]), np.array(mask[i])) for i in range(len(tokens))]


def _runs(ids, mask):
    """Contiguous runs of masked (target) token ids."""
    runs, current = [], []
    for t, m in zip(ids, mask):
        if m:
            current.append(int(t))
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def test_chat_mask_covers_exactly_the_assistant_turns(tmp_path, chat_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir))
    src = _write(tmp_path / "conv.jsonl", CONVERSATIONS[:2] + [CONVERSATIONS[3]])
    fields = SFTFields()
    m = tokenize_conversations([src], tmp_path / "sft", chat_tokenizer_dir, SFTOptions(template="chat"), log=lambda *_: None)
    docs = _read(tmp_path / "sft")
    assert m["conversations"] == 3 and len(docs) == 3
    records = CONVERSATIONS[:2] + [CONVERSATIONS[3]]
    for record, (ids, mask) in zip(records, docs):
        messages = conversation(record, fields)
        replies = [x["content"] for x in messages if x["role"] == "assistant"]
        # Each masked run decodes to one reply plus the template's end-of-turn marker, nothing else.
        assert [tok.decode(r) for r in _runs(ids, mask)] == [f"{r}<|im_end|>\n" for r in replies]
        # The whole document is the template's render followed by EOD (not a target).
        assert tok.decode(ids[:-1].tolist()) == tok.apply_chat_template(messages, tokenize=False)
        assert ids[-1] == tok.eos_token_id and mask[-1] == 0
    assert m["target_tokens"] == int(sum(mask.sum() for _, mask in docs))


def test_plain_template_masks_responses_and_the_stop_token(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    src = _write(tmp_path / "qa.jsonl", [CONVERSATIONS[2], CONVERSATIONS[1]])
    tokenize_conversations([src], tmp_path / "sft", tiny_tokenizer_dir, SFTOptions(template="plain"), log=lambda *_: None)
    (ids0, mask0), (ids1, mask1) = _read(tmp_path / "sft")
    assert tok.decode(ids0.tolist()) == "What does def define? A function.<|endoftext|>"
    assert [tok.decode(r) for r in _runs(ids0, mask0)] == ["A function.<|endoftext|>"]
    assert [tok.decode(r) for r in _runs(ids1, mask1)] == [
        "The for loop.", "The while loop, which repeats while a condition holds.<|endoftext|>"]
    assert render_plain(conversation(CONVERSATIONS[1]))[0] == ("Be brief.", False)


def test_deterministic_atomic_and_resumed(tmp_path, tiny_tokenizer_dir):
    src = _write(tmp_path / "qa.jsonl", CONVERSATIONS)
    opts = SFTOptions(template="plain")
    quiet = lambda *_: None  # noqa: E731
    first = tokenize_conversations([src], tmp_path / "a" / "sft", tiny_tokenizer_dir, opts, log=quiet)
    tokenize_conversations([src], tmp_path / "b" / "sft", tiny_tokenizer_dir, opts, log=quiet)
    for name in ("sft.bin", "sft.idx", f"sft{MASK_SUFFIX}.bin", f"sft{MASK_SUFFIX}.idx"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not list((tmp_path / "a").glob("*.tmp"))
    said = []
    again = tokenize_conversations([src], tmp_path / "a" / "sft", tiny_tokenizer_dir, opts, log=said.append)
    assert again == first and "up to date" in said[0]


def test_a_crash_in_the_third_input_resumes_from_it_and_gives_the_uninterrupted_bytes(tmp_path, tiny_tokenizer_dir):
    inputs = [_write(tmp_path / f"part{i}.jsonl", CONVERSATIONS[i:] + CONVERSATIONS[:i]) for i in range(3)]
    good = inputs[2].read_text()
    inputs[2].write_text(good + "not json\n" + good)  # fails partway through the third file
    quiet = lambda *_: None  # noqa: E731
    with pytest.raises(DataPrepError, match=r"part2\.jsonl:5: not a JSON object"):
        tokenize_conversations(inputs, tmp_path / "run" / "sft", tiny_tokenizer_dir,
                               SFTOptions(template="plain", bad_input="fail"), log=quiet)
    shards = tmp_path / "run" / "sft.shards"
    done = sorted(shards.glob("*.done.json"))
    assert [d.name.split("-")[0] for d in done] == ["part0", "part1"]  # the first two finished, nothing else
    assert not (tmp_path / "run" / "sft.bin").exists() and not (tmp_path / "run" / "sft.manifest.json").exists()
    assert not list(shards.glob("*.tmp"))
    stamps = {d: d.stat().st_mtime_ns for d in done}
    inputs[2].write_text(good + good)  # fixed
    said = []
    m = tokenize_conversations(inputs, tmp_path / "run" / "sft", tiny_tokenizer_dir, SFTOptions(template="plain"),
                               log=said.append)
    assert said[0] == f"sft data: resuming: 2 of 3 input files already tokenized (under {shards})"
    assert {d: d.stat().st_mtime_ns for d in done} == stamps  # not tokenized again
    assert m["shards_resumed"] == 2 and m["conversations"] == 4 * 4
    whole = tokenize_conversations(inputs, tmp_path / "whole" / "sft", tiny_tokenizer_dir,
                                   SFTOptions(template="plain"), log=quiet)
    for name in ("sft.bin", "sft.idx", f"sft{MASK_SUFFIX}.bin", f"sft{MASK_SUFFIX}.idx"):
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert whole["shards_resumed"] == 0 and whole["target_tokens"] == m["target_tokens"]
    assert [s["sha256"] for s in whole["sources"]] == [s["sha256"] for s in m["sources"]]
    _read(tmp_path / "run" / "sft")  # megatron-core reads both, same boundaries


def test_a_changed_sft_dataset_is_refused_before_training_and_rewritten_on_rerun(tmp_path, tiny_tokenizer_dir):
    from megatron_ipt.training.data import DataError
    from megatron_ipt.training.sft_data import check_sft_files

    src = _write(tmp_path / "qa.jsonl", CONVERSATIONS)
    opts = SFTOptions(template="plain")
    first = tokenize_conversations([src], tmp_path / "sft", tiny_tokenizer_dir, opts, log=lambda *_: None)
    check_sft_files(tmp_path / "sft", "sft.data")
    mask_bin = tmp_path / f"sft{MASK_SUFFIX}.bin"
    data = bytearray(mask_bin.read_bytes())
    data[3] ^= 1  # same size, one target flag flipped: only the recorded digest sees it
    mask_bin.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"^sft.data: {tmp_path}/sft{MASK_SUFFIX}.bin: sampled BLAKE2b \w+, "
                                        rf"{tmp_path}/sft.manifest.json records"):
        check_sft_files(tmp_path / "sft", "sft.data")
    said = []
    tokenize_conversations([src], tmp_path / "sft", tiny_tokenizer_dir, opts, log=said.append)
    assert not any("up to date" in s for s in said)
    check_sft_files(tmp_path / "sft", "sft.data")
    assert (tmp_path / f"sft{MASK_SUFFIX}.bin").read_bytes() != bytes(data) and first["files"]


def test_bad_records_are_counted_or_fatal_with_file_and_line(tmp_path, tiny_tokenizer_dir):
    src = _write(tmp_path / "qa.jsonl", [CONVERSATIONS[2]], ["not json\n", "\n", json.dumps({"question": "q"}) + "\n",
                                                            json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n"])
    m = tokenize_conversations([src], tmp_path / "sft", tiny_tokenizer_dir, SFTOptions(template="plain"),
                               log=lambda *_: None)
    assert m["conversations"] == 1
    assert m["skipped"] == {"malformed_json": 1, "no_conversation": 1, "no_assistant": 1}
    with pytest.raises(DataPrepError, match=r"qa\.jsonl:2: not a JSON object"):
        tokenize_conversations([src], tmp_path / "sft2", tiny_tokenizer_dir,
                               SFTOptions(template="plain", bad_input="fail"), log=lambda *_: None)
    with pytest.raises(DataPrepError, match="no chat template"):
        tokenize_conversations([src], tmp_path / "sft3", tiny_tokenizer_dir, SFTOptions(template="chat"))


def test_the_standalone_command_writes_the_same_bytes(tmp_path, tiny_tokenizer_dir, capsys):
    from data_prep.sft import main

    src = _write(tmp_path / "qa.jsonl", CONVERSATIONS)
    assert main(["--input", str(src), "--tokenizer", str(tiny_tokenizer_dir), "--output-prefix", str(tmp_path / "cli"),
                 "--template", "plain"]) == 0
    tokenize_conversations([src], tmp_path / "api", tiny_tokenizer_dir, SFTOptions(template="plain"), log=lambda *_: None)
    for suffix in (".bin", ".idx", f"{MASK_SUFFIX}.bin", f"{MASK_SUFFIX}.idx"):
        assert (tmp_path / f"cli{suffix}").read_bytes() == (tmp_path / f"api{suffix}").read_bytes()
    assert main(["--input", str(tmp_path / "none.jsonl"), "--tokenizer", str(tiny_tokenizer_dir),
                 "--output-prefix", str(tmp_path / "x")]) == 2
    assert "none.jsonl" in capsys.readouterr().err


def test_the_sft_stage_data_drops_a_valid_set_no_longer_configured_with_its_shards(tmp_path, tiny_tokenizer_dir):
    from megatron_ipt.config import load_config
    from megatron_ipt.pipeline import sft_data

    src = _write(tmp_path / "qa.jsonl", CONVERSATIONS)
    sets = [f"run_dir={tmp_path}/run", f"sft.data=[{src}]", f"sft.tokenizer={tiny_tokenizer_dir}", "sft.template=plain"]
    out, manifests = sft_data(load_config(None, sets + [f"sft.valid_data=[{src}]"]))
    assert set(manifests) == {"train", "valid"} and (out / "valid.shards").is_dir()
    out, manifests = sft_data(load_config(None, sets))
    assert set(manifests) == {"train"} and not list(out.glob("valid*"))
    assert sorted(p.name for p in out.iterdir()) == ["train.bin", "train.idx", "train.manifest.json", "train.shards",
                                                     f"train{MASK_SUFFIX}.bin", f"train{MASK_SUFFIX}.idx"]


def test_a_second_writer_of_the_same_sft_prefix_fails_at_once_naming_the_lock(tmp_path, tiny_tokenizer_dir):
    from data_prep.locks import LockHeld, exclusive_lock

    src = _write(tmp_path / "qa.jsonl", CONVERSATIONS)
    with exclusive_lock(tmp_path / "sft.lock", "held by this test"):
        with pytest.raises(LockHeld, match=rf"sft data prefix {tmp_path}/sft is in use by another run .*sft\.lock"):
            tokenize_conversations([src], tmp_path / "sft", tiny_tokenizer_dir, SFTOptions(template="plain"),
                                   log=lambda *_: None)
    assert not list(tmp_path.glob("sft.*"))  # nothing written
