"""Start several training processes on this machine by re-executing the command under torchrun.

``ipt train`` with ``parallel.nproc_per_node > 1``, started from a plain shell, calls
:func:`relaunch_under_torchrun` first: the process replaces itself with
``python -m torch.distributed.run --standalone --nproc_per_node N <argv>``, and each of the N
children (which see ``WORLD_SIZE`` / ``LOCAL_RANK``) runs the same command and trains. Under torchrun
or srun already, or with one process, nothing happens.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from megatron_ipt.training.parallel import launched_by_torchrun


def torchrun_command(argv: Sequence[str], nproc_per_node: int, python: str | None = None) -> list[str]:
    """The command line that runs ``argv`` under torchrun with ``nproc_per_node`` local processes.

    ``argv`` is what follows ``python`` (a script path and its arguments, or ``-m module ...``;
    torchrun accepts ``-m`` too). Pitfall: torchrun's argparse matches abbreviations anywhere in the
    line, so a script option that is a prefix of a torchrun option (``--nproc``, ``--node``) is
    rejected as ambiguous; ``--set`` and ``--config`` are safe.
    """
    argv = list(argv)
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc_per_node}", *argv]


def needs_relaunch(nproc_per_node: int) -> bool:
    """True when more than one process is wanted and this process was not started by torchrun/srun."""
    return nproc_per_node > 1 and not launched_by_torchrun()


def relaunch_under_torchrun(argv: Sequence[str], nproc_per_node: int) -> None:
    """Replace this process with ``torchrun --standalone --nproc_per_node N argv`` when :func:`needs_relaunch`.

    Returns (doing nothing) otherwise; does not return when it relaunches (``os.execv``), and the exit
    status of torchrun becomes this command's.
    """
    if not needs_relaunch(nproc_per_node):
        return
    command = torchrun_command(argv, nproc_per_node)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
