"""A real single-node Slurm cluster for the tests: the session fixture ``slurm_cluster``.

The fixture runs ``scripts/slurm_local.sh up`` (slurmctld, slurmd, slurmdbd with MariaDB, munge; Debian
packages installed when missing) and stops the cluster by pid at the end of the session if this session
started it; a cluster already running in the state folder is reused and left running. Without root and
without a running cluster the tests that use it are skipped; with root a failed bring-up is an error.

Environment: ``IPT_SLURM_STATE`` (state folder, default /tmp/ipt-slurm; other variables of
slurm_local.sh apply too), ``IPT_SLURM_KEEP=1`` to leave a cluster this session started running,
``IPT_SLURM=0`` to skip the Slurm tests (CI's second leg: they run once, in the first).
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_local.sh"
FINISHED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                      "BOOT_FAIL", "DEADLINE"})


@dataclass(frozen=True)
class SlurmCluster:
    """A running local cluster: its slurm.conf, the environment for Slurm commands, account and partition."""

    state_dir: Path
    conf: Path
    account: str
    partition: str
    env: dict[str, str] = field(repr=False)

    def run(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """Run a Slurm client command (``sbatch``, ``squeue``, ...) against this cluster; text output."""
        return subprocess.run(list(args), env=kwargs.pop("env", self.env), capture_output=True, text=True,
                              check=check, **kwargs)

    def sbatch(self, script: str | Path, *args: str, env: dict[str, str] | None = None,
               cwd: str | Path | None = None) -> str:
        """Submit ``script`` (``sbatch --parsable ARGS SCRIPT``); returns the job id."""
        out = self.run("sbatch", "--parsable", *args, str(script), env=env or self.env, cwd=cwd)
        return out.stdout.strip().split(";")[0]

    def state(self, job_id: str) -> tuple[str, int]:
        """The job's state and restart count from ``scontrol show job`` (('', 0) once slurmctld forgot it)."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
        return fields.get("JobState", ""), int(fields.get("Restarts", 0))

    def wait(self, job_id: str, *, timeout: float = 600, until: frozenset[str] = FINISHED) -> str:
        """Poll until the job reaches one of ``until`` (default: any final state); returns that state.

        Raises TimeoutError naming the job and its last state."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.state(job_id)[0]
            if state in until:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"Slurm job {job_id} still {state or 'unknown'} after {timeout:.0f} s")


    def accounting(self, job_id: str, fields: str = "State", *, timeout: float = 60) -> list[str]:
        """The job's ``sacct -X`` record (``fields``, State first), polled until slurmdbd has its final state.

        slurmctld reports the end of a job before slurmdbd has stored it (the record is sent asynchronously),
        so a ``sacct`` right after :meth:`wait` can still say PENDING or RUNNING. Raises TimeoutError with the
        last record."""
        assert fields.split(",")[0] == "State", "State must be the first field"
        deadline = time.monotonic() + timeout
        record: list[str] = []
        while time.monotonic() < deadline:
            out = self.run("sacct", "-n", "-X", "-P", "-j", job_id, f"--format={fields}", check=False).stdout
            record = out.strip().split("|") if out.strip() else []
            if record and record[0].split()[0] in FINISHED:
                return record
            time.sleep(0.5)
        raise TimeoutError(f"slurmdbd has no final record of job {job_id} after {timeout:.0f} s (last: {record})")

def _script(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local Slurm cluster (brought up when needed; stopped at session end if this session started it)."""
    if os.environ.get("IPT_SLURM") == "0":
        pytest.skip("Slurm tests are off (IPT_SLURM=0)")
    state_dir = Path(os.environ.get("IPT_SLURM_STATE", "/tmp/ipt-slurm"))
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not a job's variables
    base["IPT_SLURM_STATE"] = str(state_dir)
    started = _script("status", base).returncode != 0
    if started:
        if os.geteuid() != 0:
            pytest.skip(f"no Slurm cluster running in {state_dir} and bringing one up needs root "
                        "(scripts/slurm_local.sh up)")
        up = _script("up", base)
        if up.returncode != 0:
            pytest.fail(f"scripts/slurm_local.sh up failed ({up.returncode}): {up.stderr[-3000:]}")
    conf = state_dir / "etc" / "slurm.conf"
    cluster = SlurmCluster(state_dir=state_dir, conf=conf, env={**base, "SLURM_CONF": str(conf)},
                           account=os.environ.get("IPT_SLURM_ACCOUNT", "ipt"),
                           partition=os.environ.get("IPT_SLURM_PARTITION", "local"))
    yield cluster
    if started and os.environ.get("IPT_SLURM_KEEP") != "1":
        _script("down", base)
