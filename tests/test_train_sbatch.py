"""slurm/train.sbatch run as Slurm would run its batch shell, on this machine without a cluster (one node,
2 gloo processes): it trains, and a USR1 (Slurm's --signal before the time limit) makes training save and
stop; the rerun (what a requeued job does) ends with the same final loss as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_train_faults import _experiment, losses  # noqa: E402
from train_fixtures import make_tokenized_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-path test"), pytest.mark.dist, pytest.mark.e2e]


def _script(config: Path, **env) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full.update(CONFIG=str(config), GPUS_PER_NODE="2", IPT_VENV=str(Path(sys.executable).parents[1]),
                MASTER_PORT=str(29500 + os.getpid() % 1000), OMP_NUM_THREADS="1", SLURM_SUBMIT_DIR=str(ROOT), **env)
    return subprocess.Popen(["bash", str(ROOT / "slurm/train.sbatch")], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_train_sbatch_trains_and_a_usr1_saves_stops_and_resumes_to_the_same_loss(tmp_path):
    tokenized = make_tokenized_dir(tmp_path / "tok", train_docs=200, heldout_docs=8)
    iters = 24
    straight = _experiment(tmp_path, tokenized, iters, "straight")
    out = _script(straight).communicate(timeout=600)[0]
    assert (tmp_path / "straight" / "train" / "manifest.json").is_file(), out[-3000:]
    assert json.loads((tmp_path / "straight" / "train" / "manifest.json").read_text())["parallel"]["data_parallel_size"] == 2

    preempted = _experiment(tmp_path, tokenized, iters, "preempted")
    proc = _script(preempted)
    metrics = tmp_path / "preempted" / "train" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and '"iteration": 3' in metrics.read_text():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # to the batch shell only, as --signal=B:USR1 does
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 3, out[-3000:]
    assert "saved and stopped" in out
    stopped = json.loads((tmp_path / "preempted" / "train" / "stopped.json").read_text())
    assert 3 <= stopped["iteration"] < iters
    out = _script(preempted).communicate(timeout=600)[0]  # the requeued job
    assert (tmp_path / "preempted" / "train" / "manifest.json").is_file(), out[-3000:]
    assert losses(tmp_path / "preempted" / "train")[iters] == pytest.approx(
        losses(tmp_path / "straight" / "train")[iters], rel=1e-6, abs=1e-6)
