"""A run folder's resolved config: written by every stage command that finishes (or stops with a checkpoint), and by
``ipt run`` and a torchrun relaunch before they start; read back by commands on an existing run.

``RUN/config.yaml`` holds the config a run was made with (defaults, file and ``--set`` overrides), starting with
:data:`MARKER`. Commands on an existing run default to it, so the ``--set`` overrides a run was trained with need not
be repeated: a run folder given where a config is expected (``ipt eval RUN``, ``ipt train RUN``), ``ipt eval``
with an experiment file whose run folder holds one, ``ipt convert megatron-to-hf`` of a run's checkpoints.

A ``config.yaml`` the tool did not write (no marker; e.g. the user's own file with ``run_dir: "."``) is never
replaced: the resolved config then goes to ``RUN/config.resolved.yaml``. One written before the marker existed
is kept while it holds the same config. Plain yaml and pydantic, no torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from megatron_ipt.config import ConfigError, ExperimentConfig, load_config, resolved
from megatron_ipt.manifest import atomic_write_text

MARKER = "# megatron-ipt: the resolved config of this run (defaults, file, --set), written by ipt; commands on this " \
         "run read it\n"
NAME, OTHER_NAME = "config.yaml", "config.resolved.yaml"


def _written_by_ipt(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline() == MARKER
    except (OSError, UnicodeDecodeError):
        return False


def _same_config(path: Path, data: dict) -> bool:
    try:
        return yaml.safe_load(path.read_text()) == data
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False


def save(cfg: ExperimentConfig) -> Path:
    """Write ``cfg`` resolved to ``RUN/config.yaml`` (atomically, :data:`MARKER` first) and return the path.

    ``RUN/config.yaml`` is replaced only when absent or written by ipt; one without the marker that holds the same
    config is left as it is (a run from before the marker); otherwise ``RUN/config.resolved.yaml`` is written (and
    used from then on)."""
    run = cfg.run_path
    run.mkdir(parents=True, exist_ok=True)
    data = resolved(cfg)
    own, other = run / NAME, run / OTHER_NAME
    if not other.exists() and own.exists() and not _written_by_ipt(own):
        if _same_config(own, data):
            return own
        target = other
    else:
        target = other if other.exists() else own
    atomic_write_text(target, MARKER + yaml.safe_dump(data, sort_keys=False))
    return target


def find(run: Path) -> Path | None:
    """The resolved config of run folder ``run``: ``config.resolved.yaml``, else a ``config.yaml`` written by ipt or
    (a run from before the marker) one that is a complete resolved config; None when there is none."""
    run = Path(run)
    if (run / OTHER_NAME).is_file():
        return run / OTHER_NAME
    own = run / NAME
    if own.is_file() and (_written_by_ipt(own) or _is_resolved(own)):
        return own
    return None


def _is_resolved(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text())
        return isinstance(data, dict) and data == resolved(ExperimentConfig.model_validate(data))
    except Exception:  # not a config at all: not the run's
        return False


def run_holding(path: str | Path, levels: int = 4) -> Path | None:
    """The run folder holding ``path`` (a checkpoint: ``RUN/train/checkpoints/iter_N``): ``path`` or the nearest of
    its ``levels`` parents with a resolved config; None when none has one."""
    p = Path(path).resolve()
    for folder in [p, *p.parents][: levels + 1]:
        if find(folder) is not None:
            return folder
    return None


def say_using(path: Path, command: str) -> None:
    print(f"ipt {command}: using {path} (the run's resolved config)", file=sys.stderr)


def load_for_run(config: str | None, overrides: list[str], command: str) -> ExperimentConfig:
    """``load_config`` where ``config`` may name a run folder: its resolved config, with ``overrides`` on top (and a
    line saying so). Raises ConfigError when the folder holds no resolved config."""
    if config is not None and Path(config).is_dir():
        found = find(Path(config))
        if found is None:
            raise ConfigError(f"{config}: a folder without a resolved config ({NAME} written by ipt); give the "
                              "experiment YAML")
        say_using(found, command)
        return load_config(found, overrides)
    return load_config(config, overrides)


def prefer_run_config(cfg: ExperimentConfig, overrides: list[str], command: str) -> ExperimentConfig:
    """``cfg``'s run folder's resolved config with ``overrides`` on top, when the folder holds one (saying so);
    else ``cfg``. For commands that read a finished run (``ipt eval``): the model it trained is the run's."""
    found = find(cfg.run_path)
    if found is None:
        return cfg
    say_using(found, command)
    return load_config(found, overrides)
