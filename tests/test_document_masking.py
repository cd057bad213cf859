"""Document masking for packed sequences (blend.reset_position_ids / reset_attention_mask / eod_mask_loss) on a
crafted sample holding two documents, through megatron-core's GPTDataset and the trainer."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_ipt.config import ExperimentConfig
from megatron_ipt.training import data, parallel, scale
from megatron_ipt.training.data import DatasetTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import EOD, VOCAB, make_tokenized_dir, tiny_config, write_indexed  # noqa: E402

FIRST, SECOND = [11, 12, 13, EOD], [21, 22, 23, 24, 25, EOD]  # 10 tokens: one sample of 9 inputs + 9 labels


def crafted_sample(tmp_path: Path, **masking) -> dict:
    write_indexed(tmp_path / "two_docs", [np.array(FIRST, dtype=np.int32), np.array(SECOND, dtype=np.int32)])
    tokenizer = DatasetTokenizer(vocab_size=VOCAB, eod=EOD, path="synthetic")
    parallel.init_process_group(torch.device("cpu"))  # the dataset builder coordinates its cache over a group
    try:
        dataset = data.build_heldout_dataset(tmp_path, "two_docs", tokenizer=tokenizer, seq_length=9, seed=1,
                                             cache_dir=tmp_path / "cache", masking=masking)
        assert len(dataset) == 1
        return {k: torch.as_tensor(v) for k, v in dataset[0].items()}
    finally:
        torch.distributed.destroy_process_group()


def test_without_masking_a_packed_sample_is_one_causal_stream(tmp_path):
    sample = crafted_sample(tmp_path)
    assert sample["tokens"].tolist() == (FIRST + SECOND)[:9]
    assert sample["position_ids"].tolist() == list(range(9))
    assert "attention_mask" not in sample and sample["loss_mask"].tolist() == [1.0] * 9


def test_positions_restart_after_an_eod(tmp_path):
    sample = crafted_sample(tmp_path, reset_position_ids=True)
    assert sample["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4]


def test_no_attention_across_the_document_boundary(tmp_path):
    mask = crafted_sample(tmp_path, reset_attention_mask=True)["attention_mask"][0]  # True = masked
    allowed = ~mask
    assert allowed.shape == (9, 9)
    assert allowed[:4, :4].equal(torch.ones(4, 4, dtype=torch.bool).tril())  # the first document, causal
    assert not allowed[4:, :4].any()  # the second document sees nothing of the first
    assert allowed[4:, 4:].equal(torch.ones(5, 5, dtype=torch.bool).tril())


def test_no_loss_where_the_input_is_eod(tmp_path):
    sample = crafted_sample(tmp_path, eod_mask_loss=True)
    eod_at = sample["tokens"].tolist().index(EOD)
    assert sample["loss_mask"].tolist() == [0.0 if i == eod_at else 1.0 for i in range(9)]


def test_masked_training_runs_and_uses_the_mask_on_the_local_spec(tmp_path):
    tokenized = make_tokenized_dir(tmp_path / "tok", train_docs=40, heldout_docs=4)
    cfg = tiny_config(train_iters=2, eval_iters=1, save_checkpoint=False, blend__reset_position_ids=True,
                      blend__reset_attention_mask=True, blend__eod_mask_loss=True)
    plain = tiny_config(train_iters=2, eval_iters=1, save_checkpoint=False)
    from megatron_ipt.training.train import train_stage

    masked_summary = train_stage(cfg, tokenized, tmp_path / "masked", "fp")
    plain_summary = train_stage(plain, tokenized, tmp_path / "plain", "fp")
    assert masked_summary["completed"] and masked_summary["final_train_loss"] != plain_summary["final_train_loss"]


def test_a_per_sample_mask_on_transformer_engine_is_refused():
    cfg = ExperimentConfig()
    cfg.blend.reset_attention_mask = True
    found = scale.problems(cfg, num_layers=2, device_type="cuda", te_available=True)
    assert found == ["blend.reset_attention_mask needs model.transformer_impl: local (Transformer Engine's attention "
                     "follows its causal mask type and ignores a per-sample mask)"]
    cfg.model.transformer_impl = "local"
    assert scale.problems(cfg, num_layers=2, device_type="cuda", te_available=True) == []
