"""lm-evaluation-harness (PyPI ``lm-eval``, the ``eval`` extra) on a Hugging Face folder (a Megatron checkpoint
is exported to one first: :mod:`megatron_ipt.evaluate.hf_export`), results in the project's format.

:func:`run_harness` calls ``lm_eval.simple_evaluate`` with the ``hf`` model (``pretrained=FOLDER``; float32 on
CPU), a ``TaskManager`` that also reads the task YAMLs under ``include_path`` (local tasks, e.g.
``dataset_path: json`` over a JSONL file), and turns its output into one results record per task or group:
metric keys ``"acc,none"`` become ``acc`` (another filter ``f``: ``acc/f``), non-numeric values (``"N/A"``
stderr) are dropped, ``n`` is the number of documents evaluated (``n-samples.effective``; for a group, the sum
over its tasks). Hub access is whatever the environment allows; set ``HF_HUB_OFFLINE=1`` /
``HF_DATASETS_OFFLINE=1`` for local tasks only. Checked with lm-eval 0.4.13 (transformers 5, torch 2.13).
"""

from __future__ import annotations

from pathlib import Path

from megatron_ipt.errors import IptError


class HarnessError(IptError, RuntimeError):
    """lm-eval is missing, or a task cannot be found or loaded; the message names the task or folder."""


def task_manager(tasks: list[str], include_path: str | Path | None = None):
    """lm-eval's ``TaskManager`` that knows every one of ``tasks`` (the YAMLs under ``include_path`` too).
    Raises HarnessError when lm-eval is not installed, ``include_path`` is not a folder or a task is unknown."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise HarnessError("lm-evaluation-harness is not installed: pip install -e '.[eval]'") from None
    if include_path is not None and not Path(include_path).is_dir():
        raise HarnessError(f"{include_path}: --include-path is not a folder")
    # Indexing lm-eval's built-in tasks takes ~20 s: skipped when the local folder has every task asked for.
    manager = TaskManager(include_path=str(include_path), include_defaults=False) if include_path else None
    if manager is None or _unknown(manager, tasks):
        manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = _unknown(manager, tasks)
    if unknown:
        where = f" (built-in tasks and {include_path})" if include_path else " (built-in tasks)"
        raise HarnessError(f"unknown lm-eval task(s) {unknown}{where}")
    return manager


def run_harness(folder: str | Path, tasks: list[str], *, include_path: str | Path | None = None,
                limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 1,
                device: str = "cpu", manager=None) -> dict:
    """Run lm-eval's ``simple_evaluate`` on the Hugging Face ``folder``; returns its results dict (without
    samples). ``manager``: a :func:`task_manager` already built for ``tasks`` (default: built here). Raises
    HarnessError when lm-eval is not installed, the folder is not a model folder or a task is unknown."""
    folder = Path(folder)
    if manager is None:
        if not (folder / "config.json").is_file():
            raise HarnessError(f"{folder}: not a Hugging Face model folder (no config.json)")
        manager = task_manager(tasks, include_path)
    import lm_eval

    model_args = {"pretrained": str(folder), "dtype": "float32" if device == "cpu" else "auto"}
    try:
        return lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=list(tasks), num_fewshot=num_fewshot,
                                       limit=limit, batch_size=batch_size, device=device, task_manager=manager,
                                       log_samples=False)
    except FileNotFoundError as e:  # a local task's data_files
        raise HarnessError(f"lm-eval task {tasks}: {e}") from None


def _unknown(manager, tasks: list[str]) -> list[str]:
    return [t for t in tasks if not manager.match_tasks([t])]


def metric_name(key: str) -> str:
    """lm-eval's ``"metric,filter"`` key as a metric name: ``acc,none`` -> ``acc``, ``exact_match,strict`` ->
    ``exact_match/strict``."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}/{filt}"


def records(results: dict) -> list[tuple[str, dict, int, dict]]:
    """``(task, metrics, n, settings)`` per task and group of an lm-eval results dict (module docstring)."""
    n_samples = {t: int(c["effective"]) for t, c in results.get("n-samples", {}).items()}
    subtasks = results.get("group_subtasks", {})

    def count(task: str) -> int:
        if task in n_samples:
            return n_samples[task]
        return sum(count(t) for t in subtasks.get(task, []))

    out = []
    for section in ("results", "groups"):
        for task, values in results.get(section, {}).items():
            if any(task == t for t, *_ in out):
                continue
            metrics = {metric_name(k): float(v) for k, v in values.items()
                       if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
            settings = {"num_fewshot": results.get("n-shot", {}).get(task),
                        "version": results.get("versions", {}).get(task),
                        "higher_is_better": results.get("higher_is_better", {}).get(task)}
            out.append((task, metrics, count(task), settings))
    return out
