"""slurm/train.sbatch run as Slurm would run its batch shell, on this machine without a cluster (one node,
gloo processes): it trains with the config's processes per node, a USR1 (Slurm's --signal before the time
limit) makes training save and stop and the rerun (what a requeued job does) ends with the same final loss,
and it sets the process environment the layout needs."""

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
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_train_faults import _experiment, losses  # noqa: E402
from train_fixtures import make_tokenized_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "train.sbatch"
pytestmark = [pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-path test"), pytest.mark.dist, pytest.mark.e2e]


def _script(config: Path, script: Path = SCRIPT, **env) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "OMP_NUM_THREADS"}
    full.update(CONFIG=str(config), IPT_VENV=str(Path(sys.executable).parents[1]),
                MASTER_PORT=str(29500 + os.getpid() % 1000), SLURM_SUBMIT_DIR=str(ROOT), **env)
    return subprocess.Popen(["bash", str(script)], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _manifest(run: Path) -> dict:
    return json.loads((run / "train" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    return make_tokenized_dir(tmp_path_factory.mktemp("tok"), train_docs=200, heldout_docs=8)


def test_train_sbatch_trains_and_a_usr1_saves_stops_and_resumes_to_the_same_loss(tokenized, tmp_path):
    iters = 24
    straight = _experiment(tmp_path, tokenized, iters, "straight", parallel__nproc_per_node=2)
    out = _script(straight).communicate(timeout=600)[0]
    assert (tmp_path / "straight" / "train" / "manifest.json").is_file(), out[-3000:]
    assert _manifest(tmp_path / "straight")["parallel"]["data_parallel_size"] == 2

    preempted = _experiment(tmp_path, tokenized, iters, "preempted", parallel__nproc_per_node=2)
    # the run folder comes from IPT_ARGS, not the file: the script must look for stopped.json where training
    # wrote it (it once resolved the folder without the overrides and never requeued)
    data = yaml.safe_load(preempted.read_text())
    data["run_dir"] = str(tmp_path / "not-this-folder")
    preempted.write_text(yaml.safe_dump(data))
    overrides = {"IPT_ARGS": f"--set run_dir={tmp_path / 'preempted'}"}
    proc = _script(preempted, **overrides)
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
    # a clean save-and-stop is no failure for torchrun (no ChildFailedError traceback)
    assert "ChildFailedError" not in out and "Traceback" not in out, out[-3000:]
    stopped = json.loads((tmp_path / "preempted" / "train" / "stopped.json").read_text())
    assert 3 <= stopped["iteration"] < iters
    out = _script(preempted, **overrides).communicate(timeout=600)[0]  # the requeued job
    assert f"resuming from iteration {stopped['iteration']}" in out, out[-3000:]
    assert (tmp_path / "preempted" / "train" / "manifest.json").is_file(), out[-3000:]
    resumed, straight = losses(tmp_path / "preempted" / "train"), losses(tmp_path / "straight" / "train")
    assert sorted(resumed) == sorted(straight)  # the stopped iteration's record too
    assert resumed[iters] == pytest.approx(straight[iters], rel=1e-6, abs=1e-6)
    assert not (tmp_path / "not-this-folder").exists()


def test_processes_per_node_come_from_the_config_not_a_default_of_eight(tokenized, tmp_path):
    config = _experiment(tmp_path, tokenized, 2, "one")  # parallel.nproc_per_node = 1
    out = _script(config).communicate(timeout=600)[0]
    assert "1 node(s) x 1 process(es)" in out, out[-3000:]
    assert _manifest(tmp_path / "one")["parallel"]["world_size"] == 1


def test_a_gpus_per_node_that_contradicts_the_config_is_refused_naming_the_key(tokenized, tmp_path):
    config = _experiment(tmp_path, tokenized, 2, "mismatch")
    proc = _script(config, GPUS_PER_NODE="2")
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2, out[-3000:]
    assert "GPUS_PER_NODE=2" in out and "parallel.nproc_per_node=1" in out
    assert not (tmp_path / "mismatch" / "train" / "metrics.jsonl").exists()


def test_a_tensor_parallel_layout_trains_with_one_cuda_connection_and_a_thread_share_per_process(tokenized, tmp_path):
    config = _experiment(tmp_path, tokenized, 2, "tp2", parallel__nproc_per_node=2,
                         parallel__tensor_model_parallel_size=2)
    out = _script(config).communicate(timeout=600)[0]
    assert (tmp_path / "tp2" / "train" / "manifest.json").is_file(), out[-3000:]
    env = _manifest(tmp_path / "tp2")["train"]["environment"]
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
