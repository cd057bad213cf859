"""User-facing errors of the training side and the CLI.

Anything raised as an :class:`IptError` is a problem the user can fix (a config key, a missing input, a
layout that does not divide); the ``ipt`` command prints its one-line message and exits with status 2
instead of a traceback. Plain Python, no torch: imported by the CLI before any heavy import.
"""


class IptError(Exception):
    """Base of errors whose message is meant for the user."""


class LaunchError(IptError, RuntimeError):
    """Worker processes of a launched stage failed; their own output says why."""


class TrainingStopped(IptError):
    """Training saved a checkpoint and stopped early on request (SIGTERM/SIGUSR1, exit_duration_minutes);
    rerunning the same command resumes. ``ipt`` exits with :attr:`exit_code` (3), distinct from errors (2),
    so a job script can requeue on it."""

    exit_code = 3


class UntrustedCheckpointError(IptError):
    """A checkpoint's pickles name a class outside the data classes a torch_dist checkpoint holds (loading it could
    run code); see :mod:`megatron_ipt.training.checkpoint_trust`. ``--trust-checkpoint`` skips the check."""
