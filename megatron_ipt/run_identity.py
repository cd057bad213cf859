"""What defines a training run, and what may change between its restarts.

A training folder (``RUN/train``, ``RUN/sft``) holds one run: the checkpoints a rerun resumes from. Its
``run.json`` records the run's *identity*: every setting that shapes the trajectory (model architecture, data,
blend and split, seed, batch sizes, sequence length, learning-rate schedule and optimizer hyper-parameters,
precision, ``init_from``, evaluation size) plus the fingerprint of the tokenized inputs, and the number of
iterations asked for. Everything else may change between restarts and the run resumes from its latest checkpoint:
logging, save and evaluation intervals, ``keep_last``, trackers, ``async_save``, ``exit_duration_minutes``,
the device, activation recompute and CUDA graphs, the attention backend, and the ``parallel`` section (TP / PP /
VPP / DP / CP / EP, communication overlap): torch_dist checkpoints are resharded on load. Turning the distributed
optimizer on or off is a new run (its optimizer state does not load into the other optimizer), and so, with it, is
another gradient bucket layout (``bucket_size``, ``overlap_grad_reduce``). The iteration count may grow (a larger
``train_iters`` continues the run; the learning-rate schedule keeps the length the run started with, megatron-core's
checkpointed scheduler values), not shrink.

A run whose identity changed is another run: the caller moves the old folder aside and :func:`describe_change`
names the keys that changed (``train.seed: 1234 -> 7``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_ipt.manifest import fingerprint

RECORD = "run.json"  # in the training folder: {"identity", "settings", "iterations"}
# keys that may change between restarts of one run ("section.*": the whole section)
RESTARTABLE = frozenset({
    "parallel.*", "model.attention_backend",
    "train.device", "train.recompute", "train.recompute_method", "train.recompute_num_layers",
    "train.recompute_modules", "train.cuda_graph", "train.log_interval", "train.tensorboard", "train.wandb_project",
    "train.wandb_name", "train.mlflow_tracking_uri", "train.mlflow_experiment", "train.eval_interval",
    "train.save_checkpoint", "train.save_interval", "train.async_save", "train.keep_last",
    "train.exit_duration_minutes",
})
# ... except these: the distributed optimizer's checkpoint (megatron-core's ``dp_reshardable`` format) loads into a
# distributed optimizer at another DP size, but not into the plain one, nor the plain one's into it; and it is
# saved per gradient bucket, so with it the bucket layout (bucket_size, and overlap_grad_reduce, without which
# megatron-core makes one bucket) must stay too (tried: another bucket_size fails with a global shape mismatch)
IDENTITY = frozenset({"parallel.use_distributed_optimizer"})
DISTRIBUTED_OPTIMIZER_IDENTITY = frozenset({"parallel.bucket_size", "parallel.overlap_grad_reduce"})


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value


def restartable(key: str) -> bool:
    """Whether the dotted config key may change between restarts of one run."""
    return key not in IDENTITY and (key in RESTARTABLE or f"{key.split('.', 1)[0]}.*" in RESTARTABLE)


def run_record(sections: dict[str, dict], iterations_key: str, iterations: int, inputs: dict[str, Any]) -> dict:
    """The record of a run: ``sections`` (name -> the section's JSON dump, e.g. ``{"model": ...}``) flattened to
    dotted keys, less the :func:`restartable` ones and ``iterations_key`` (the iteration count, which may grow);
    ``inputs`` (e.g. ``{"tokenized": FINGERPRINT}``) are part of the identity as they are. Returns
    ``{"identity": SHA-256 of the settings, "settings": {dotted key: value}, "iterations": {key: n}}``."""
    settings: dict[str, Any] = {}
    for name, dump in sections.items():
        _flatten(name, dump, settings)
    keep = DISTRIBUTED_OPTIMIZER_IDENTITY if settings.get("parallel.use_distributed_optimizer") else frozenset()
    settings = {k: v for k, v in settings.items() if (k in keep or not restartable(k)) and k != iterations_key}
    settings.update({f"inputs.{k}": v for k, v in inputs.items()})
    return {"identity": fingerprint("run", settings), "settings": settings, "iterations": {iterations_key: iterations}}


def stage_fingerprint(record: dict) -> str:
    """The stage fingerprint of a finished run (its manifest's): the identity and the iteration count, so a
    finished run is up to date until its identity changes or ``train_iters`` grows."""
    return fingerprint("run-finished", record["identity"], record["iterations"])


def read_record(folder: Path) -> dict | None:
    """``folder/run.json``, or None when absent or unreadable (a folder of an older version or another tool)."""
    try:
        record = json.loads((Path(folder) / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and {"identity", "settings", "iterations"} <= record.keys() else None


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def changes(old: dict | None, new: dict) -> list[str] | None:
    """None when ``new`` continues the run ``old`` records (same identity, iterations not fewer); else the
    differences, ``"KEY: OLD -> NEW"`` each (``["no run.json"]`` for a folder without a record)."""
    if old is None:
        return ["no run.json"]
    (key, n), = new["iterations"].items()
    was = old["iterations"].get(key)
    if old["identity"] == new["identity"] and isinstance(was, int) and n >= was:
        return None
    before, after = old["settings"], new["settings"]
    both = [k for k in sorted(before.keys() & after.keys()) if before[k] != after[k]]
    # a key on one side only (one that defines the run only with another setting, or a newer version's key)
    one = sorted(before.keys() ^ after.keys())
    diff = [f"{k}: {_show(before.get(k, '(unset)'))} -> {_show(after.get(k, '(unset)'))}" for k in (both or one)]
    if not isinstance(was, int) or n < was:
        diff.append(f"{key}: {was} -> {n} (may only grow)")
    return diff or ["the run's identity fingerprint"]  # e.g. a record written by another version


def describe_change(folder: Path, diff: list[str], aside: Path) -> str:
    """One line: which run the folder held, what changed, where it went."""
    shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
    return f"{folder} held a different run ({shown}); moved it to {aside}"
