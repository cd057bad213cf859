"""Run an ``ipt`` stage as a NeMo-Run experiment: on this machine (LocalExecutor) or on Slurm (SlurmExecutor).

The one seam to NeMo-Run (PyPI ``nemo-run`` 0.11, extra ``launch``): everything that imports ``nemo_run``
lives here, so a version bump touches one file. A stage runs as a ``run.Script`` (an inline bash script that
``cd``s to the working folder and ``exec``s ``python -m megatron_ipt.cli STAGE CONFIG --set ...``), added to a
named ``run.Experiment`` and waited for.

- ``train`` with several processes per node (``parallel.nproc_per_node``) or several nodes goes through
  NeMo-Run's torchrun launcher: each process sees ``RANK``/``WORLD_SIZE`` and trains (no relaunch).
  Other stages run as one task (``run``'s own train stage relaunches itself under torchrun when
  ``nproc_per_node > 1``, on one node).
- Slurm: ``account`` is required; a ``LocalTunnel`` (submitting from a login node) needs NeMo-Run's job
  folder left at its default (``job_dir=""``, i.e. ``$NEMORUN_HOME/experiments``), an ``SSHTunnel`` needs
  host, user and a job folder on the cluster. A container image (pyxis) is optional.
- NeMo-Run returns normally when the job failed inside (source: NeMo-Run 0.11 ``Experiment.__exit__`` waits
  and only prints the status). :func:`run_experiment` reads ``exp.status(return_dict=True)`` afterwards and
  raises :class:`LaunchFailed` naming the task and its log file unless the task ``SUCCEEDED``.

Logs: ``$NEMORUN_HOME/experiments/<title>/<title>_<id>/<task>/`` (local: ``nemo_run/<app>/<task>/0/combined.log``;
Slurm: ``log-<account>-<account>.<task>_<jobid>_0.out``); the error message gives the path.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron_ipt.errors import IptError, LaunchError

STAGES = ("train", "run", "corpus", "synthesize", "format", "tokenize", "eval")
REPO_ROOT = Path(__file__).resolve().parents[2]  # the folder holding megatron_ipt/ and data_prep/


class LaunchFailed(LaunchError):
    """A NeMo-Run task ended in a state other than SUCCEEDED; the message names the task and its log."""


@dataclass
class SlurmOptions:
    """What ``SlurmExecutor`` needs: account (required), partition, nodes, time limit (HH:MM:SS), tunnel.

    ``tunnel``: ``local`` (sbatch on this machine, e.g. a login node) or ``ssh`` (``host``, ``user`` and
    ``job_dir``, a folder on the cluster for NeMo-Run's job files). ``container_image``: run inside this
    image with pyxis (``container_mounts`` as ``src:dst``); none runs in the plain environment.
    """

    account: str | None = None
    partition: str | None = None
    nodes: int = 1
    time: str | None = None  # None: 01:00:00, or for training the config's exit_duration_minutes + SAVE_MARGIN
    gpus_per_node: int | None = None
    tunnel: str = "local"
    host: str | None = None
    user: str | None = None
    job_dir: str | None = None
    identity: str | None = None
    container_image: str | None = None
    container_mounts: list[str] = field(default_factory=list)

    def check(self) -> None:
        """Raise IptError naming the missing or bad option."""
        if not self.account:
            raise IptError("the slurm executor needs --account (NeMo-Run's SlurmExecutor requires it)")
        if self.nodes < 1:
            raise IptError(f"--nodes {self.nodes}: must be at least 1")
        self.time = self.time or DEFAULT_TIME
        if not re.fullmatch(r"(\d+-)?\d{1,2}(:\d{2}){0,2}", self.time):
            raise IptError(f"--time {self.time!r}: expected HH:MM:SS (or D-HH:MM:SS)")
        if self.tunnel not in ("local", "ssh"):
            raise IptError(f"--tunnel {self.tunnel!r}: expected local or ssh")
        if self.tunnel == "ssh" and not (self.host and self.user and self.job_dir):
            raise IptError("--tunnel ssh needs --host, --user and --job-dir (a folder on the cluster for job files)")


DEFAULT_TIME = "01:00:00"
SAVE_MARGIN_MINUTES = 5  # between train.exit_duration_minutes and the Slurm time limit: the final save, the exit


def minutes(limit: str) -> float:
    """Minutes in a Slurm time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    days, _, rest = limit.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:
        h, m, sec = (parts + [0, 0])[:3]
        return int(days) * 1440 + h * 60 + m + sec / 60
    if len(parts) == 3:
        return parts[0] * 60 + parts[1] + parts[2] / 60
    return parts[0] + (parts[1] / 60 if len(parts) == 2 else 0)


def align_time_limit(opts: SlurmOptions, exit_duration_minutes: float | None) -> None:
    """Fit the job's time limit to the config's training budget (``train.exit_duration_minutes``): without
    ``--time`` the limit becomes the budget plus :data:`SAVE_MARGIN_MINUTES` (235 -> 04:00:00); a ``--time``
    that leaves no room to save after the budget is an error naming both."""
    if not exit_duration_minutes:
        return
    needed = exit_duration_minutes + SAVE_MARGIN_MINUTES
    if opts.time is None:
        total = math.ceil(needed)
        opts.time = f"{total // 1440}-{total % 1440 // 60:02d}:{total % 60:02d}:00" if total >= 1440 else \
            f"{total // 60:02d}:{total % 60:02d}:00"
    elif re.fullmatch(r"(\d+-)?\d{1,2}(:\d{2}){0,2}", opts.time) and minutes(opts.time) < needed:
        raise IptError(f"--time {opts.time} ends before train.exit_duration_minutes={exit_duration_minutes:g} plus "
                       f"{SAVE_MARGIN_MINUTES} minutes to save: raise --time or lower train.exit_duration_minutes")


@dataclass
class StageCommand:
    """One ``ipt`` invocation: ``python -m megatron_ipt.cli STAGE CONFIG [--set K=V ...] [extra args]``, run
    from ``workdir`` (relative paths in the config resolve there)."""

    stage: str
    config: str
    overrides: list[str] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)
    workdir: str = field(default_factory=os.getcwd)
    python: str = sys.executable

    def argv(self) -> list[str]:
        sets = [a for kv in self.overrides for a in ("--set", kv)]
        return [self.python, "-m", "megatron_ipt.cli", self.stage, self.config, *sets, *self.extra_args]

    def inline(self) -> str:
        """The bash script body: every value quoted, so config paths or overrides cannot inject commands."""
        return f"set -euo pipefail\ncd {shlex.quote(self.workdir)}\nexec {shlex.join(self.argv())}\n"


@dataclass
class LaunchResult:
    """What :func:`run_experiment` found after the task ended."""

    experiment_id: str
    task: str
    status: str
    job_dir: str
    log: Path | None


def _nemo_run():
    try:
        import nemo_run
    except ImportError as e:
        raise IptError(f"NeMo-Run is not installed ({e}); install the launch extra: pip install -e '.[launch]' "
                       "(nemo-run 0.11 with leptonai<0.47)") from None
    return nemo_run


def environment(local: bool, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Variables the task needs: on this machine's file system (local executor or local tunnel) the
    project's folder on ``PYTHONPATH`` and the virtual environment's ``bin`` on ``PATH``; plus ``extra``."""
    env: dict[str, str] = {}
    if local:
        py_path = os.environ.get("PYTHONPATH", "")
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + py_path if py_path else "")
        venv = os.environ.get("VIRTUAL_ENV") or (sys.prefix if sys.prefix != sys.base_prefix else None)
        if venv:
            env["VIRTUAL_ENV"] = venv
            env["PATH"] = str(Path(venv) / "bin") + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin")
    env.update(extra or {})
    return env


def build_script(command: StageCommand, env: dict[str, str] | None = None):
    """A ``run.Script`` running ``command`` (an inline bash script; torchrun runs it with ``--no-python``)."""
    run = _nemo_run()
    return run.Script(inline=command.inline(), env=dict(env or {}))


def local_executor(ntasks_per_node: int = 1, env: dict[str, str] | None = None):
    """``run.LocalExecutor``; with more than one task, NeMo-Run's torchrun launcher starts them."""
    run = _nemo_run()
    launcher = "torchrun" if ntasks_per_node > 1 else None
    return run.LocalExecutor(ntasks_per_node=ntasks_per_node, launcher=launcher, env_vars=dict(env or {}))


def slurm_executor(opts: SlurmOptions, ntasks_per_node: int = 1, env: dict[str, str] | None = None):
    """``run.SlurmExecutor`` for ``opts``; torchrun per node when more than one process or node is wanted."""
    opts.check()
    run = _nemo_run()
    if opts.tunnel == "ssh":
        tunnel = run.SSHTunnel(host=opts.host, user=opts.user, job_dir=opts.job_dir, identity=opts.identity)
    else:
        tunnel = run.LocalTunnel(job_dir="")  # a local tunnel copies nothing: keep NeMo-Run's own job folder
    torchrun = ntasks_per_node > 1 or opts.nodes > 1
    return run.SlurmExecutor(
        account=opts.account, partition=opts.partition, nodes=opts.nodes, ntasks_per_node=ntasks_per_node,
        time=opts.time, gpus_per_node=opts.gpus_per_node, tunnel=tunnel, packager=run.Packager(),
        container_image=opts.container_image, container_mounts=list(opts.container_mounts),
        launcher="torchrun" if torchrun else None, env_vars=dict(env or {}))


def find_log(job_dir: str | Path) -> Path | None:
    """The newest task log under a NeMo-Run job folder (local ``combined.log`` or Slurm ``*.out``), or None."""
    job_dir = Path(job_dir)
    if not job_dir.is_dir():
        return None
    # in this order: LocalExecutor's task log, the Slurm task's srun output, sbatch's own output, stderr
    for pattern in ("**/combined.log", "**/log-*.out", "**/*.out", "**/stderr.log"):
        logs = list(job_dir.glob(pattern))
        if logs:
            return max(logs, key=lambda p: p.stat().st_mtime)
    return None


def _tail(path: Path | None, lines: int = 25) -> str:
    if path is None:
        return ""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_experiment(title: str, task: str, script, executor, nemo_run_home: str | Path | None = None) -> LaunchResult:
    """Run ``script`` on ``executor`` as task ``task`` of a new experiment ``title``, wait, and check it.

    Returns the LaunchResult when the task SUCCEEDED; raises :class:`LaunchFailed` (naming the task, its final
    state and the log file; the log's last lines go to stderr) otherwise. ``nemo_run_home`` sets
    ``$NEMORUN_HOME`` (experiments and logs go under its ``experiments/``).
    """
    run = _nemo_run()
    if nemo_run_home is not None:
        home = str(Path(nemo_run_home).resolve())
        os.environ["NEMORUN_HOME"] = home
        run.config.set_nemorun_home(home)
    with run.Experiment(title, executor=executor, log_level="WARN", enable_goodbye_message=False) as exp:
        exp.add(script, name=task, tail_logs=False)
        exp.run(sequential=True)
    states = exp.status(return_dict=True) or {}
    info = states.get(task) or next(iter(states.values()), {})
    status = getattr(info.get("status"), "name", str(info.get("status", "UNKNOWN")))
    job_dir = info.get("local_dir") or getattr(executor, "job_dir", "")
    log = find_log(job_dir)
    result = LaunchResult(exp._id, task, status, job_dir, log)
    if status != "SUCCEEDED":
        tail = _tail(log)
        if tail:
            print(f"--- last lines of {log}\n{tail}\n---", file=sys.stderr)
        raise LaunchFailed(f"NeMo-Run task '{task}' of experiment {exp._id} ended {status}; "
                           f"log: {log or job_dir or 'not found'}")
    return result


def _check_rundir_substitution(command: StageCommand, nemo_run_home, local: bool, remote_job_dir=None) -> None:
    """NeMo-Run 0.11's SlurmExecutor without a container replaces every ``/nemo_run`` in the sbatch script and
    the task script by the job folder (its container mount point), wherever it appears (seen here: a
    NEMORUN_HOME under ``.../nemo_run`` made sbatch's --output a path that does not exist). Refuse such paths."""
    from_home = str(Path(nemo_run_home or os.environ.get("NEMORUN_HOME", "~/.nemo_run")).expanduser().resolve())
    for what, value in (("NeMo-Run home", from_home if local else ""), ("--job-dir", remote_job_dir or ""),
                        ("--workdir", command.workdir),
                        ("config", command.config), ("--python", command.python),
                        *(("--set", kv) for kv in command.overrides)):
        if "/nemo_run" in value:
            raise IptError(f"{what} {value!r} contains '/nemo_run', which NeMo-Run's SlurmExecutor (without a "
                           "container) rewrites to its job folder; use another folder name")


SHELL_SAFE = re.compile(r"[A-Za-z0-9_./~+@,:=-]+")
"""Characters a value may hold where NeMo-Run 0.11 writes it into a shell command unquoted: the job folder
(``$NEMORUN_HOME`` with a local tunnel, ``--job-dir`` with ssh) and the experiment title in the sbatch script's
``srun --output`` and task path, in ``mkdir -p`` (locally, and on the login node through the ssh tunnel) and in
the ``sbatch`` command line; the account in the job name, which is in the log path."""
ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_shell_safe(what: str, value: str | None) -> None:
    """Refuse (IptError naming ``what``) a value NeMo-Run would pass to a shell unquoted, unless it holds only
    :data:`SHELL_SAFE` characters (no space, quote, ``$``, backtick, ``;``, ``&``, ``|``, newline, glob)."""
    if value is not None and not SHELL_SAFE.fullmatch(value):
        raise IptError(f"{what} {value!r}: NeMo-Run writes it into shell commands unquoted; use only letters, digits "
                       "and _ . / ~ + @ , : = -")


def slurm_environment(env: dict[str, str]) -> dict[str, str]:
    """``env`` for ``SlurmExecutor``: NeMo-Run 0.11 writes ``export KEY=VALUE`` lines into the sbatch script
    without quoting (``SlurmBatchRequest.materialize``), so each value is passed already shell-quoted
    (:func:`shlex.quote`: bash gives the task the value unchanged); a key that is not a shell name is refused."""
    for key in env:
        if not ENV_KEY.fullmatch(key):
            raise IptError(f"--env {key!r}: a variable name must be letters, digits and _ (not starting with a digit)")
    return {key: shlex.quote(value) for key, value in env.items()}


def _check_slurm_shell_values(slurm: SlurmOptions, title: str, nemo_run_home) -> None:
    """:func:`check_shell_safe` for every value NeMo-Run puts into a Slurm shell command unquoted."""
    check_shell_safe("experiment name", title)
    check_shell_safe("--account", slurm.account)
    check_shell_safe("--partition", slurm.partition)
    if slurm.tunnel == "ssh":
        check_shell_safe("--job-dir", slurm.job_dir)
    else:
        home = Path(nemo_run_home or os.environ.get("NEMORUN_HOME", "~/.nemo_run")).expanduser().resolve()
        check_shell_safe("NeMo-Run home", str(home))


def prepare_stage(command: StageCommand, *, executor: str = "local", nproc_per_node: int = 1,
                  slurm: SlurmOptions | None = None, env: dict[str, str] | None = None,
                  title: str | None = None, nemo_run_home: str | Path | None = None):
    """The checked ``(title, task, script, executor)`` of :func:`launch_stage`, nothing started. Raises IptError
    for bad options and for values NeMo-Run would write into a Slurm shell command unquoted."""
    if command.stage not in STAGES:
        raise IptError(f"stage {command.stage!r}: expected one of {', '.join(STAGES)}")
    title = title or f"ipt-{command.stage}"
    ntasks = nproc_per_node if command.stage == "train" else 1
    if executor == "slurm":
        slurm = slurm or SlurmOptions()
        if command.stage != "train" and slurm.nodes > 1:
            raise IptError(f"--nodes {slurm.nodes}: only the train stage runs on several nodes")
        local = slurm.tunnel == "local"
        if slurm.container_image is None:
            _check_rundir_substitution(command, nemo_run_home, local, slurm.job_dir if not local else None)
        _check_slurm_shell_values(slurm, title, nemo_run_home)
        ex = slurm_executor(slurm, ntasks, slurm_environment(environment(local, env)))
    elif executor == "local":
        ex = local_executor(ntasks, environment(True, env))
    else:
        raise IptError(f"--executor {executor!r}: expected local or slurm")
    return title, command.stage, build_script(command), ex


def materialise(command: StageCommand, *, nemo_run_home: str | Path, **options) -> Path:
    """Write the scripts NeMo-Run would submit for ``command`` (its ``Experiment.dryrun``: nothing is submitted) under
    ``nemo_run_home`` and return the sbatch script's path (Slurm; ``options`` as for :func:`launch_stage`)."""
    run = _nemo_run()
    title, task, script, ex = prepare_stage(command, nemo_run_home=nemo_run_home, **options)
    home = str(Path(nemo_run_home).resolve())
    os.environ["NEMORUN_HOME"] = home
    run.config.set_nemorun_home(home)
    with run.Experiment(title, executor=ex, log_level="WARN", enable_goodbye_message=False) as exp:
        exp.add(script, name=task, tail_logs=False)
        exp.dryrun(log=False, delete_exp_dir=False)
        return Path(exp._exp_dir) / f"{task}_sbatch.sh"


def launch_stage(command: StageCommand, *, executor: str = "local", nproc_per_node: int = 1,
                 slurm: SlurmOptions | None = None, env: dict[str, str] | None = None,
                 title: str | None = None, nemo_run_home: str | Path | None = None) -> LaunchResult:
    """Run one ``ipt`` stage through NeMo-Run (``executor`` local or slurm) and check that it succeeded.

    ``nproc_per_node`` processes (torchrun) are started for ``train`` only; other stages run as one task.
    Raises IptError for bad options (:func:`prepare_stage`) and :class:`LaunchFailed` when the task failed.
    """
    title, task, script, ex = prepare_stage(command, executor=executor, nproc_per_node=nproc_per_node, slurm=slurm,
                                            env=env, title=title, nemo_run_home=nemo_run_home)
    return run_experiment(title, task, script, ex, nemo_run_home)


# ---------------------------------------------------------------------------------------------- ipt launch

DESCRIPTION = """\
Run an ipt stage through NeMo-Run as a named experiment, on this machine (LocalExecutor) or on a Slurm
cluster (SlurmExecutor), wait for it, and report a failed task as failed (exit status 2, with the log path).
The train stage starts parallel.nproc_per_node processes per node under torchrun; other stages run as one task.
Needs the launch extra: pip install -e '.[launch]'.

examples:
  ipt launch examples/quickstart.yaml --stage train --set parallel.nproc_per_node=2     # 2 local processes
  ipt launch examples/quickstart.yaml --stage run                                        # every stage, locally
  ipt launch examples/llama3-8b-cpt.yaml --stage train --executor slurm --account myacct \\
      --partition batch --nodes 2 --gpus-per-node 8 --set parallel.nproc_per_node=8 --time 04:00:00
  ipt launch cfg.yaml --stage train --executor slurm --account a --tunnel ssh --host login.cluster \\
      --user me --job-dir /lustre/me/nemorun-jobs --workdir /lustre/me/megatron-ipt --python /lustre/me/venv/bin/python

Logs: $NEMORUN_HOME/experiments/<name>/<name>_<id>/<task>/ (default NEMORUN_HOME: ~/.nemo_run).
"""


def add_executor_arguments(p) -> None:
    """Options shared by ``ipt launch`` and ``ipt sweep``: executor, Slurm resources, tunnel, environment."""
    g = p.add_argument_group("executor")
    g.add_argument("--executor", choices=["local", "slurm"], default=None, help="where tasks run (default: local)")
    g.add_argument("--account", help="Slurm account (required for --executor slurm)")
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--nodes", type=int, default=None, help="Slurm nodes for the train stage (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=None, help="Slurm GPUs per node")
    g.add_argument("--time", default=None, help="Slurm time limit, HH:MM:SS (default: train.exit_duration_minutes + "
                   f"{SAVE_MARGIN_MINUTES} min for training, else 01:00:00)")
    g.add_argument("--tunnel", choices=["local", "ssh"], default=None,
                   help="local: sbatch on this machine; ssh: through --host/--user (default local)")
    g.add_argument("--host", help="ssh tunnel: the cluster's login host")
    g.add_argument("--user", help="ssh tunnel: user name on the cluster")
    g.add_argument("--job-dir", help="ssh tunnel: folder on the cluster for NeMo-Run's job files")
    g.add_argument("--identity", help="ssh tunnel: private key file")
    g.add_argument("--container-image", help="run in this container image (pyxis); default: the plain environment")
    g.add_argument("--container-mounts", action="append", default=[], metavar="SRC:DST", help="container mount (repeatable)")
    g.add_argument("--workdir", default=None, help="folder the task runs in (default: the current folder; with "
                   "--tunnel ssh the project's folder on the cluster)")
    g.add_argument("--python", default=None, help="python of the task's environment (default: this one)")
    g.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment variable (repeatable)")
    g.add_argument("--nemo-run-home", default=None, help="NeMo-Run's home folder (default: $NEMORUN_HOME or ~/.nemo_run)")


def slurm_options(args, defaults: dict | None = None) -> SlurmOptions:
    """SlurmOptions from ``defaults`` (e.g. a sweep file's slurm section) overridden by the given CLI options."""
    values = dict(defaults or {})
    for key in ("account", "partition", "nodes", "gpus_per_node", "time", "tunnel", "host", "user", "job_dir",
                "identity", "container_image"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    if getattr(args, "container_mounts", None):
        values["container_mounts"] = list(args.container_mounts)
    try:
        return SlurmOptions(**values)
    except TypeError as e:
        raise IptError(f"slurm options: {e}") from None


def env_options(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise IptError(f"--env {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key] = value
    return out


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("launch", help="Run a stage through NeMo-Run (local or Slurm executor) as a named experiment.",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="experiment YAML")
    p.add_argument("--stage", choices=STAGES, required=True, help="the ipt stage to run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable); passed on to the stage")
    p.add_argument("--force", action="store_true", help="redo the stage even if finished (not for eval)")
    p.add_argument("--name", help="experiment name (default: ipt-STAGE-<config name>)")
    p.add_argument("--dry-run", action="store_true", help="slurm: write the sbatch script NeMo-Run would submit (its "
                   "dryrun, under the NeMo-Run home) and print its path; nothing is submitted")
    add_executor_arguments(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from megatron_ipt.config import load_config

    cfg = load_config(args.config, args.overrides)  # fail here, not inside the job, on a bad config
    slurm = args.executor == "slurm"
    local_fs = not slurm or (args.tunnel or "local") == "local"
    config = str(Path(args.config).resolve()) if local_fs else args.config
    extra = ["--force"] if args.force and args.stage != "eval" else []
    command = StageCommand(args.stage, config, list(args.overrides), extra,
                           workdir=args.workdir or os.getcwd(), python=args.python or (sys.executable if local_fs else "python"))
    opts = slurm_options(args) if slurm else None
    if opts is not None and args.stage in ("train", "run"):
        align_time_limit(opts, cfg.train.exit_duration_minutes)
    options = dict(executor=args.executor or "local", nproc_per_node=cfg.parallel.nproc_per_node, slurm=opts,
                   env=env_options(args.env), title=args.name or f"ipt-{args.stage}-{cfg.name}")
    if args.dry_run:
        if not slurm:
            raise IptError("--dry-run writes a Slurm job script: give --executor slurm")
        home = args.nemo_run_home or os.environ.get("NEMORUN_HOME", str(Path("~/.nemo_run").expanduser()))
        print(materialise(command, nemo_run_home=home, **options))
        return 0
    result = launch_stage(command, nemo_run_home=args.nemo_run_home, **options)
    print(f"ipt launch: task '{result.task}' of experiment {result.experiment_id} {result.status}; log: {result.log}")
    return 0
