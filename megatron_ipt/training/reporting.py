"""What a training run reports: rank 0's console lines and progress bar, ``metrics.jsonl``, memory.

Console lines carry Megatron-LM's iteration-log fields (iteration, loss, lr, grad norm, consumed samples,
ms/iteration, tokens/s, TFLOP/s per device, MFU, memory); ``metrics.jsonl`` holds the same records, one JSON
object per line, plus the held-out ``eval`` / ``heldout_before`` / ``heldout_after`` events.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

METRICS = "metrics.jsonl"


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak accelerator memory allocated (GiB) on cuda; this process's resident memory (GiB) on CPU."""
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    try:
        import psutil

        return {"rss_gib": psutil.Process().memory_info().rss / 2**30}
    except ImportError:
        return {}


def truncate_metrics(path: Path, iteration: int) -> int:
    """Drop ``metrics.jsonl`` records written after ``iteration`` (a resumed run rewrites them); returns how many.

    Kept: training records up to ``iteration``, ``eval`` events at or before it and, when resuming
    (``iteration > 0``), the ``heldout_before`` event; dropped: anything later, including a previous
    attempt's ``heldout_after``. A fresh start (``iteration == 0``) empties the file. Atomic rewrite.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            dropped += 1
            continue
        at = record.get("iteration", record.get("at_iteration"))
        keep = iteration > 0 and (record.get("event") == "heldout_before" if at is None else at <= iteration)
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        from megatron_ipt.manifest import atomic_write_text

        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped


class Reporter:
    """Rank 0's rich progress bar, log lines and ``metrics.jsonl``; silent on other ranks."""

    def __init__(self, out_dir: Path, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        self.total = total
        self.metrics = Path(out_dir) / METRICS
        self.progress = None
        if enabled:
            truncate_metrics(self.metrics, start)
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
            )
            self.task = self.progress.add_task("train", total=total, completed=start, status="")
            self.progress.start()

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        if "iteration" in record:
            self.progress.update(
                self.task, completed=record["iteration"],
                status=f"loss {record['loss']:.4f} lr {record['lr']:.2e} gnorm {record['grad_norm'] or 0:.3f} "
                f"{record['tokens_per_s']:.0f} tok/s",
            )
        self.progress.console.print(_log_line(record, self.total), soft_wrap=True, highlight=False)

    def advance(self, iteration: int) -> None:
        if self.enabled:
            self.progress.update(self.task, completed=iteration)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _log_line(record: dict, total: int) -> str:
    """One console line: Megatron-LM's iteration log fields, or an event with its values."""
    if "iteration" not in record:
        return " | ".join(f"{k} {_fmt(v)}" for k, v in record.items())
    parts = [f"iteration {record['iteration']:>{len(str(total))}}/{total}", f"loss {record['loss']:.4f}",
             f"lr {record['lr']:.3e}", f"grad norm {record['grad_norm'] or 0:.3f}",
             f"consumed samples {record['consumed_samples']}", f"{record['ms_per_iteration']:.0f} ms/it",
             f"{record['tokens_per_s']:.0f} tokens/s"]
    if "tflops_per_device" in record:
        parts.append(f"{record['tflops_per_device']:.3g} TFLOP/s per device")
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if "peak_memory_gib" in record:
        parts.append(f"mem {record['peak_memory_gib']:.1f} GiB")
    if record.get("skipped"):
        parts.append("skipped (inf/nan grad)")
    return " | ".join(parts)
