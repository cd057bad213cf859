"""Trainer faults and lifecycle on CPU with real megatron-core: stop on SIGTERM and resume to the same
final loss, keep the last K checkpoints, continual pre-training from weights only, LR schedules wired."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from megatron_ipt.training import checkpoint
from megatron_ipt.training.train import train_stage

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import make_tokenized_dir, tiny_config  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-path tests")


@pytest.fixture(scope="module")
def tokenized_dir(tmp_path_factory):
    return make_tokenized_dir(tmp_path_factory.mktemp("tokenized"))


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["iteration"]: m["loss"] for m in rows if "iteration" in m}


def test_keep_last_keeps_the_newest_checkpoints(tokenized_dir, tmp_path):
    train_stage(tiny_config(train_iters=8, save_interval=2, keep_last=2, eval_iters=1), tokenized_dir, tmp_path, "fp")
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("iter_*"))
    assert saved == ["iter_0000006", "iter_0000008"]
    assert checkpoint.latest_iteration(tmp_path / "checkpoints") == 8


def test_init_from_loads_weights_only_and_rewarms(tokenized_dir, tmp_path):
    first = train_stage(tiny_config(train_iters=6, eval_iters=2), tokenized_dir, tmp_path / "a", "fp-a")
    cpt = train_stage(tiny_config(train_iters=3, eval_iters=2, init_from=str(tmp_path / "a" / "checkpoints")),
                      tokenized_dir, tmp_path / "b", "fp-b")
    # the continual run starts from the first run's final weights: its "before" is the first run's "after"
    for name in ("heldout_raw", "heldout_pairs"):
        assert cpt["losses"][name]["before"] == pytest.approx(first["losses"][name]["after"], rel=1e-6)
    assert cpt["initialized_from"].endswith("iter_0000006")
    # ... but not its optimizer, schedule or progress: iteration 1 is a warmup step again
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    lr = {r["iteration"]: r["lr"] for r in rows if "iteration" in r}
    assert lr[1] == 0.0 and lr[2] == pytest.approx(tiny_config().train.lr / 2)  # warmup over 2 iterations
    assert cpt["consumed_samples"] == 12
    from megatron_ipt.errors import IptError

    with pytest.raises(IptError, match="train.init_from = .*not a torch_dist checkpoint"):
        train_stage(tiny_config(train_iters=1, init_from=str(tmp_path)), tokenized_dir, tmp_path / "c", "fp-c")
    assert not torch.distributed.is_initialized() and not (tmp_path / "c").exists()  # failed before any work


def _experiment(tmp_path: Path, tokenized_dir: Path, iters: int, name: str, **settings) -> Path:
    """An experiment whose tokenize stage is already done (a copy of the tiny tokenized folder); ``settings``
    as for ``tiny_config`` (e.g. ``parallel__nproc_per_node=2``)."""
    import shutil

    run = tmp_path / name
    shutil.copytree(tokenized_dir, run / "tokenized")
    cfg = tiny_config(train_iters=iters, eval_iters=1, save_checkpoint=True, **settings)
    data = cfg.model_dump(mode="json")
    data["name"], data["run_dir"] = name, str(run)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _ipt(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "megatron_ipt.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.e2e
def test_sigterm_saves_and_stops_and_the_rerun_ends_with_the_same_loss(tokenized_dir, tmp_path):
    iters = 30
    straight = _experiment(tmp_path, tokenized_dir, iters, "straight")
    preempted = _experiment(tmp_path, tokenized_dir, iters, "preempted")
    proc = _ipt("train", str(preempted))
    metrics = tmp_path / "preempted" / "train" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and '"iteration": 3' in metrics.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-2000:]
    assert "SIGTERM" in err and "rerun the same command to resume" in err
    stopped_at = checkpoint.latest_iteration(tmp_path / "preempted" / "train" / "checkpoints")
    assert 3 <= stopped_at < iters
    assert not (tmp_path / "preempted" / "train" / "manifest.json").exists()
    proc = _ipt("train", str(preempted))
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    proc = _ipt("train", str(straight))
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    got, expected = losses(tmp_path / "preempted" / "train"), losses(tmp_path / "straight" / "train")
    assert got[iters] == pytest.approx(expected[iters], rel=1e-6, abs=1e-6)
    manifest = json.loads((tmp_path / "preempted" / "train" / "manifest.json").read_text())
    assert manifest["train"]["resumed_from_iteration"] == stopped_at


def test_exit_duration_saves_and_stops(tokenized_dir, tmp_path):
    summary = train_stage(tiny_config(train_iters=50, exit_duration_minutes=1e-9, eval_iters=1), tokenized_dir,
                          tmp_path, "fp")
    assert summary["stopped_by"] == "exit_duration_minutes" and summary["iterations"] == 1
    assert checkpoint.latest_iteration(tmp_path / "checkpoints") == 1
    assert json.loads((tmp_path / "stopped.json").read_text())["iteration"] == 1


@pytest.mark.dist
def test_a_tp2_checkpoint_resumed_with_tp1_continues_the_same_curve(tokenized_dir, tmp_path):
    worker = Path(__file__).parent / "dist_train_worker.py"

    def run(out, *flags):
        r = subprocess.run([sys.executable, str(worker), str(tokenized_dir), str(out), "--iters", "6", *flags],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads((out / "summary.json").read_text())

    run(tmp_path / "straight", "--procs", "2", "--tp", "2")
    first = run(tmp_path / "resharded", "--procs", "2", "--tp", "2", "--stop-at", "3")
    assert not first["completed"]
    second = run(tmp_path / "resharded", "--procs", "1", "--tp", "1")  # the TP=2 checkpoint, loaded with TP=1
    assert second["resumed_from_iteration"] == 3 and second["parallel"]["tensor_model_parallel_size"] == 1
    expected, got = losses(tmp_path / "straight"), losses(tmp_path / "resharded")
    for it in (4, 5, 6):  # same weights, optimizer state and data; only the TP split of the matmuls differs
        assert got[it] == pytest.approx(expected[it], rel=1e-4), it


def test_async_saves_write_the_state_of_their_iteration_while_training_goes_on(tokenized_dir, tmp_path):
    import shutil

    cfg = tiny_config(train_iters=6, save_interval=2, eval_iters=1, async_save=True)
    summary = train_stage(cfg, tokenized_dir, tmp_path / "async", "fp")
    ckpts = tmp_path / "async" / "checkpoints"
    assert summary["completed"] and checkpoint.latest_iteration(ckpts) == 6
    for it in (2, 4, 6):  # every background save was finalized: megatron's metadata.json, then our layout.json
        folder = checkpoint.checkpoint_dir(ckpts, it)
        assert (folder / "metadata.json").is_file() and (folder / "layout.json").is_file(), it
    # iteration 2 was written by a forked process while iterations 3-4 trained: resuming from it alone
    # continues exactly like the run that wrote it
    resumed = tmp_path / "resumed" / "checkpoints"
    shutil.copytree(checkpoint.checkpoint_dir(ckpts, 2), checkpoint.checkpoint_dir(resumed, 2))
    (resumed / "latest").write_text("2\n")
    second = train_stage(tiny_config(train_iters=6, eval_iters=1), tokenized_dir, tmp_path / "resumed", "fp")
    assert second["resumed_from_iteration"] == 2
    expected, got = losses(tmp_path / "async"), losses(tmp_path / "resumed")
    for it in (3, 4, 5, 6):
        assert got[it] == pytest.approx(expected[it], rel=1e-6, abs=1e-6), it


@pytest.mark.dist
def test_async_saves_on_two_ranks_finalize_together_and_match_the_synchronous_run(tokenized_dir, tmp_path):
    worker = Path(__file__).parent / "dist_train_worker.py"

    def run(out, *flags):
        r = subprocess.run([sys.executable, str(worker), str(tokenized_dir), str(out), "--procs", "2", "--distopt",
                            "--save-interval", "2", *flags],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads((out / "summary.json").read_text())

    run(tmp_path / "sync")
    summary = run(tmp_path / "async", "--async-save")
    assert summary["completed"] and summary["parallel"]["data_parallel_size"] == 2
    ckpts = tmp_path / "async" / "checkpoints"
    assert checkpoint.latest_iteration(ckpts) == 4
    assert all((checkpoint.checkpoint_dir(ckpts, it) / "layout.json").is_file() for it in (2, 4))
    # saving in the background changes nothing in training: the losses equal the synchronous run's
    assert losses(tmp_path / "async") == losses(tmp_path / "sync")


def test_init_from_a_checkpoint_of_another_shape_is_one_line_naming_the_tensor(tokenized_dir, tmp_path):
    """Issue 16, item 13: the mismatch is named (checkpoint, tensor, shapes), not a 55-line megatron traceback."""
    from megatron_ipt.errors import IptError

    train_stage(tiny_config(train_iters=1, eval_iters=1, model__hidden_size=32), tokenized_dir, tmp_path / "narrow", "fp")
    narrow = tmp_path / "narrow" / "checkpoints"
    with pytest.raises(IptError) as err:
        train_stage(tiny_config(train_iters=1, eval_iters=1, init_from=str(narrow)), tokenized_dir, tmp_path / "b", "fp")
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    assert message.startswith(f"train.init_from = {str(narrow)!r}: ") and "iter_0000001" in message, message
    assert re.search(r"tensor \S+: shape \(.*\b32\) in the checkpoint, the model expects \(.*\b64\)$", message), message
    assert not torch.distributed.is_initialized()
    assert not (tmp_path / "b" / "checkpoints").exists()


@pytest.mark.e2e
def test_a_second_sigterm_during_the_final_save_does_not_kill_it(tokenized_dir, tmp_path):
    """Issue 16, item 14: Slurm (or an impatient user) signals again while the stop's checkpoint is written; the save
    completes, the run exits 3 with stopped.json, and the checkpoint resumes."""
    iters = 100
    config = _experiment(tmp_path, tokenized_dir, iters, "twice")
    train = tmp_path / "twice" / "train"
    ckpts = train / "checkpoints"
    proc = _ipt("train", str(config))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (train / "metrics.jsonl").is_file() and '"iteration": 2,' in (train / "metrics.jsonl").read_text():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # the stop: the run saves at the end of its iteration
    during_save = 0
    while proc.poll() is None:  # then signal again and again while that checkpoint is being written
        folders = checkpoint.iteration_folders(ckpts)
        if folders and checkpoint.latest_iteration(ckpts) == folders[-1][0]:
            break  # the save finished
        if folders:
            during_save += 1
            proc.send_signal(signal.SIGTERM)
        time.sleep(0.005)
    out, err = proc.communicate(timeout=120)
    assert during_save >= 1  # signals did arrive while the checkpoint was being written
    assert proc.returncode == 3, err[-2000:]
    assert "rerun the same command to resume" in err
    stopped_at = checkpoint.latest_iteration(ckpts)
    assert 2 <= stopped_at < iters
    assert json.loads((train / "stopped.json").read_text()) == {"iteration": stopped_at, "reason": "SIGTERM"}
    assert (checkpoint.checkpoint_dir(ckpts, stopped_at) / "layout.json").is_file()
    proc = _ipt("train", str(config))  # the checkpoint is complete: the rerun resumes from it
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    manifest = json.loads((train / "manifest.json").read_text())
    assert manifest["train"]["resumed_from_iteration"] == stopped_at and manifest["counts"]["iterations"] == iters


@pytest.mark.e2e
def test_ipt_train_resumes_with_another_layout_and_log_interval_and_grown_train_iters(tokenized_dir, tmp_path):
    """Issue 16, item 3, through the CLI: a run finished at 3 iterations (TP=1, one process) rerun with train_iters 6,
    TP=2 on two processes and another log_interval resumes at 3 in the same folder and continues the loss curve of a
    straight 6-iteration run; rerunning that is up to date."""
    config = _experiment(tmp_path, tokenized_dir, 3, "grown", lr_decay_style="constant")  # same LR at 3 and 6 iters
    train = tmp_path / "grown" / "train"
    first = _ipt("train", str(config))
    assert first.wait(timeout=240) == 0, first.stderr.read()[-2000:]
    assert json.loads((train / "manifest.json").read_text())["counts"]["iterations"] == 3
    changed = ("--set", "train.train_iters=6", "--set", "train.log_interval=2", "--set", "parallel.nproc_per_node=2",
               "--set", "parallel.tensor_model_parallel_size=2")
    proc = _ipt("train", str(config), *changed)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "held a different run" not in err and not list(train.parent.glob("train.replaced-*"))
    manifest = json.loads((train / "manifest.json").read_text())
    assert manifest["train"]["resumed_from_iteration"] == 3 and manifest["counts"]["iterations"] == 6
    assert manifest["parallel"]["tensor_model_parallel_size"] == 2
    straight = train_stage(tiny_config(train_iters=6, eval_iters=1, lr_decay_style="constant"), tokenized_dir,
                           tmp_path / "straight", "fp")
    assert straight["completed"]
    expected, got = losses(tmp_path / "straight"), losses(train)
    assert sorted(got) == [1, 2, 3, 4, 6]  # log_interval 1, then 2
    for it in (1, 2, 3, 4, 6):  # the same curve: only the TP split of the matmuls differs after iteration 3
        assert got[it] == pytest.approx(expected[it], rel=1e-4), it
    proc = _ipt("train", str(config), *changed)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "up to date" in err, err[-2000:]


def test_a_grown_train_iters_keeps_the_schedule_the_run_started_with(tokenized_dir, tmp_path):
    """A larger train_iters continues the run on its own learning-rate schedule (megatron-core's checkpointed
    scheduler values), the warmup-stable-decay anneal included: stopped at 2 of 10 (anneal from 5), continued with
    train_iters 20, iterations 3-6 still run at the peak LR and 7 anneals, as in the 10-iteration run."""
    wsd = {"lr_decay_style": "wsd", "lr_wsd_decay_fraction": 0.5, "eval_iters": 1}
    train_stage(tiny_config(train_iters=10, **wsd), tokenized_dir, tmp_path / "straight", "fp", exit_after_iterations=8)
    train_stage(tiny_config(train_iters=10, **wsd), tokenized_dir, tmp_path / "grown", "fp", exit_after_iterations=2)
    train_stage(tiny_config(train_iters=20, **wsd), tokenized_dir, tmp_path / "grown", "fp", exit_after_iterations=8)
    lrs = {}
    for name in ("straight", "grown"):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        lrs[name] = {r["iteration"]: r["lr"] for r in rows if "iteration" in r}
    assert lrs["grown"] == pytest.approx(lrs["straight"], rel=1e-9)
    assert lrs["grown"][3] == lrs["grown"][6] == tiny_config().train.lr > lrs["grown"][7] > lrs["grown"][8]
