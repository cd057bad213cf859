"""``ipt sft`` training side: masked loss through the trainer, exact resume, packed samples isolated per conversation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from train_fixtures import EOD, VOCAB, tiny_config

from data_prep.indexed import IndexedDatasetWriter
from megatron_ipt.training import cpu_backend, data, parallel, train
from megatron_ipt.training.presets import resolve_preset
from megatron_ipt.training.sft import sft_stage, sft_train_config
from megatron_ipt.training.sft_data import MASK_SUFFIX, SFTDataset, pack


def _conversations(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A prompt of random ids, then a reply counting up from the prompt's last id (learnable) and EOD (targets)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = rng.integers(10, 200, size=int(rng.integers(3, 12)))
        reply = (prompt[-1] + np.arange(1, int(rng.integers(4, 14)))) % (VOCAB - 1) + 1
        ids = np.concatenate([prompt, reply, [EOD]]).astype(np.uint16)
        mask = np.concatenate([np.zeros(len(prompt)), np.ones(len(reply) + 1)]).astype(np.uint8)
        out.append((ids, mask))
    return out


def write_sft(prefix: Path, conversations) -> None:
    """``prefix`` / ``prefix_mask`` and ``prefix.manifest.json`` as data_prep.sft writes them."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tokens, mask = IndexedDatasetWriter(prefix, np.uint16), IndexedDatasetWriter(f"{prefix}{MASK_SUFFIX}", np.uint8)
    for ids, m in conversations:
        tokens.add_documents(ids, np.array([len(ids)]))
        mask.add_documents(m, np.array([len(m)]))
    tokens.finalize()
    mask.finalize()
    Path(f"{prefix}.manifest.json").write_text(json.dumps(
        {"conversations": len(conversations), "tokenizer": {"path": "synthetic", "vocab_size": VOCAB, "eod_id": EOD}}))


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft_data")
    write_sft(root / "train", _conversations(300, seed=1))
    write_sft(root / "valid", _conversations(12, seed=2))
    return root


def _cfg(**sft):
    cfg = tiny_config(eval_iters=2)
    for k, v in {"train_iters": 6, "lr": 3e-3, "min_lr": 3e-4, "lr_warmup_iters": 1, **sft}.items():
        setattr(cfg.sft, k, v)
    return cfg


def _losses(out: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in lines if "iteration" in r and "loss" in r}


def test_the_sft_config_replaces_the_schedule_and_the_starting_point():
    cfg = _cfg(init_from="ckpt", global_batch_size=8)
    tuned = sft_train_config(cfg)
    assert (tuned.train.train_iters, tuned.train.lr, tuned.train.init_from, tuned.train.global_batch_size) == (
        6, 3e-3, "ckpt", 8)
    assert tuned.train.micro_batch_size == cfg.train.micro_batch_size and cfg.train.init_from is None


def test_packing_groups_whole_conversations_in_order():
    positions = np.array([30, 20, 40, 0, 64, 10])
    assert pack(np.arange(6), positions, 64, packed=True) == [[0, 1], [2], [4], [5]]
    assert pack(np.arange(6), positions, 64, packed=False) == [[0], [1], [2], [4], [5]]


@pytest.fixture(scope="module")
def straight(sft_dir, tmp_path_factory) -> tuple[Path, dict]:
    """Six SFT iterations without interruption (packed samples, held-out conversations)."""
    out = tmp_path_factory.mktemp("sft_straight")
    return out, sft_stage(_cfg(), sft_dir, out, "fp")


def test_sft_loss_decreases(straight):
    out, summary = straight
    assert summary["completed"] and summary["packed"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "sft" and manifest["config"]["train"]["train_iters"] == 6
    losses = _losses(out)
    assert losses[6] < losses[1] - 0.3, losses
    valid = summary["losses"]["sft_valid"]
    assert valid["after"] < valid["before"] - 0.3, valid
    print("sft losses", losses, "valid", valid)


def test_sft_resume_is_exact(straight, sft_dir, tmp_path):
    resumed = tmp_path / "resumed"
    first = sft_stage(_cfg(), sft_dir, resumed, "fp", exit_after_iterations=3)
    assert not first["completed"]
    second = sft_stage(_cfg(), sft_dir, resumed, "fp")
    assert second["resumed_from_iteration"] == 3
    expected, got = _losses(straight[0]), _losses(resumed)
    for it in (4, 5, 6):
        assert got[it] == pytest.approx(expected[it], rel=1e-6, abs=1e-6), it


def test_a_packed_conversation_sees_only_itself(sft_dir):
    """Logits of each conversation inside a packed sample equal those of the conversation run alone (1e-5)."""
    cfg = sft_train_config(_cfg())
    with cpu_backend.cpu_backend(enabled=True):
        try:
            inputs = train.Inputs(tokenizer=data.DatasetTokenizer(vocab_size=VOCAB, eod=EOD), per_split=None,
                                  preset=resolve_preset(cfg.model))
            run = train.setup_model_and_optimizer(cfg, inputs, torch.device("cpu"))
            model = run.model[0]
            model.eval()
            packed = SFTDataset(sft_dir / "valid", seq_length=64, packed=True, pad_id=EOD)
            index = max(range(len(packed)), key=lambda i: len(packed.samples[i]))
            sample = packed[index]
            assert len(packed.samples[index]) >= 3
            with torch.no_grad():
                together = model(input_ids=sample["tokens"][None], position_ids=sample["position_ids"][None],
                                 attention_mask=sample["attention_mask"][None])
                offset = 0
                for conv in packed.samples[index]:
                    n = int(packed.tokens.sequence_lengths[conv]) - 1
                    ids = torch.as_tensor(packed.tokens[conv][:-1].astype(np.int64))[None]
                    alone = model(input_ids=ids, position_ids=torch.arange(n)[None], attention_mask=None)
                    assert torch.allclose(together[0, offset:offset + n], alone[0], atol=1e-5, rtol=0), conv
                    offset += n
                # Without the mask the later conversations would see the earlier ones: the check can fail.
                leaky = model(input_ids=sample["tokens"][None], position_ids=sample["position_ids"][None],
                              attention_mask=None)
                assert not torch.allclose(leaky[0, offset - n:offset], alone[0], atol=1e-5, rtol=0)
        finally:
            parallel.teardown()


def test_ipt_sft_tokenizes_trains_and_reuses_a_finished_run(tmp_path, tiny_tokenizer_dir, capsys):
    from megatron_ipt.cli import main

    rows = [{"question": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}
            for a in range(8) for b in range(4)]
    (tmp_path / "conv.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "exp.yaml"
    config.write_text(f"""
name: sft-cli
run_dir: {tmp_path}/runs/{{name}}
model: {{preset: llama-test, seq_length: 64}}
train: {{device: cpu, micro_batch_size: 2, global_batch_size: 4, log_interval: 1}}
sft: {{data: ["{tmp_path}/conv.jsonl"], valid_data: ["{tmp_path}/conv.jsonl"], tokenizer: "{tiny_tokenizer_dir}",
       template: plain, train_iters: 2, lr: 1.0e-3, min_lr: 1.0e-4, lr_warmup_iters: 1}}
""")
    assert main(["sft", str(config)]) == 0
    run = tmp_path / "runs" / "sft-cli"
    manifest = json.loads((run / "sft" / "manifest.json").read_text())
    assert manifest["stage"] == "sft" and manifest["counts"]["iterations"] == 2
    assert set(manifest["losses"]) == {"sft_valid"}
    assert json.loads((run / "sft_data" / "train.manifest.json").read_text())["conversations"] == len(rows)
    capsys.readouterr()
    assert main(["sft", str(config)]) == 0
    assert "up to date" in capsys.readouterr().err


def test_ipt_sft_names_the_key_of_a_missing_input(tmp_path, tiny_tokenizer_dir, capsys):
    from megatron_ipt.cli import main

    (tmp_path / "conv.jsonl").write_text(json.dumps({"question": "q?", "response": "a."}) + "\n")
    base = ["sft", "--set", f"run_dir={tmp_path}/run", "--set", "train.device=cpu", "--set", "model.preset=llama-test",
            "--set", f"sft.tokenizer={tiny_tokenizer_dir}", "--set", "sft.template=plain"]
    assert main(base) == 2
    assert "sft.data is empty" in capsys.readouterr().err
    assert main(base + ["--set", f"sft.data=[{tmp_path}/conv.jsonl]", "--set", f"sft.init_from={tmp_path}/nowhere"]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ipt sft:")]
    assert len(error) == 1 and "sft.init_from" in error[0] and "nowhere" in error[0], error
