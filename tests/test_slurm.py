"""The sbatch scripts on a real single-node Slurm cluster (tests/slurm_cluster.py): the cluster itself, the
train script with 2 gloo processes, a preempted job that resumes to the same loss, hostile strings reaching
the scripts, and the residual and evaluate scripts."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import FINISHED  # noqa: E402
from test_train_faults import _experiment, losses  # noqa: E402
from train_fixtures import make_tokenized_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VENV = str(Path(sys.executable).parents[1])
ITERS = 40  # long enough that a USR1 after iteration 2 lands well before the end
pytestmark = [pytest.mark.slurm, pytest.mark.e2e,
              pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-path tests (gloo)")]


def _submit(cluster, script: str, out: Path, *args: str, **env: str) -> str:
    """sbatch ``slurm/<script>`` from the repository (the submission directory) with ``env`` exported."""
    full = {**cluster.env, "IPT_VENV": VENV, "OMP_NUM_THREADS": "1", **env}
    return cluster.sbatch(ROOT / "slurm" / script, f"--output={out}", "--open-mode=append", *args,
                          f"--account={cluster.account}", f"--partition={cluster.partition}", env=full, cwd=ROOT)


def _train(cluster, config: Path, log: Path, port: int, *args: str, **env: str) -> str:
    """slurm/train.sbatch; the log is appended to by the script's own #SBATCH --open-mode=append."""
    return cluster.sbatch(ROOT / "slurm" / "train.sbatch", f"--output={log}", *args, f"--account={cluster.account}",
                          f"--partition={cluster.partition}", cwd=ROOT,
                          env={**cluster.env, "IPT_VENV": VENV, "OMP_NUM_THREADS": "1", "CONFIG": str(config),
                               "MASTER_PORT": str(port), **env})


def _two_process_experiment(tmp: Path, tokenized: Path, iters: int, name: str) -> Path:
    return _experiment(tmp, tokenized, iters, name, parallel__nproc_per_node=2)


def _log(path: Path) -> str:
    return path.read_text()[-3000:] if path.is_file() else f"(no log at {path})"


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    return make_tokenized_dir(tmp_path_factory.mktemp("slurm_tok"), train_docs=200, heldout_docs=8)


@pytest.fixture(scope="module")
def straight_run(slurm_cluster, tokenized, tmp_path_factory):
    """An uninterrupted ITERS-iteration run of slurm/train.sbatch: (its train folder, the job's final state)."""
    tmp = tmp_path_factory.mktemp("slurm_straight")
    job = _train(slurm_cluster, _two_process_experiment(tmp, tokenized, ITERS, "straight"), tmp / "job.out", 29611)
    return tmp / "straight" / "train", slurm_cluster.wait(job, timeout=600), tmp / "job.out"


def test_the_local_cluster_runs_a_two_task_job_and_accounts_for_it(slurm_cluster, tmp_path):
    script = tmp_path / "two.sh"
    script.write_text("#!/bin/bash\nsrun --ntasks=2 bash -c 'echo task $SLURM_PROCID'\n")
    job = slurm_cluster.sbatch(script, "--ntasks=2", f"--output={tmp_path}/%j.out",
                               f"--account={slurm_cluster.account}", f"--partition={slurm_cluster.partition}")
    assert slurm_cluster.wait(job, timeout=300) == "COMPLETED"
    assert sorted((tmp_path / f"{job}.out").read_text().split("\n")[:2]) == ["task 0", "task 1"]
    assert slurm_cluster.accounting(job, "State,Account,NCPUS") == ["COMPLETED", slurm_cluster.account, "2"]


def test_train_sbatch_trains_with_two_gloo_processes_and_leaves_a_checkpoint(straight_run):
    train_dir, state, log = straight_run
    assert state == "COMPLETED", _log(log)
    manifest = json.loads((train_dir / "manifest.json").read_text())
    assert manifest["parallel"]["data_parallel_size"] == 2
    assert (train_dir / "checkpoints" / f"iter_{ITERS:07d}").is_dir()
    assert max(losses(train_dir)) == ITERS


def _preempt_requeue_and_finish(slurm_cluster, job: str, train_dir: Path, log: Path) -> dict:
    """Once ``job`` has logged iteration 2: USR1 to its batch shell (what ``--signal=B:USR1@180`` does before the
    time limit), wait for the requeue, release it and wait for it to complete. Returns its ``stopped.json``
    (checked: stopped at iteration 2 or later, before the end)."""
    metrics = train_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and '"iteration": 2,' in metrics.read_text()):
        assert time.monotonic() < deadline and slurm_cluster.state(job)[0] in ("PENDING", "RUNNING"), _log(log)
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    deadline = time.monotonic() + 300
    while (state := slurm_cluster.state(job)) != ("PENDING", 1):
        assert time.monotonic() < deadline and state[0] not in FINISHED, f"job {job} not requeued: {state}\n{_log(log)}"
        time.sleep(0.5)
    stopped = json.loads((train_dir / "stopped.json").read_text())
    assert 2 <= stopped["iteration"] < ITERS
    # Slurm holds a requeued job for two minutes (BeginTime); release it sooner, but not within the second of
    # the requeue (slurmd would refuse the new launch: "Job credential revoked")
    slurm_cluster.run("scontrol", "update", f"jobid={job}", "StartTime=now+5")
    assert slurm_cluster.wait(job, timeout=600) == "COMPLETED", _log(log)
    return stopped


def test_a_signalled_job_saves_requeues_itself_and_resumes_to_the_same_final_loss(
        slurm_cluster, straight_run, tokenized, tmp_path):
    config = _two_process_experiment(tmp_path, tokenized, ITERS, "preempted")
    log = tmp_path / "job.out"
    job = _train(slurm_cluster, config, log, 29612)
    stopped = _preempt_requeue_and_finish(slurm_cluster, job, tmp_path / "preempted" / "train", log)
    text = log.read_text()
    assert "saved and stopped" in text and f"requeueing job {job}" in text
    # both segments in one log (append mode), the second one saying where it resumed; a clean stop is no failure
    assert "starting at iteration 0" in text and f"resuming from iteration {stopped['iteration']}" in text, text
    assert "ChildFailedError" not in text and "srun: error" not in text, text
    assert not (tmp_path / "preempted" / "train" / "stopped.json").exists()
    straight_dir = straight_run[0]
    assert losses(tmp_path / "preempted" / "train")[ITERS] == losses(straight_dir)[ITERS]


HOSTILE = "x $(touch {pwned}); `touch {pwned}` \"q\" 'a' \\ $HOME *"


def test_hostile_config_paths_and_arguments_reach_the_job_literally(slurm_cluster, tokenized, tmp_path):
    pwned = tmp_path / "pwned"
    odd = tmp_path / "it's a \"dir\" $(touch pwned); x"
    odd.mkdir()
    config = _two_process_experiment(odd, tokenized, 1, "odd_run")  # name: one safe path component (issue 16)
    hostile_config = odd / "cfg 'q' $(touch x);.yaml"
    config.rename(hostile_config)
    text = HOSTILE.format(pwned=pwned)  # a free-text key (taken literally by --set) carries the hostile value
    quoted = "'" + text.replace("'", "'\\''") + "'"  # IPT_ARGS are split like a shell line, never evaluated
    log = tmp_path / "job.out"
    job = _train(slurm_cluster, hostile_config, log, 29613,
                 IPT_ARGS=f"--set train.wandb_name={quoted} --set train.eval_iters=1")
    assert slurm_cluster.wait(job, timeout=600) == "COMPLETED", _log(log)
    manifest = json.loads((odd / "odd_run" / "train" / "manifest.json").read_text())
    assert manifest["config"]["train"]["wandb_name"] == text
    assert not pwned.exists() and not (odd / "pwned").exists() and not (ROOT / "pwned").exists()
    assert not Path("x").exists() and not (ROOT / "x").exists()


def test_residual_sbatch_writes_the_instruct_model_on_a_cpu_node(slurm_cluster, tmp_path):
    from test_residual import _model, _state

    odd = tmp_path / "models 'q' $(touch pwned); x"
    base = _model(odd / "base", 0)
    instruct = _model(odd / "instruct", 1, like=base)
    cpt = _model(odd / "cpt", 2, like=base)
    output = odd / "cpt instruct"
    log = tmp_path / "job.out"
    job = _submit(slurm_cluster, "residual.sbatch", log, "--cpus-per-task=1", BASE=str(base),
                  INSTRUCT=str(instruct), CPT=str(cpt), OUTPUT=str(output), ALPHA="0.5")
    assert slurm_cluster.wait(job, timeout=300) == "COMPLETED", _log(log)
    assert json.loads((output / "residual_manifest.json").read_text())["alpha"] == 0.5
    b, i, c, o = _state(base), _state(instruct), _state(cpt), _state(output)
    assert set(o) == set(c)
    for k in c:
        assert torch.allclose(o[k], c[k] + 0.5 * (i[k] - b[k]), rtol=0, atol=1e-6), k
    assert not (odd / "pwned").exists() and not (ROOT / "pwned").exists()


def test_evaluate_sbatch_scores_a_hugging_face_folder_with_quoted_arguments(slurm_cluster, tiny_tokenizer_dir,
                                                                              tmp_path):
    import yaml
    from test_eval import tiny_hf_model

    from megatron_ipt.config import ExperimentConfig
    from megatron_ipt.manifest import write_manifest

    odd = tmp_path / "eval 'q' $(touch pwned); x"
    run = odd / "run"
    (run / "tokenized").mkdir(parents=True)
    write_manifest(run / "tokenized", stage="tokenize", fingerprint="test", config={},
                   tokenizer={"path": str(tiny_tokenizer_dir), "vocab_size": 512, "eod_id": 0})
    data = ExperimentConfig().model_dump(mode="json")
    data["run_dir"], data["model"]["seq_length"] = str(run), 64
    config = odd / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    hf = tiny_hf_model(odd / "hf model")
    task = odd / "task.jsonl"
    task.write_text(json.dumps({"text": "The while loop repeats.", "question": "What repeats?", "answer": "The loop",
                                "options": ["The loop", "Nothing"]}) + "\n")
    name = HOSTILE.format(pwned=tmp_path / "pwned")
    output = odd / "results 1.json"

    def q(value) -> str:  # one word in EVAL_ARGS
        return "'" + str(value).replace("'", "'\\''") + "'"

    log = tmp_path / "job.out"
    job = _submit(slurm_cluster, "evaluate.sbatch", log, "--cpus-per-task=1", CONFIG=str(config),
                  EVAL_ARGS=f"--hf {q(hf)} --data {q(task)} --name {q(name)} --output {q(output)}")
    assert slurm_cluster.wait(job, timeout=300) == "COMPLETED", _log(log)
    record = json.loads(output.read_text())
    assert record["model"]["name"] == name and record["n"] == 1 and record["n_multiple_choice"] == 1
    assert not (tmp_path / "pwned").exists() and not (odd / "pwned").exists() and not (ROOT / "pwned").exists()


CONTAINER_JOBS = {  # script: the variables it requires (values are never used: the container check comes first)
    "train.sbatch": {"CONFIG": "examples/quickstart.yaml"},
    "synthesize.sbatch": {"CONFIG": "examples/quickstart.yaml"},
    "tokenize.sbatch": {"INPUT_GLOB": "x/*.jsonl", "TOKENIZER": "t", "OUTPUT_PREFIX": "out/p"},
    "evaluate.sbatch": {"CONFIG": "examples/quickstart.yaml"},
    "residual.sbatch": {"CPT": "a", "OUTPUT": "b", "RESIDUAL": "c"},
}


@pytest.mark.parametrize("script", sorted(CONTAINER_JOBS))
def test_container_mode_runs_no_python_on_the_host_and_names_a_missing_pyxis(slurm_cluster, script, tmp_path):
    """With CONTAINER_IMAGE set and no Python on the host's PATH, every command (the train script's config read
    included) goes through srun --container-image; this cluster has no pyxis, which the job names in one line.
    (A real container run needs pyxis + enroot, which this machine does not have.)"""
    log = tmp_path / "job.out"
    job = _submit(slurm_cluster, script, log, "--array=0-0" if script == "synthesize.sbatch" else "--ntasks=1",
                  "--cpus-per-task=1", "--time=00:05:00",
                  CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.01-py3", CONTAINER_MOUNTS="/lustre:/lustre",
                  IPT_VENV="/nonexistent", PATH="/usr/sbin:/usr/bin:/sbin:/bin", **CONTAINER_JOBS[script])
    assert slurm_cluster.wait(job if script != "synthesize.sbatch" else f"{job}_0", timeout=120) == "FAILED"
    text = _log(log)
    assert "CONTAINER_IMAGE is set but srun has no --container-image option" in text, text
    assert "command not found" not in text and "No such file" not in text, text


def _nodes(cluster) -> int:
    out = cluster.run("sinfo", "-h", "-p", cluster.partition, "-o", "%D", check=False).stdout.split()
    return int(out[0]) if out else 0


def test_a_two_node_job_preempted_and_requeued_ends_with_the_single_node_loss_curve(
        slurm_cluster, straight_run, tokenized, tmp_path):
    """2 nodes x 1 gloo process (data parallel across the nodes, c10d rendezvous on the first node's address),
    USR1 to the job: both ranks stop and save at one iteration, the job requeues itself, resumes from the
    checkpoint on both nodes, and every iteration's loss equals the single-node 2-process run's (1e-6).
    The two nodes are two slurmd on this machine (scripts/slurm_local.sh): real Slurm multi-node allocation and
    steps, one host and one network stack."""
    if _nodes(slurm_cluster) < 2:
        pytest.skip("the local cluster has one node (IPT_SLURM_NODES=1)")
    config = _experiment(tmp_path, tokenized, ITERS, "two-nodes")  # parallel.nproc_per_node = 1
    log = tmp_path / "job.out"
    job = _train(slurm_cluster, config, log, 29614, "--nodes=2")
    stopped = _preempt_requeue_and_finish(slurm_cluster, job, tmp_path / "two-nodes" / "train", log)
    text = log.read_text()
    assert "2 node(s) x 1 process(es)" in text and f"resuming from iteration {stopped['iteration']}" in text, text
    steps = slurm_cluster.run("sacct", "-n", "-P", "-j", job, "--format=JobID,NNodes", "--duplicates").stdout
    assert any(line.split("|") == [f"{job}.0", "2"] for line in steps.split()), steps  # the torchrun step: 2 nodes
    manifest = json.loads((tmp_path / "two-nodes" / "train" / "manifest.json").read_text())
    assert manifest["parallel"]["world_size"] == 2 and manifest["parallel"]["data_parallel_size"] == 2
    two, one = losses(tmp_path / "two-nodes" / "train"), losses(straight_run[0])
    assert sorted(two) == sorted(one)
    assert all(two[i] == pytest.approx(one[i], rel=1e-6, abs=1e-6) for i in one), (two, one)


def _training_pid(config: Path, rank: str) -> int | None:
    """The pid of this config's training process with RANK=rank (read from /proc), or None."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" in cmdline and str(config).encode() in cmdline and f"RANK={rank}".encode() in environ \
                and b"megatron_ipt.cli" in cmdline and b"torch.distributed.run" not in cmdline:
            return int(proc.name)
    return None


def test_a_killed_training_process_on_one_node_ends_the_job_and_latest_names_a_complete_checkpoint(
        slurm_cluster, tokenized, tmp_path):
    if _nodes(slurm_cluster) < 2:
        pytest.skip("the local cluster has one node (IPT_SLURM_NODES=1)")
    from megatron_ipt.training.checkpoint import checkpoint_dir, latest_iteration

    config = _experiment(tmp_path, tokenized, ITERS, "killed", train__save_interval=2)
    log = tmp_path / "job.out"
    job = _train(slurm_cluster, config, log, 29615, "--nodes=2")
    checkpoints = tmp_path / "killed" / "train" / "checkpoints"
    deadline = time.monotonic() + 300
    while not ((checkpoints / "latest").is_file() and (pid := _training_pid(config, "1"))):
        assert time.monotonic() < deadline and slurm_cluster.state(job)[0] in ("PENDING", "RUNNING"), _log(log)
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)  # rank 1, the second node's training process
    killed = time.monotonic()
    state = slurm_cluster.wait(job, timeout=300)
    assert state == "FAILED", f"{state}\n{_log(log)}"
    assert time.monotonic() - killed < 120, _log(log)
    iteration = latest_iteration(checkpoints)  # raises if 'latest' names a missing folder
    assert iteration and (checkpoint_dir(checkpoints, iteration) / ".metadata").is_file()
    assert not (tmp_path / "killed" / "train" / "stopped.json").exists()
