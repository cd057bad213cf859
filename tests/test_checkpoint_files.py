"""The checkpoint folder's bookkeeping (issue 16, item 14): pruning counts only complete checkpoints, iteration
folders sort as numbers, and a ``latest`` naming a missing folder falls back to the newest complete one."""

import json

import pytest

from megatron_ipt.training import checkpoint
from megatron_ipt.training.checkpoint import LATEST, LAYOUT, checkpoint_dir, iteration_folders, prune_checkpoints


def _save(root, iteration, complete=True):
    folder = checkpoint_dir(root, iteration)
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(b"x")
    if complete:
        (folder / LAYOUT).write_text(json.dumps({"pipeline": 1, "tensor": 1, "data": 1}) + "\n")
    return folder


def test_iteration_folders_sort_as_numbers(tmp_path):
    for n in (10_000_000, 9_999_999, 20):
        _save(tmp_path, n)
    assert [n for n, _ in iteration_folders(tmp_path)] == [20, 9_999_999, 10_000_000]
    (tmp_path / LATEST).write_text("10000000\n")
    assert [p.name for p in prune_checkpoints(tmp_path, 1)] == ["iter_0000020", "iter_9999999"]
    assert [n for n, _ in iteration_folders(tmp_path)] == [10_000_000]


def test_pruning_counts_only_complete_checkpoints_and_leaves_a_save_in_flight(tmp_path):
    for n in (2, 4, 6):
        _save(tmp_path, n)
    in_flight = _save(tmp_path, 8, complete=False)  # an asynchronous save not finalized yet
    (tmp_path / LATEST).write_text("6\n")
    removed = prune_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["iter_0000002"]  # keeps 4 and 6: two complete ones
    assert in_flight.is_dir() and [n for n, _ in iteration_folders(tmp_path, complete=True)] == [4, 6]


def test_a_latest_naming_a_missing_folder_falls_back_to_the_newest_complete_one(tmp_path):
    _save(tmp_path, 4)
    _save(tmp_path, 6)
    _save(tmp_path, 8, complete=False)
    (tmp_path / LATEST).write_text("10\n")
    with pytest.warns(UserWarning, match="names iteration 10, but .*iter_0000010 is missing; using the newest "
                                         "complete checkpoint, .*iter_0000006"):
        assert checkpoint.latest_iteration(tmp_path) == 6
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / LATEST).write_text("3\n")
    with pytest.raises(ValueError, match="names iteration 3, but .* is missing"):
        checkpoint.latest_iteration(empty)
