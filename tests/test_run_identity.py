"""What defines a training run and what may change between its restarts (issue 16, item 3): the run record, the
finished-run fingerprint, and how a train folder is continued or moved aside naming the keys that changed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_ipt import run_identity
from megatron_ipt.pipeline import _claim_training_dir, train_fingerprint, train_record

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import tiny_config  # noqa: E402

TOKENIZED = {"fingerprint": "tok-1"}


def _changed(**settings):
    return run_identity.changes(train_record(tiny_config(train_iters=6), TOKENIZED),
                                train_record(tiny_config(**{"train_iters": 6, **settings}), TOKENIZED))


def test_logging_saving_layout_and_trackers_may_change_between_restarts():
    for settings in ({"log_interval": 7}, {"eval_interval": 2}, {"save_interval": 3}, {"keep_last": 2},
                     {"tensorboard": True}, {"async_save": True}, {"exit_duration_minutes": 5.0},
                     {"parallel__tensor_model_parallel_size": 2}, {"parallel__pipeline_model_parallel_size": 2},
                     {"parallel__nproc_per_node": 4}, {"parallel__overlap_grad_reduce": True},
                     {"recompute": "full"}, {"device": "cuda"}, {"model__attention_backend": "unfused"},
                     {"train_iters": 9}):  # more iterations continue the run
        assert _changed(**settings) is None, settings
    # a finished run is up to date whatever of those changed, until train_iters grows
    base = train_fingerprint(tiny_config(train_iters=6), TOKENIZED)
    assert train_fingerprint(tiny_config(train_iters=6, log_interval=3, parallel__tensor_model_parallel_size=2),
                             TOKENIZED) == base
    assert train_fingerprint(tiny_config(train_iters=9), TOKENIZED) != base


def test_what_defines_the_run_is_named_when_it_changes():
    assert _changed(seed=7) == ["train.seed: 1234 -> 7"]
    assert _changed(model__hidden_size=32, lr=1e-3) == ["model.hidden_size: null -> 32", "train.lr: 0.003 -> 0.001"]
    assert _changed(global_batch_size=8) == ["train.global_batch_size: 4 -> 8"]
    assert _changed(blend__raw_weight=0.3) == ["blend.raw_weight: 0.5 -> 0.3"]
    assert _changed(parallel__use_distributed_optimizer=True) == ["parallel.use_distributed_optimizer: false -> true"]
    assert _changed(train_iters=5) == ["train.train_iters: 6 -> 5 (may only grow)"]
    # the distributed optimizer's state is saved per gradient bucket: with it, the bucket layout defines the run too
    distopt = {"parallel__use_distributed_optimizer": True}
    assert run_identity.changes(train_record(tiny_config(train_iters=6, **distopt), TOKENIZED), train_record(
        tiny_config(train_iters=6, parallel__bucket_size=20000, parallel__overlap_grad_reduce=True, **distopt),
        TOKENIZED)) == ["parallel.bucket_size: null -> 20000", "parallel.overlap_grad_reduce: false -> true"]
    assert _changed(parallel__bucket_size=20000, parallel__overlap_grad_reduce=True) is None  # without it: free
    other_data = train_record(tiny_config(train_iters=6), {"fingerprint": "tok-2"})
    assert run_identity.changes(train_record(tiny_config(train_iters=6), TOKENIZED), other_data) == [
        'inputs.tokenized: "tok-1" -> "tok-2"']
    assert run_identity.changes(None, other_data) == ["no run.json"]


def test_a_changed_run_is_moved_aside_naming_the_keys_and_a_continued_one_stays(tmp_path, capsys):
    out = tmp_path / "train"
    first = train_record(tiny_config(train_iters=6), TOKENIZED)
    _claim_training_dir(out, first, False, 0)
    assert run_identity.read_record(out) == first
    (out / "checkpoints").mkdir()
    (out / "manifest.json").write_text(json.dumps({"stage": "train", "fingerprint": run_identity.stage_fingerprint(first)}))

    # other logging and layout: the same folder, still finished
    _claim_training_dir(out, train_record(tiny_config(train_iters=6, log_interval=5), TOKENIZED), False, 0)
    assert (out / "manifest.json").is_file() and (out / "checkpoints").is_dir()
    # more iterations: the same folder, no longer finished (the continued run writes the manifest again)
    grown = train_record(tiny_config(train_iters=9), TOKENIZED)
    capsys.readouterr()
    _claim_training_dir(out, grown, False, 0)
    assert "finished with fewer iterations; train.train_iters = 9: continuing it" in " ".join(capsys.readouterr().err.split())
    assert not (out / "manifest.json").exists() and (out / "checkpoints").is_dir()
    assert run_identity.read_record(out)["iterations"] == {"train.train_iters": 9}
    assert list(tmp_path.iterdir()) == [out]

    capsys.readouterr()
    _claim_training_dir(out, train_record(tiny_config(train_iters=9, seed=7), TOKENIZED), False, 0)
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("train.replaced-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints").is_dir() and not (out / "checkpoints").exists()
    assert f"{out} held a different run (train.seed: 1234 -> 7); moved it to {aside[0]}" in err, err


def test_a_folder_of_an_earlier_version_is_adopted_when_its_stamp_is_this_runs(tmp_path):
    out = tmp_path / "train"
    out.mkdir()
    (out / "fingerprint").write_text("legacy-fp\n")
    record = train_record(tiny_config(train_iters=6), TOKENIZED)
    _claim_training_dir(out, record, False, 0, legacy="legacy-fp")  # the same run, stamped the earlier way
    assert list(tmp_path.iterdir()) == [out] and run_identity.read_record(out) == record
    (out / "run.json").unlink()
    _claim_training_dir(out, record, False, 0, legacy="another-fp")  # another run: moved aside
    assert len(list(tmp_path.glob("train.replaced-*"))) == 1
