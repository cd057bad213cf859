"""``ipt launch``: stages as NeMo-Run experiments. Command construction and option checks (fast), then a
tiny real training run through NeMo-Run's LocalExecutor with 2 gloo processes under torchrun, and one that
fails inside the job and must be reported as failed (NeMo-Run itself returns normally)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_ipt.errors import IptError
from megatron_ipt.launch.nemo import (STAGES, SlurmOptions, StageCommand, align_time_limit, environment, find_log,
                                      slurm_options)

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import make_tokenized_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_stage_command_quotes_every_value():
    hostile = "runs/x; touch /tmp/pwned $(id) `id` 'q'"
    cmd = StageCommand("train", hostile, [f"name={hostile}"], ["--force"], workdir="/a b/c", python="/v env/python")
    script = cmd.inline()
    lines = script.splitlines()
    assert lines[0] == "set -euo pipefail" and lines[1] == "cd '/a b/c'"
    assert shlex.split(lines[2]) == ["exec", "/v env/python", "-m", "megatron_ipt.cli", "train", hostile, "--set",
                                     f"name={hostile}", "--force"]
    out = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("opts, message", [
    (SlurmOptions(), "needs --account"),
    (SlurmOptions(account="a", time="90 minutes"), "expected HH:MM:SS"),
    (SlurmOptions(account="a", tunnel="ssh", host="h"), "needs --host, --user and --job-dir"),
    (SlurmOptions(account="a", nodes=0), "at least 1"),
])
def test_bad_slurm_options_are_named(opts, message):
    with pytest.raises(IptError, match=message):
        opts.check()


def test_slurm_options_merge_file_defaults_with_cli_flags():
    class Args:
        account, partition, nodes, gpus_per_node, time, tunnel = "cli", None, 2, None, None, None
        host = user = job_dir = identity = container_image = None
        container_mounts: list = []

    got = slurm_options(Args, {"account": "file", "partition": "debug", "time": "00:05:00"})
    assert (got.account, got.partition, got.nodes, got.time) == ("cli", "debug", 2, "00:05:00")
    with pytest.raises(IptError, match="slurm options"):
        slurm_options(Args, {"acount": "typo"})


def test_local_environment_puts_the_project_on_pythonpath():
    env = environment(True, {"X": "1"})
    assert env["PYTHONPATH"].split(":")[0] == str(ROOT) and env["X"] == "1"
    assert "PYTHONPATH" not in environment(False)  # remote (ssh) file systems: nothing local leaks in


def test_the_slurm_time_limit_defaults_to_the_training_budget_plus_a_save_margin():
    opts = SlurmOptions(account="a")
    align_time_limit(opts, 235)  # examples/llama3-8b-cpt.yaml: save and stop after 235 minutes
    assert opts.time == "04:00:00"
    opts = SlurmOptions(account="a")
    align_time_limit(opts, None)
    opts.check()
    assert opts.time == "01:00:00"


def test_a_time_limit_shorter_than_the_training_budget_is_refused_naming_both(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train": {"exit_duration_minutes": 235}}))
    r = _ipt("launch", str(config), "--stage", "train", "--executor", "slurm", "--account", "a", "--time", "01:00:00",
             cwd=tmp_path)
    assert r.returncode == 2
    assert "--time 01:00:00" in r.stderr and "train.exit_duration_minutes=235" in r.stderr


def test_every_pipeline_stage_can_be_launched():
    assert {"corpus", "synthesize", "format", "tokenize", "train"} <= set(STAGES)


def _tiny_experiment(tmp_path: Path, **sets) -> Path:
    run_dir = tmp_path / "run"
    make_tokenized_dir(run_dir / "tokenized", train_docs=60, heldout_docs=6)
    cfg = {"name": "tiny", "run_dir": str(run_dir),
           "model": {"preset": "llama-test", "seq_length": 64},
           "parallel": {"nproc_per_node": 2},
           "train": {"device": "cpu", "train_iters": 3, "micro_batch_size": 2, "global_batch_size": 4,
                     "lr_warmup_iters": 1, "log_interval": 1, "eval_iters": 1, "save_checkpoint": True}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _ipt(*args, cwd):
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_ipt.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
@pytest.mark.dist
def test_launch_trains_with_two_torchrun_processes_through_the_local_executor(tmp_path):
    pytest.importorskip("nemo_run")
    config = _tiny_experiment(tmp_path)
    home = tmp_path / "nemo_run"
    r = _ipt("launch", str(config), "--stage", "train", "--nemo-run-home", str(home), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SUCCEEDED" in r.stdout
    manifest = yaml.safe_load((tmp_path / "run" / "train" / "manifest.json").read_text())
    assert manifest["counts"]["iterations"] == 3
    assert manifest["parallel"]["world_size"] == 2  # torchrun started both processes, no relaunch
    log = find_log(next((home / "experiments" / "ipt-train-tiny").iterdir()))
    text = log.read_text()
    assert "[default0]:iteration 3/3" in text  # torchrun's rank-prefixed output of the training (rank 0 logs)


@pytest.mark.e2e
@pytest.mark.dist
def test_a_task_failing_inside_is_reported_as_failed_with_its_log(tmp_path):
    pytest.importorskip("nemo_run")
    config = _tiny_experiment(tmp_path)
    home = tmp_path / "nemo_run"
    # 2 processes cannot hold tensor_model_parallel_size 3: the config loads, the job fails inside
    r = _ipt("launch", str(config), "--stage", "train", "--set", "parallel.tensor_model_parallel_size=3",
             "--nemo-run-home", str(home), cwd=tmp_path)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    line = [x for x in r.stderr.splitlines() if x.startswith("ipt launch: error:")]
    assert line and "task 'train'" in line[0] and "ended FAILED" in line[0] and "log: " in line[0]
    log = Path(line[0].rsplit("log: ", 1)[1])
    assert log.is_file() and str(home) in str(log)
    assert "not divisible by tensor_model_parallel_size 3" in log.read_text()
    assert not (tmp_path / "run" / "train" / "manifest.json").exists()


def test_slurm_without_a_container_refuses_paths_nemo_run_would_rewrite(tmp_path):
    from megatron_ipt.launch.nemo import launch_stage

    cmd = StageCommand("train", "/data/nemo_run/exp.yaml", workdir=str(tmp_path))
    with pytest.raises(IptError, match="config '/data/nemo_run/exp.yaml' contains '/nemo_run'"):
        launch_stage(cmd, executor="slurm", slurm=SlurmOptions(account="a"), nemo_run_home=tmp_path / "home")
    with pytest.raises(IptError, match="NeMo-Run home .* contains '/nemo_run'"):
        launch_stage(StageCommand("train", "/x.yaml"), executor="slurm", slurm=SlurmOptions(account="a"),
                     nemo_run_home=tmp_path / "nemo_run")
    ssh = SlurmOptions(account="a", tunnel="ssh", host="h", user="u", job_dir="/lustre/me/nemo_run")
    with pytest.raises(IptError, match="--job-dir '/lustre/me/nemo_run' contains '/nemo_run'"):
        launch_stage(StageCommand("train", "x.yaml"), executor="slurm", slurm=ssh)


@pytest.mark.e2e
@pytest.mark.slurm
def test_launch_trains_with_torchrun_inside_a_slurm_job(slurm_cluster, tmp_path):
    """SlurmExecutor (LocalTunnel) on the local cluster: one task running torchrun with 2 gloo processes."""
    pytest.importorskip("nemo_run")
    config = _tiny_experiment(tmp_path)
    home = tmp_path / "nr_home"
    env = {**slurm_cluster.env, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "megatron_ipt.cli", "launch", str(config), "--stage", "train",
                        "--executor", "slurm", "--account", slurm_cluster.account, "--partition",
                        slurm_cluster.partition, "--time", "00:10:00", "--nemo-run-home", str(home)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = Path(r.stdout.strip().rsplit("log: ", 1)[1])
    assert log.name.startswith(f"log-{slurm_cluster.account}") and "iteration 3/3" in log.read_text()
    manifest = yaml.safe_load((tmp_path / "run" / "train" / "manifest.json").read_text())
    assert manifest["parallel"]["world_size"] == 2 and manifest["counts"]["iterations"] == 3


@pytest.mark.e2e
@pytest.mark.slurm
def test_launch_trains_across_two_slurm_nodes_with_one_process_each(slurm_cluster, tmp_path):
    """SlurmExecutor with --nodes 2 on the local two-node cluster (two slurmd on this machine): NeMo-Run's
    torchrun launcher, one process per node, data parallel across the nodes."""
    pytest.importorskip("nemo_run")
    nodes = slurm_cluster.run("sinfo", "-h", "-p", slurm_cluster.partition, "-o", "%D").stdout.split()
    if not nodes or int(nodes[0]) < 2:
        pytest.skip("the local cluster has one node (IPT_SLURM_NODES=1)")
    config = _tiny_experiment(tmp_path)
    home = tmp_path / "nr_home"
    env = {**slurm_cluster.env, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "megatron_ipt.cli", "launch", str(config), "--stage", "train",
                        "--set", "parallel.nproc_per_node=1", "--executor", "slurm", "--nodes", "2",
                        "--account", slurm_cluster.account, "--partition", slurm_cluster.partition,
                        "--time", "00:10:00", "--nemo-run-home", str(home)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    manifest = yaml.safe_load((tmp_path / "run" / "train" / "manifest.json").read_text())
    assert manifest["parallel"]["world_size"] == 2 and manifest["counts"]["iterations"] == 3
    job = Path(r.stdout.strip().rsplit("log: ", 1)[1]).name.rsplit("_", 2)[-2]
    steps = [line.split("|") for line in
             slurm_cluster.run("sacct", "-n", "-P", "-j", job, "--format=JobID,NNodes").stdout.split()]
    # NeMo-Run's script runs a one-node step first (the head node's address), then torchrun on both nodes
    assert any(step.split(".")[-1].isdigit() and "." in step and nnodes == "2" for step, nnodes in steps), steps


HOSTILE = "$(touch pwned_dollar) `touch pwned_tick`; touch pwned_semi && echo 'q\" x"  # relative: bash runs in tmp_path


def _stub_slurm(bin_dir: Path, record: Path) -> None:
    """srun / scontrol / sbatch / squeue / scancel stubs that only record their arguments and the task's hostile
    environment (srun), so the sbatch script runs under bash without a cluster."""
    bin_dir.mkdir()
    for name in ("srun", "scontrol", "sbatch", "squeue", "scancel", "sacct"):
        stub = bin_dir / name
        stub.write_text(f'#!/bin/bash\nprintf "%s\\0" {name} "$@" >> {shlex.quote(str(record))}\n'
                        f'printf "X=%s\\0Y=%s\\0" "$X" "$Y" >> {shlex.quote(str(record))}\n'
                        'case "$*" in *hostnames*) echo node1;; esac\n')
        stub.chmod(0o755)


def test_the_sbatch_script_nemo_run_writes_runs_no_hostile_value(tmp_path):
    """NeMo-Run's own sbatch script (its dryrun, SlurmExecutor with a local tunnel and torchrun) with hostile
    environment values, config path, overrides and working folder, run under bash with Slurm stubbed: nothing
    executes, and the task's environment holds the values unchanged."""
    pytest.importorskip("nemo_run")
    evil = HOSTILE
    work = tmp_path / f"work {evil}"
    work.mkdir()
    config = work / "c.yaml"
    config.write_text("name: x\n")
    record = tmp_path / "record"
    _stub_slurm(tmp_path / "bin", record)
    # the script exports this process's PATH behind the venv's bin: the stubs come before any real Slurm
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    r = subprocess.run([sys.executable, "-m", "megatron_ipt.cli", "launch", str(config), "--stage", "train", "--set",
                        f"run_dir=/r/{evil}", "--set", f"train.wandb_name={evil}", "--set", "parallel.nproc_per_node=2",
                        "--executor", "slurm", "--account", "acct", "--partition", "p", "--time", "00:10:00",
                        "--workdir", str(work), "--python", f"/v {evil}/python", "--env", f"X={evil}", "--env",
                        "Y=it's a b", "--nemo-run-home", str(tmp_path / "home"), "--dry-run"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    script = Path(r.stdout.strip().splitlines()[-1])
    assert script.is_file()
    env = {"PATH": env["PATH"], "SLURM_JOB_NODELIST": "node1", "HOME": str(tmp_path)}
    r = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not list(tmp_path.glob("pwned*")), r.stderr[-3000:]
    calls = record.read_text().split("\0")
    assert f"X={evil}" in calls and "Y=it's a b" in calls  # the task sees the values as given
    task = Path(calls[calls.index("--no-python") + 1])  # NeMo-Run's task script, which torchrun runs
    assert shlex.split(task.read_text().splitlines()[-1])[1:4] == [f"/v {evil}/python", "-m", "megatron_ipt.cli"]
    subprocess.run(["bash", "-n", str(task)], check=True)


@pytest.mark.parametrize("options, message", [
    ({"title": "ipt $(touch x)"}, "experiment name 'ipt $(touch x)'"),
    ({"nemo_run_home": "/tmp/a b"}, "NeMo-Run home '/tmp/a b'"),
    ({"slurm": SlurmOptions(account="a;touch x")}, "--account 'a;touch x'"),
    ({"slurm": SlurmOptions(account="a", tunnel="ssh", host="h", user="u", job_dir="/j/$(touch x)")},
     "--job-dir '/j/$(touch x)'"),
    ({"env": {"A B": "1"}}, "--env 'A B': a variable name"),
])
def test_values_nemo_run_would_put_into_a_shell_unquoted_are_refused(tmp_path, options, message):
    pytest.importorskip("nemo_run")
    from megatron_ipt.launch.nemo import prepare_stage

    options = {"slurm": SlurmOptions(account="a"), "nemo_run_home": tmp_path / "home", **options}
    with pytest.raises(IptError, match=re.escape(message)):
        prepare_stage(StageCommand("train", "/x.yaml", workdir=str(tmp_path)), executor="slurm", **options)
    assert not list(tmp_path.glob("x"))
