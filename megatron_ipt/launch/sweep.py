"""Blend-weight sweeps: one training run per grid point over a shared data stage, run through NeMo-Run,
evaluated, and reported as a table (CSV, Markdown) and plots (PNG).

A sweep file (``examples/sweep.yaml``) names a base experiment and a grid::

    base: quickstart.yaml            # relative to the sweep file
    name: quickstart-sweep           # sweep folder: runs/quickstart-sweep (sweep_dir)
    set: [train.train_iters=100]     # overrides for every point (and the data stages)
    data_from: runs/quickstart       # optional: reuse this run's finished data stages instead of running them
    grid:
      instruction_share: [0.25, 0.5, 0.75]   # required
      train.lr: [3.0e-3]                     # optional
      train.train_iters: [100]               # optional
    launch: {executor: local}        # or slurm, with slurm: {account, partition, time, ...}
    eval: {shots: 0}

**Instruction share** ``s`` is the blend weight of the instruction-augmented component against raw domain
text: ``blend.instruct_weight = s * T`` and ``blend.raw_weight = (1 - s) * T``, where ``T`` is the base
config's ``raw_weight + instruct_weight``, so ``blend.extra`` components keep their share of the blend.
A grid ``train.lr`` scales ``train.min_lr`` with it (same ratio as in the base config).

Folder layout (``SWEEP_DIR``)::

    data/                     corpus, synthesis, formatted, tokenized: the data stages, run once (not with
                              data_from: the points link to that run's folders instead)
    configs/                  data.yaml and one resolved experiment YAML per point (what the jobs run)
    points/<id>/              a run folder per point: symlinks to data/'s stage folders, its own train/ and eval/,
                              point.json once trained and evaluated (a rerun skips that point)
    nemorun/                  NeMo-Run's experiments and task logs
    results.csv results.md validation_loss.png reading_comprehension.png

Sharing works through the stage fingerprints (:mod:`megatron_ipt.manifest`): a point's data sections are the
base's, so its symlinked stage folders are up to date and only ``train`` runs. The data stages and every
training run are NeMo-Run tasks (:mod:`megatron_ipt.launch.nemo`); evaluation (held-out loss per component
from the train manifest, reading-comprehension answer NLL / option accuracy from
:func:`megatron_ipt.evaluate.cli.evaluate_experiment`) runs in this process. A failed point is reported
(status ``failed`` and its log) and retried on the next run; the other points still run.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from data_prep.atomic import open_atomic
from megatron_ipt.config import SAFE_NAME, ConfigError, ExperimentConfig, load_config, resolved
from megatron_ipt.errors import IptError
from megatron_ipt.manifest import atomic_write_text

DATA_STAGES = {"corpus": "corpus", "synthesize": "synthesis", "format": "formatted", "tokenize": "tokenized"}
POINT_RECORD = "point.json"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SweepGrid(_Model):
    """The grid: instruction share (required) x learning rate x training iterations (optional)."""

    instruction_share: list[float] = Field(min_length=1, description="Blend weight share of the instruction-augmented "
                                           "component vs raw text, each in [0, 1].")
    lr: list[float] | None = Field(None, alias="train.lr", min_length=1)
    train_iters: list[int] | None = Field(None, alias="train.train_iters", min_length=1)

    @field_validator("instruction_share")
    @classmethod
    def _shares(cls, v: list[float]) -> list[float]:
        bad = [s for s in v if not 0.0 <= s <= 1.0]
        if bad:
            raise ValueError(f"instruction shares must lie in [0, 1], got {bad}")
        return v

    @field_validator("lr")
    @classmethod
    def _lrs(cls, v):
        if v and any(x <= 0 for x in v):
            raise ValueError("learning rates must be positive")
        return v

    @field_validator("train_iters")
    @classmethod
    def _iters(cls, v):
        if v and any(x < 1 for x in v):
            raise ValueError("train_iters must be at least 1")
        return v


class SweepLaunch(_Model):
    executor: Literal["local", "slurm"] = "local"
    slurm: dict = Field(default_factory=dict, description="SlurmOptions fields: account, partition, nodes, time, "
                        "gpus_per_node, tunnel, host, user, job_dir, identity, container_image, container_mounts.")
    nemo_run_home: str | None = Field(None, description="NeMo-Run's home (default: SWEEP_DIR/nemorun; not a folder "
                                      "named nemo_run, see megatron_ipt.launch.nemo._check_rundir_substitution).")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for the tasks.")


class SweepEval(_Model):
    shots: int = Field(0, ge=0, description="Demonstrations in the reading-comprehension prompts.")
    reading_comprehension: bool = Field(True, description="Score held-out reading comprehension per point.")


class SweepConfig(_Model):
    base: str = Field(description="The base experiment YAML (relative paths: to the sweep file's folder).")
    name: str = Field("sweep", pattern=SAFE_NAME, description="Sweep name: one path component (see config.SAFE_NAME).")
    sweep_dir: str = Field("runs/{name}", description="Sweep folder; '{name}' is replaced by the sweep name.")
    set: list[str] = Field(default_factory=list, description="Overrides applied to every point and the data stages.")
    data_from: str | None = Field(None, description="Reuse this run folder's finished data stages (corpus, synthesis, "
                                  "formatted, tokenized) instead of running them in SWEEP_DIR/data; its config.yaml "
                                  "must agree on the data sections. Relative paths: to the current folder.")
    grid: SweepGrid
    launch: SweepLaunch = Field(default_factory=SweepLaunch)
    eval: SweepEval = Field(default_factory=SweepEval)

    @property
    def path(self) -> Path:
        return Path(self.sweep_dir.replace("{name}", self.name))


@dataclass(frozen=True)
class Point:
    """One grid point; ``lr`` / ``train_iters`` are None when the grid does not vary them."""

    instruction_share: float
    lr: float | None = None
    train_iters: int | None = None

    @property
    def id(self) -> str:
        out = f"share{self.instruction_share:g}"
        if self.lr is not None:
            out += f"-lr{self.lr:g}"
        if self.train_iters is not None:
            out += f"-iters{self.train_iters}"
        return out

    def overrides(self, base: ExperimentConfig) -> list[str]:
        """``--set`` items that turn the base config into this point (see the module docstring)."""
        total = base.blend.raw_weight + base.blend.instruct_weight or 1.0
        s = self.instruction_share
        out = [f"blend.instruct_weight={round(s * total, 12)!r}", f"blend.raw_weight={round((1.0 - s) * total, 12)!r}"]
        if self.lr is not None:
            min_lr = round(self.lr * base.train.min_lr / base.train.lr, 15)
            out += [f"train.lr={self.lr!r}", f"train.min_lr={min_lr!r}"]
        if self.train_iters is not None:
            out.append(f"train.train_iters={self.train_iters}")
        return out


def load_sweep(path: str | Path, extra_sets: list[str] | None = None) -> tuple[SweepConfig, Path]:
    """Read a sweep file; returns the config and the base experiment's path. Raises ConfigError naming the
    file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (base, grid, ...)")
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<root>"
            lines.append(f"{path}: unknown key '{key}'" if err["type"] == "extra_forbidden"
                         else f"{path}: {key} = {err.get('input')!r}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    if extra_sets:
        sweep.set = [*sweep.set, *extra_sets]
    base = Path(sweep.base)
    if not base.is_absolute():
        base = path.parent / base
    if not base.is_file():
        raise ConfigError(f"{path}: base experiment {sweep.base!r} not found (looked at {base})")
    return sweep, base


def expand_grid(grid: SweepGrid) -> list[Point]:
    """Every combination of the grid's values, instruction share varying fastest."""
    lrs = grid.lr or [None]
    iters = grid.train_iters or [None]
    return [Point(s, lr, it) for lr, it, s in itertools.product(lrs, iters, grid.instruction_share)]


DATA_SECTIONS = ("corpus", "synthesis", "format", "tokenize")


def data_config(sweep: SweepConfig, base: Path) -> ExperimentConfig:
    """The experiment whose run folder (``data_from``, else SWEEP_DIR/data) holds the shared data stages."""
    return load_config(base, [*sweep.set, f"run_dir={sweep.data_from or sweep.path / 'data'}"])


def check_data_from(cfg: ExperimentConfig) -> None:
    """Refuse a ``data_from`` run folder whose tokenize stage is unfinished or whose ``config.yaml`` differs from
    the sweep's data sections (corpus, synthesis, format, tokenize); the error names the first differing key."""
    from megatron_ipt.manifest import ManifestError, read_manifest

    run = cfg.run_path
    try:
        read_manifest(run / DATA_STAGES["tokenize"], "tokenize")
    except ManifestError as e:
        raise IptError(f"data_from {run}: no finished tokenize stage ({e}); run its data stages first "
                       f"(ipt run CONFIG --until tokenize)") from None
    from megatron_ipt import run_config

    saved = run_config.find(run)
    if saved is None:
        return
    theirs, ours = load_config(saved).model_dump(mode="json"), cfg.model_dump(mode="json")
    for section in DATA_SECTIONS:
        for key in sorted(set(theirs[section]) | set(ours[section]) - {"workers"}):
            if theirs[section].get(key) != ours[section].get(key):
                raise IptError(f"data_from {run}: {section}.{key} is {theirs[section].get(key)!r} there but "
                               f"{ours[section].get(key)!r} in this sweep; set it to match (sweep 'set:') or drop data_from")


def point_config(sweep: SweepConfig, base: Path, point: Point) -> ExperimentConfig:
    """The experiment of one point: the base with the sweep's and the point's overrides, its own run folder."""
    base_cfg = load_config(base, list(sweep.set))
    sets = [*sweep.set, *point.overrides(base_cfg), f"name={sweep.name}-{point.id}",
            f"run_dir={sweep.path / 'points' / point.id}"]
    return load_config(base, sets)


def link_data_stages(data_run: Path, point_run: Path) -> None:
    """Point ``point_run``'s data stage folders at ``data_run``'s with relative symlinks (a real folder already
    there is left alone; a stale link is replaced)."""
    point_run.mkdir(parents=True, exist_ok=True)
    for folder in DATA_STAGES.values():
        link = point_run / folder
        target = Path(os.path.relpath(data_run / folder, point_run))
        if link.is_symlink():
            if Path(os.readlink(link)) == target:
                continue
            link.unlink()
        elif link.exists():
            continue
        os.symlink(target, link, target_is_directory=True)


def write_config(cfg: ExperimentConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(resolved(cfg), sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------- results


def point_row(point: Point, cfg: ExperimentConfig, rc: dict | None, status: str = "done", log: str = "") -> dict:
    """One results row: the point's values, held-out loss per component (before/after training, from the
    train manifest), reading comprehension (answer NLL, option accuracy, examples), status."""
    from megatron_ipt.manifest import read_manifest
    from megatron_ipt.pipeline import stage_path

    row: dict = {"point": point.id, "instruction_share": point.instruction_share,
                 "raw_weight": cfg.blend.raw_weight, "instruct_weight": cfg.blend.instruct_weight,
                 "lr": cfg.train.lr, "train_iters": cfg.train.train_iters, "status": status}
    if status == "done":
        manifest = read_manifest(stage_path(cfg, "train"), "train")
        train = manifest.get("train", {})
        row["final_train_loss"] = train.get("final_train_loss")
        row["tokens_trained"] = train.get("tokens_trained")
        for name, loss in manifest.get("losses", {}).items():
            row[f"{name}_before"] = loss.get("before")
            row[f"{name}_after"] = loss.get("after")
        if rc is not None:
            row["rc_answer_nll"] = rc["metrics"]["answer_nll"]
            row["rc_mc_accuracy"] = rc["metrics"].get("mc_accuracy")
            row["rc_examples"] = rc.get("n")
            row["rc_multiple_choice"] = rc.get("n_multiple_choice")
    row["log"] = log
    return row


def _columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return [c for c in cols if c != "log"] + ["log"]


def write_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(rows), restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _fmt(v) -> str:
    if v is None or v == "":
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict], title: str) -> str:
    """A Markdown report: one row per point, held-out losses after training and reading comprehension."""
    losses = [c for c in _columns(rows) if c.startswith("heldout_") and c.endswith("_after")]
    cols = ["point", "instruction_share", "lr", "train_iters", *losses, "rc_answer_nll", "rc_mc_accuracy", "status"]
    head = ["point", "instruction share", "lr", "iters", *[f"{c[8:-6]} loss" for c in losses],
            "RC answer NLL", "RC accuracy", "status"]
    lines = [f"# {title}", "", "Held-out loss per component after training (nats/token, lower is better); reading "
             "comprehension on held-out documents: mean answer NLL (nats/token, lower is better) and multiple-choice "
             "option accuracy.", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _series(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by (lr, train_iters), each group sorted by instruction share (finished points only)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") == "done":
            groups.setdefault((r["lr"], r["train_iters"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["instruction_share"]) for k, v in groups.items()}


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """``validation_loss.png`` (held-out loss per component vs instruction share) and
    ``reading_comprehension.png`` (answer NLL and option accuracy vs instruction share); matplotlib, Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _series(rows)
    several = len(groups) > 1
    components = [c for c in _columns(rows) if c.startswith("heldout_") and c.endswith("_after")]
    paths = []

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (lr, iters), rs in groups.items():
        suffix = f" (lr {lr:g}, {iters} it)" if several else ""
        for c in components:
            pts = [(r["instruction_share"], r[c]) for r in rs if r.get(c) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=c[:-6] + suffix)
    ax.set_xlabel("instruction share (blend weight of instruction-augmented text)")
    ax.set_ylabel("held-out loss after training (nats/token)")
    ax.set_title("Validation loss per component")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "validation_loss.png")
    _save(fig, paths[-1])
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.6, 4.0))
    for (lr, iters), rs in groups.items():
        label = f"lr {lr:g}, {iters} it" if several else None
        nll = [(r["instruction_share"], r["rc_answer_nll"]) for r in rs if r.get("rc_answer_nll") is not None]
        acc = [(r["instruction_share"], r["rc_mc_accuracy"]) for r in rs if r.get("rc_mc_accuracy") is not None]
        if nll:
            a1.plot(*zip(*nll), marker="o", label=label)
        if acc:
            a2.plot(*zip(*acc), marker="o", label=label)
    a1.set_ylabel("answer NLL (nats/token)")
    a2.set_ylabel("option accuracy")
    a2.set_ylim(-0.05, 1.05)
    if not a2.lines:
        a2.text(0.5, 0.5, "no multiple-choice pairs", ha="center", va="center", transform=a2.transAxes)
    for a in (a1, a2):
        a.set_xlabel("instruction share")
        a.grid(alpha=0.3)
        if several and a.lines:
            a.legend(fontsize=8)
    fig.suptitle("Reading comprehension on held-out documents")
    fig.tight_layout()
    paths.append(out_dir / "reading_comprehension.png")
    _save(fig, paths[-1])
    plt.close(fig)
    return paths


def _save(fig, path: Path) -> None:
    with open_atomic(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)


def write_report(rows: list[dict], sweep_dir: Path, title: str) -> list[Path]:
    """results.csv, results.md and the PNG plots in ``sweep_dir``; returns their paths."""
    write_csv(rows, sweep_dir / "results.csv")
    atomic_write_text(sweep_dir / "results.md", markdown(rows, title))
    return [sweep_dir / "results.csv", sweep_dir / "results.md", *plot(rows, sweep_dir)]


# ---------------------------------------------------------------------------------------------- driver


def config_fingerprint(cfg: ExperimentConfig) -> str:
    from megatron_ipt.manifest import fingerprint

    return fingerprint(resolved(cfg))


def _finished(cfg: ExperimentConfig) -> dict | None:
    """The stored row of a point trained and evaluated with exactly this resolved config, else None."""
    path = cfg.run_path / POINT_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record.get("row") if record.get("config_fingerprint") == config_fingerprint(cfg) else None


def _trained(cfg: ExperimentConfig) -> bool:
    from megatron_ipt.manifest import ManifestError, is_done, read_manifest
    from megatron_ipt.pipeline import stage_path, train_fingerprint

    try:
        tokenized = read_manifest(stage_path(cfg, "tokenize"), "tokenize")
    except ManifestError:
        return False
    return is_done(stage_path(cfg, "train"), train_fingerprint(cfg, tokenized))


def _log(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(msg)  # a log line is never folded (paths stay whole)


def run_sweep(sweep: SweepConfig, base: Path, *, executor: str | None = None, slurm=None,
              env: dict[str, str] | None = None, python: str | None = None, workdir: str | None = None) -> list[dict]:
    """Run (or resume) a sweep and write its report; returns the rows.

    ``executor``/``slurm`` override the sweep file's launch section. Raises LaunchFailed when the data stages
    fail, and IptError listing the failed points (after writing the report of the others).
    """
    from megatron_ipt.launch import nemo as nemo_launch
    from megatron_ipt.launch.nemo import LaunchFailed, SlurmOptions, StageCommand

    sweep_dir = sweep.path
    sweep_dir.mkdir(parents=True, exist_ok=True)
    executor = executor or sweep.launch.executor
    slurm = slurm or (SlurmOptions(**sweep.launch.slurm) if executor == "slurm" else None)
    if slurm is not None and slurm.tunnel != "local":
        raise IptError("ipt sweep reads every point's checkpoint and manifests in its own process, so it runs where "
                       "the cluster's file system is (a login node, tunnel local); --tunnel ssh is for ipt launch")
    home = sweep.launch.nemo_run_home or str(sweep_dir / "nemorun")
    env = {**sweep.launch.env, **(env or {})}
    python = python or sys.executable
    workdir = workdir or os.getcwd()

    def launch(stage: str, config: Path, extra: list[str], nproc: int, title: str):
        cmd = StageCommand(stage, str(config.resolve()), [], extra, workdir=workdir, python=python)
        return nemo_launch.launch_stage(cmd, executor=executor, nproc_per_node=nproc, slurm=slurm, env=env,
                                        title=title, nemo_run_home=home)

    points = expand_grid(sweep.grid)
    base_cfg = load_config(base, list(sweep.set))
    data_cfg = data_config(sweep, base)
    todo = []
    rows: dict[str, dict] = {}
    for p in points:
        cfg = point_config(sweep, base, p)
        overrides = p.overrides(base_cfg)
        done = _finished(cfg)
        if done is not None:
            _log(f"[dim]sweep: point {p.id} already trained and evaluated, reusing it[/dim]")
            rows[p.id] = done
        else:
            todo.append((p, cfg, overrides))
    _log(f"sweep {sweep.name}: {len(points)} points, {len(todo)} to run, in {sweep_dir}")

    if todo and sweep.data_from:
        check_data_from(data_cfg)
        _log(f"sweep: data stages reused from {data_cfg.run_path} (data_from)")
    elif todo:
        data_file = write_config(data_cfg, sweep_dir / "configs" / "data.yaml")
        _log("[bold cyan]== sweep: data stages (corpus, synthesize, format, tokenize), once[/bold cyan]")
        launch("run", data_file, ["--until", "tokenize"], 1, f"{sweep.name}-data")

    failed = []
    for p, cfg, overrides in todo:
        _log(f"[bold cyan]== sweep: point {p.id} ({' '.join(overrides)})[/bold cyan]")
        link_data_stages(data_cfg.run_path, cfg.run_path)
        cfg_file = write_config(cfg, sweep_dir / "configs" / f"{p.id}.yaml")
        log = ""
        if not _trained(cfg):
            try:
                result = launch("train", cfg_file, [], cfg.parallel.nproc_per_node, f"{sweep.name}-{p.id}")
                log = str(result.log or "")
            except LaunchFailed as e:
                _log(f"[red]sweep: point {p.id} failed: {e}[/red]")
                failed.append(f"{p.id} ({e})")
                rows[p.id] = point_row(p, cfg, None, status="failed", log=str(e).rsplit("log: ", 1)[-1])
                continue
        rc = None
        if sweep.eval.reading_comprehension:
            rc = _reading_comprehension(cfg, sweep.eval.shots)
        row = point_row(p, cfg, rc, log=log)
        atomic_write_text(cfg.run_path / POINT_RECORD, json.dumps({"point": p.id, "overrides": overrides,
                                                                  "config_fingerprint": config_fingerprint(cfg),
                                                                  "row": row}, indent=2) + "\n")
        rows[p.id] = row

    ordered = [rows[p.id] for p in points if p.id in rows]
    paths = write_report(ordered, sweep_dir, f"Blend-weight sweep {sweep.name}")
    _log("sweep: wrote " + ", ".join(str(p) for p in paths))
    if failed:
        raise IptError(f"sweep {sweep.name}: {len(failed)} of {len(points)} points failed (rerun to retry them): "
                       + "; ".join(failed))
    return ordered


def _reading_comprehension(cfg: ExperimentConfig, shots: int) -> dict | None:
    """The point's held-out reading-comprehension result (RUN_DIR/eval/rc-sweep-Kshot.json), or None with a
    note when the run has no held-out pairs."""
    from megatron_ipt.evaluate.cli import evaluate_experiment

    try:
        result, _ = evaluate_experiment(cfg, shots=shots, name=cfg.name,
                                        output=cfg.run_path / "eval" / f"rc-sweep-{shots}shot.json")
    except IptError as e:
        _log(f"[yellow]sweep: reading-comprehension scoring skipped for {cfg.name}: {e}[/yellow]")
        return None
    return result


# ---------------------------------------------------------------------------------------------- ipt sweep

DESCRIPTION = """\
Sweep blend weights: one training run per grid point (instruction share x optional train.lr x optional
train.train_iters) over data stages that run once and are shared, each run a NeMo-Run task (local or Slurm),
then held-out loss per component and reading-comprehension scores per point. Writes SWEEP_DIR/results.csv,
results.md, validation_loss.png and reading_comprehension.png. Rerunning skips finished points.
Needs the launch extra: pip install -e '.[launch]'.

examples:
  ipt sweep examples/sweep.yaml                        # locally (CPU: a few minutes after the data stages)
  ipt sweep examples/sweep.yaml --plan                 # list the points and their overrides, run nothing
  ipt sweep examples/sweep.yaml --set train.train_iters=20
  ipt sweep examples/sweep.yaml --executor slurm --account myacct --partition batch --time 00:30:00
"""


def add_parser(sub) -> None:
    import argparse

    from megatron_ipt.launch.nemo import add_executor_arguments

    p = sub.add_parser("sweep", help="Blend-weight sweep: a training run per grid point through NeMo-Run, "
                       "evaluated, with a table and plots.", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_file", help="sweep YAML (e.g. examples/sweep.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the base experiment for every point (repeatable)")
    p.add_argument("--plan", action="store_true", help="print the points and their overrides and exit")
    add_executor_arguments(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from megatron_ipt.launch.nemo import env_options, slurm_options

    sweep, base = load_sweep(args.sweep_file, args.overrides)
    if args.plan:
        base_cfg = load_config(base, list(sweep.set))
        for p in expand_grid(sweep.grid):
            point_config(sweep, base, p)  # validates every point's config
            print(f"{p.id}: {' '.join([*sweep.set, *p.overrides(base_cfg)])}")
        data_cfg = data_config(sweep, base)
        if sweep.data_from:
            check_data_from(data_cfg)
            print(f"data stages: reused from {data_cfg.run_path} (data_from)")
        else:
            print(f"data stages: run once in {data_cfg.run_path}")
        print(f"sweep folder: {sweep.path}")
        return 0
    executor = args.executor or sweep.launch.executor
    slurm = slurm_options(args, sweep.launch.slurm) if executor == "slurm" else None
    if args.nemo_run_home:
        sweep.launch.nemo_run_home = args.nemo_run_home
    rows = run_sweep(sweep, base, executor=executor, slurm=slurm, env=env_options(args.env), python=args.python,
                     workdir=args.workdir)
    print(markdown(rows, f"Blend-weight sweep {sweep.name}"), end="")
    print(f"results: {sweep.path / 'results.csv'}, {sweep.path / 'results.md'}, plots: "
          f"{sweep.path / 'validation_loss.png'}, {sweep.path / 'reading_comprehension.png'}")
    return 0
