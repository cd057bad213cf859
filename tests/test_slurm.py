"""The sbatch scripts on a real single-node Slurm cluster (tests/slurm_cluster.py): the cluster itself, the
train script with 2 gloo processes, a preempted job that resumes to the same loss, hostile strings reaching
the scripts, and the residual script."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]


def test_the_local_cluster_runs_a_two_task_job_and_accounts_for_it(slurm_cluster, tmp_path):
    script = tmp_path / "two.sh"
    script.write_text("#!/bin/bash\nsrun --ntasks=2 bash -c 'echo task $SLURM_PROCID'\n")
    job = slurm_cluster.sbatch(script, "--ntasks=2", f"--output={tmp_path}/%j.out",
                               f"--account={slurm_cluster.account}", f"--partition={slurm_cluster.partition}")
    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED"
    assert sorted((tmp_path / f"{job}.out").read_text().split("\n")[:2]) == ["task 0", "task 1"]
    sacct = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", job, "--format=State,Account,NCPUS").stdout
    assert sacct.strip() == f"COMPLETED|{slurm_cluster.account}|2"
