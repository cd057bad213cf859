"""Blends with extra prefixes, per-component validation every eval_interval, metrics.jsonl on resume, a
half-written checkpoint, and data errors that fail before any work (CPU, real megatron-core)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_ipt.training import checkpoint
from megatron_ipt.config import ConfigError, load_config
from megatron_ipt.training.data import DataError
from megatron_ipt.training.reporting import truncate_metrics
from megatron_ipt.training.train import train_stage

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import _documents, make_tokenized_dir, tiny_config, write_indexed  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-path tests")


@pytest.fixture(scope="module")
def tokenized_dir(tmp_path_factory):
    return make_tokenized_dir(tmp_path_factory.mktemp("tokenized"), train_docs=120, heldout_docs=12)


@pytest.fixture(scope="module")
def general(tmp_path_factory):
    """An 'existing general corpus' outside the run: stride-3 documents, train and validation prefixes."""
    root = tmp_path_factory.mktemp("general")
    write_indexed(root / "general_train", _documents(120, 3, seed=5))
    write_indexed(root / "general_valid", _documents(12, 3, seed=6))
    return root


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_an_extra_prefix_is_trained_on_and_evaluated_every_eval_interval(tokenized_dir, general, tmp_path):
    extra = [{"prefix": str(general / "general_train"), "weight": 1.0, "name": "general",
              "valid_prefix": str(general / "general_valid")}]
    cfg = tiny_config(blend__extra=extra, blend__raw_weight=0.0, blend__instruct_weight=0.0,
                      train_iters=6, eval_interval=2, eval_iters=2)
    summary = train_stage(cfg, tokenized_dir, tmp_path, "fp")
    losses = summary["losses"]
    assert set(losses) == {"heldout_raw", "heldout_pairs", "heldout_general"}
    # only the extra corpus was in the blend: its held-out loss drops the most
    drop = {k: v["before"] - v["after"] for k, v in losses.items()}
    assert drop["heldout_general"] > 0.3 and drop["heldout_general"] > drop["heldout_pairs"]
    evals = [r for r in records(tmp_path) if r.get("event") == "eval"]
    assert [r["at_iteration"] for r in evals] == [2, 4]
    assert set(evals[0]) == {"event", "at_iteration", "heldout_raw", "heldout_pairs", "heldout_general"}
    assert evals[1]["heldout_general"] < evals[0]["heldout_general"]


def test_missing_or_empty_extra_prefixes_fail_before_any_work(tokenized_dir, general, tmp_path):
    cfg = tiny_config(blend__extra=[{"prefix": str(tmp_path / "nope"), "weight": 1.0, "name": "general"}])
    with pytest.raises(DataError, match=r"blend.extra\[0\].prefix = .*nope.*missing: .*nope.bin"):
        train_stage(cfg, tokenized_dir, tmp_path / "a", "fp")
    assert not torch.distributed.is_initialized() and not (tmp_path / "a").exists()
    write_indexed(tmp_path / "empty", [])
    cfg = tiny_config(blend__extra=[{"prefix": str(general / "general_train"), "weight": 1.0, "name": "general",
                                     "valid_prefix": str(tmp_path / "empty")}])
    with pytest.raises(DataError, match=r"blend.extra\[0\].valid_prefix: .* holds no documents"):
        train_stage(cfg, tokenized_dir, tmp_path / "b", "fp")


def test_general_weight_blends_train_general_and_fails_before_work_without_it(tokenized_dir, tmp_path):
    """The Vanilla PT arm's blend (raw + the general instructions alone); without a ``train_general`` dataset the
    run fails before any process group is made, naming ``blend.general_weight``."""
    cfg = tiny_config(blend__general_weight=1.0, blend__raw_weight=0.0, blend__instruct_weight=0.0, train_iters=2)
    with pytest.raises(DataError, match=r"blend.general_weight = 1.0 but .*train_general.bin/.idx do not exist"):
        train_stage(cfg, tokenized_dir, tmp_path / "a", "fp")
    assert not torch.distributed.is_initialized() and not (tmp_path / "a").exists()
    with_general = tmp_path / "tokenized"
    with_general.mkdir()
    for f in Path(tokenized_dir).iterdir():
        (with_general / f.name).symlink_to(f)
    write_indexed(with_general / "train_general", _documents(40, 3, seed=7))
    summary = train_stage(cfg, with_general, tmp_path / "b", "fp")
    assert summary["iterations"] == 2 and np.isfinite(summary["final_train_loss"])


@pytest.mark.parametrize("extra, message", [
    ("[{prefix: x, weight: 0, name: g}]", r"blend.extra.0.weight = 0"),
    ("[{prefix: x, weight: -1, name: g}]", r"blend.extra.0.weight = -1"),
    ("[{prefix: x, weight: 1, name: 'a b'}]", r"blend.extra.0.name"),
    ("[{prefix: x, weight: 1, name: g}, {prefix: y, weight: 1, name: g}]", r"'g' is used twice"),
    ("[{prefix: x, weight: 1, name: raw}]", r"reserved"),
    ("[{weight: 1, name: g}]", r"blend.extra.0.prefix"),
])
def test_bad_blend_extra_entries_name_the_key(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"blend.extra={extra}"])


def test_per_split_blends_train_on_the_train_blend_and_report_valid_and_test(tokenized_dir, general, tmp_path):
    per_split = {"train": [{"prefix": str(general / "general_train")}],
                 "valid": [{"prefix": "heldout_raw", "weight": 1.0}, {"prefix": str(general / "general_valid"), "weight": 3.0}],
                 "test": [{"prefix": str(general / "general_valid")}]}
    cfg = tiny_config(blend__per_split=per_split, train_iters=6, eval_interval=3, eval_iters=2)
    # stopped after the eval at iteration 3 (checkpoint), then resumed to the end
    assert not train_stage(cfg, tokenized_dir, tmp_path, "fp", exit_after_iterations=3)["completed"]
    summary = train_stage(cfg, tokenized_dir, tmp_path, "fp")
    assert summary["resumed_from_iteration"] == 3
    losses = summary["losses"]
    # the two-dataset valid blend also per dataset; the one-dataset test blend once
    assert list(losses) == ["heldout_raw", "heldout_pairs", "valid", "valid.heldout_raw", "valid.general_valid", "test"]
    drop = {k: v["before"] - v["after"] for k, v in losses.items()}
    # only the general corpus was trained on: its test set improves most, the valid blend (3:1 general) next
    assert drop["test"] > drop["valid"] > drop["heldout_raw"] and drop["test"] > 0.3
    # per dataset: the same set as heldout_raw gives the same loss; the general one as the (same-prefix) test set
    for when in ("before", "after"):
        assert losses["valid.heldout_raw"][when] == losses["heldout_raw"][when]
        assert losses["valid.general_valid"][when] == losses["test"][when]
    assert losses["valid.general_valid"]["after"] < losses["valid"]["after"] < losses["valid.heldout_raw"]["after"]
    rows = records(tmp_path)
    before = [r for r in rows if r.get("event") == "heldout_before"]
    assert len(before) == 1 and {k: v["before"] for k, v in losses.items()} == {k: before[0][k] for k in losses}
    evals = [r for r in rows if r.get("event") == "eval"]  # written by the first run, kept by the resumed one
    assert [r["at_iteration"] for r in evals] == [3]
    assert list(evals[0]) == ["event", "at_iteration", "heldout_raw", "heldout_pairs", "valid",
                              "valid.heldout_raw", "valid.general_valid"]  # test: before/after only
    assert evals[0]["valid.heldout_raw"] != evals[0]["valid.general_valid"]
    after = [r for r in rows if r.get("event") == "heldout_after"]
    assert len(after) == 1 and after[0] == {"event": "heldout_after", **{k: v["after"] for k, v in losses.items()}}


def test_short_per_split_datasets_are_evaluated_as_one_shorter_sequence_or_skipped(tokenized_dir, general, tmp_path,
                                                                                      capsys):
    write_indexed(tmp_path / "short", _documents(1, 1, seed=7, min_len=29, max_len=30))  # 30 tokens: one sequence of 29
    write_indexed(tmp_path / "tiny", _documents(1, 1, seed=8, min_len=7, max_len=8))  # 8 tokens: too few
    per_split = {"train": [{"prefix": str(general / "general_train")}],
                 "valid": [{"prefix": str(general / "general_valid")}, {"prefix": str(tmp_path / "short")},
                           {"prefix": str(tmp_path / "tiny")}]}
    summary = train_stage(tiny_config(blend__per_split=per_split, train_iters=1, eval_iters=1), tokenized_dir,
                          tmp_path / "out", "fp")
    losses = summary["losses"]
    assert list(losses) == ["heldout_raw", "heldout_pairs", "valid", "valid.general_valid", "valid.short"]
    assert [losses[k]["sequence_length"] for k in ("valid", "valid.general_valid", "valid.short")] == [64, 64, 29]
    out = capsys.readouterr().out
    assert "short has 30 tokens, less than one sequence: evaluated as one sequence of 29" in out
    assert "tiny has 8 tokens, too few to evaluate" in out


def test_per_split_component_keys_are_stems_made_unique_by_config_index():
    from megatron_ipt.training.data import split_component_keys

    assert split_component_keys("valid", ["/d/heldout_raw", "/g/general_valid"]) == ["valid.heldout_raw",
                                                                                     "valid.general_valid"]
    assert split_component_keys("test", ["/a/valid", "/b/other", "/c/valid"]) == ["test.valid.0", "test.other",
                                                                                 "test.valid.2"]


def test_a_missing_per_split_prefix_fails_before_any_work_naming_the_key(tokenized_dir, general, tmp_path):
    per_split = {"train": [{"prefix": "train_raw"}],
                 "valid": [{"prefix": str(general / "general_valid")}, {"prefix": str(tmp_path / "nope")}]}
    with pytest.raises(DataError, match=r"blend.per_split.valid\[1\].prefix = .*nope.*missing: .*nope.bin"):
        train_stage(tiny_config(blend__per_split=per_split), tokenized_dir, tmp_path / "a", "fp")
    assert not torch.distributed.is_initialized() and not (tmp_path / "a").exists()


@pytest.mark.parametrize("overrides, message", [
    (["blend.per_split={train: [{prefix: x, weight: 0}]}"], r"blend.per_split.train.0.weight = 0: Input should be greater than 0"),
    (["blend.per_split={train: [{prefix: x}], valid: [{prefix: y, weight: -2}]}"], r"blend.per_split.valid.0.weight = -2"),
    (["blend.per_split={train: []}"], r"blend.per_split.train = \[\]: List should have at least 1 item"),
    (["blend.per_split={train: [{prefix: x, wieght: 1}]}"], r"unknown key 'blend.per_split.train.0.wieght'"),
    (["blend.raw_weight=1", "blend.per_split={train: [{prefix: x}]}"], r"blend.per_split replaces .*: leave out blend.raw_weight"),
    (["blend.mock=true", "blend.per_split={train: [{prefix: x}]}"], r"leave out blend.mock"),
])
def test_bad_per_split_blends_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_truncate_metrics_keeps_records_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"event": "heldout_before", "heldout_raw": 5.0}] + [{"iteration": i, "loss": 1.0} for i in range(1, 6)]
    rows += [{"event": "eval", "at_iteration": 2}, {"event": "eval", "at_iteration": 4}, {"event": "heldout_after"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 6, "lo')  # a line cut by a crash
    assert truncate_metrics(path, 3) == 5
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == rows[:4] + [{"event": "eval", "at_iteration": 2}]
    assert truncate_metrics(path, 0) == 5 and path.read_text() == ""


def test_resume_after_a_crash_mid_save_rewrites_no_iteration_twice(tokenized_dir, tmp_path):
    cfg = tiny_config(train_iters=6, save_interval=2, save_checkpoint=False, eval_iters=1)
    first = train_stage(cfg, tokenized_dir, tmp_path, "fp")
    expected = {r["iteration"]: r["loss"] for r in records(tmp_path) if "iteration" in r}
    ckpts = tmp_path / "checkpoints"
    assert checkpoint.latest_iteration(ckpts) == 4 and first["completed"]
    # A save of iteration 6 that died half-way: a folder with a torn metadata file, 'latest' still says 4.
    (ckpts / "iter_0000006").mkdir()
    (ckpts / "iter_0000006" / "metadata.json").write_text('{"sharded_backend": "torch_di')
    second = train_stage(tiny_config(train_iters=6, save_interval=2, eval_iters=1), tokenized_dir, tmp_path, "fp")
    assert second["resumed_from_iteration"] == 4
    iterations = [r["iteration"] for r in records(tmp_path) if "iteration" in r]
    assert iterations == [1, 2, 3, 4, 5, 6]
    assert [r["event"] for r in records(tmp_path) if "event" in r] == ["heldout_before", "heldout_after"]
    got = {r["iteration"]: r["loss"] for r in records(tmp_path) if "iteration" in r}
    assert got[6] == pytest.approx(expected[6], rel=1e-6, abs=1e-6)
    assert checkpoint.latest_iteration(ckpts) == 6
    assert json.loads((ckpts / "iter_0000006" / "metadata.json").read_text())  # rewritten whole


def test_min_lr_above_lr_is_refused():
    with pytest.raises(ConfigError, match=r"train.min_lr 0.01 is larger than train.lr 0.001"):
        load_config(None, ["train.lr=1e-3", "train.min_lr=1e-2"])


def test_mock_data_trains_without_the_blend(tokenized_dir, tmp_path):
    summary = train_stage(tiny_config(blend__mock=True, train_iters=2, eval_iters=1), tokenized_dir, tmp_path, "fp")
    assert summary["completed"] and summary["consumed_samples"] == 8
    assert all(r["loss"] > 0 for r in records(tmp_path) if "iteration" in r)


def test_eval_micro_batches_round_up_to_a_multiple_with_zero_loss_masks():
    from megatron_ipt.training.data import eval_micro_batches

    dataset = [{"tokens": torch.full((4,), i), "loss_mask": torch.ones(4)} for i in range(5)]
    count, batches = eval_micro_batches(dataset, micro_batch_size=2, data_parallel_rank=0, data_parallel_size=1,
                                        multiple_of=2)  # 3 micro-batches cover 5 samples; the interleaved schedule wants 4
    masks = [b["loss_mask"].sum(dim=1).tolist() for b in batches]
    assert count == 4 and masks == [[4, 4], [4, 4], [4, 0], [0, 0]]
    count, batches = eval_micro_batches(dataset, micro_batch_size=2, data_parallel_rank=0, data_parallel_size=1,
                                        max_batches=1, multiple_of=2)  # eval_iters=1: the padding batch counts nothing
    assert count == 2 and [b["loss_mask"].sum().item() for b in batches] == [8, 0]


def test_prepared_index_caches_are_read_not_rebuilt_and_give_the_same_samples(tokenized_dir, tmp_path):
    from megatron_ipt.training.train import prepare_data

    cfg = tiny_config(train_iters=3, eval_iters=1, save_checkpoint=False)
    prepared = tmp_path / "prepared"
    counts = prepare_data(cfg, tokenized_dir, prepared)
    assert counts["train"] >= 12 and set(counts) >= {"heldout_raw", "heldout_pairs"}
    assert not torch.distributed.is_initialized()
    cache = prepared / "blend_cache"
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    assert before
    train_stage(cfg, tokenized_dir, prepared, "fp")
    after = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    assert after == before  # every cache file read as it was; none written
    fresh = tmp_path / "fresh"
    train_stage(cfg, tokenized_dir, fresh, "fp")
    assert records_by_iteration(prepared) == records_by_iteration(fresh)


def records_by_iteration(out: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in records(out) if "iteration" in r}


def test_an_empty_heldout_dataset_is_not_evaluated_and_training_runs(tmp_path, capsys):
    """No held-out document got a pair (a small synthesizer can write none): the tokenize stage writes an empty
    heldout_pairs (a 0-byte .bin, which cannot be memory-mapped); training skips it with a line instead of failing."""
    tokenized = make_tokenized_dir(tmp_path / "tok", train_docs=60, heldout_docs=4)
    write_indexed(tokenized / "heldout_pairs", [])
    assert (tokenized / "heldout_pairs.bin").stat().st_size == 0
    summary = train_stage(tiny_config(train_iters=1, eval_iters=1), tokenized, tmp_path / "out", "fp")
    assert list(summary["losses"]) == ["heldout_raw"]
    assert "heldout_pairs has 0 tokens, too few to evaluate" in capsys.readouterr().out
