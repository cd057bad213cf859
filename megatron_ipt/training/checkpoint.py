"""Distributed checkpoints (torch_dist format) of model, optimizer, scheduler, progress and RNG.

Layout: ``out/checkpoints/iter_{N:07d}/`` written by ``megatron.core.dist_checkpointing.save`` and a
``out/checkpoints/latest`` text file holding ``N``, replaced atomically only after every rank finished
the save; a crash mid-save therefore leaves ``latest`` pointing at the previous complete checkpoint.

What is saved (mirroring Megatron-LM's ``generate_state_dict``):
- ``model``: ``model.sharded_state_dict()`` (resharded on load when TP/PP change); with virtual pipeline stages
  one entry per model chunk, ``model0``, ``model1``, ... (Megatron-LM's keys). Every chunk's sharded keys are
  global (layer ``k`` of the whole model), so a checkpoint saved with any number of chunks loads into any other
  (e.g. PP=2 x VPP=2 -> PP=1): torch_dist matches tensors by those keys, not by the dict they sit in;
- ``optimizer``: ``optimizer.sharded_state_dict(..., metadata={"distrib_optim_sharding_type":
  "dp_reshardable"})`` (the default format fails for the distributed optimizer);
- ``opt_param_scheduler``, ``iteration``, ``consumed_samples``, ``extra`` (common, saved once);
- ``rng_state``: python / numpy / torch / cuda RNG and megatron's RNG tracker, one object per rank.

Saves are synchronous by default. megatron's torch_dist writer collects write results through a queue that it
creates, on first use, in a *spawned* ``multiprocessing.Manager`` process; spawning re-imports the
caller's main module, which breaks any script without an ``if __name__ == "__main__":`` guard (and
costs seconds). A synchronous save runs that collection in this process, so :func:`save_checkpoint`
hands the writer a plain in-process ``queue.Queue`` for the duration of the save instead
(:func:`_in_process_write_results_queue`); the file writers themselves are forked, which needs no guard.
An async save (``train.async_save``: ``save_checkpoint(..., async_queue=...)``) is megatron-core's own: a forked
process writes the tensors and reports through megatron's Manager queue (so the guard matters there), and
``layout.json`` / ``latest`` are written by the request's finalize step once every rank finished.

Cross-version: every call into ``dist_checkpointing`` goes through :mod:`megatron_ipt.training.mcore` (keywords
only; its positional parameters moved between versions), which also writes the ``common.pt`` file that
megatron-core 0.16.1 needs and 0.17+ no longer write, so a checkpoint saved with either end of the
supported range resumes on the other (tested by ``tests/test_crossversion.py``).
"""

from __future__ import annotations

import contextlib
import json
import queue
import random
import re
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from megatron_ipt.training import checkpoint_trust, mcore
from megatron_ipt.manifest import atomic_write_text

_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
LATEST = "latest"
LAYOUT = "layout.json"  # the (pipeline, tensor, data) parallel sizes a checkpoint was saved with


@dataclass
class Progress:
    """Training progress restored from a checkpoint: iterations done and samples consumed."""

    iteration: int = 0
    consumed_samples: int = 0
    extra: dict | None = None


def checkpoint_dir(root: Path, iteration: int) -> Path:
    """``root/iter_{iteration:07d}``."""
    return Path(root) / f"iter_{iteration:07d}"


def iteration_folders(root: Path, *, complete: bool = False) -> list[tuple[int, Path]]:
    """``(N, root/iter_N)`` for every ``iter_<digits>`` folder under ``root``, sorted by N as a number (so
    ``iter_10000000`` comes after ``iter_9999999``). With ``complete``, only the checkpoints whose save finished
    on every rank (``layout.json`` is written after that, before ``latest``)."""
    found = [(int(p.name[5:]), p) for p in Path(root).glob("iter_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted((n, p) for n, p in found if not complete or (p / LAYOUT).is_file())


def latest_iteration(root: Path) -> int | None:
    """The iteration named by ``root/latest``, or None when there is no finished checkpoint.

    A ``latest`` naming a missing folder falls back, with a warning, to the newest complete checkpoint
    (:func:`iteration_folders`); raises ValueError naming the file when it does not hold an integer, or names a
    missing folder and no complete checkpoint is left.
    """
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected an iteration number, found {text!r}")
    iteration = int(text)
    if not checkpoint_dir(root, iteration).is_dir():
        complete = iteration_folders(root, complete=True)
        if not complete:
            raise ValueError(f"{path}: names iteration {iteration}, but {checkpoint_dir(root, iteration)} is missing")
        warnings.warn(f"{path}: names iteration {iteration}, but {checkpoint_dir(root, iteration)} is missing; "
                      f"using the newest complete checkpoint, {complete[-1][1]}", stacklevel=2)
        return complete[-1][0]
    return iteration


def _ranks() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    ps = mcore.parallel_state()
    shape = (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
    )
    offset = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    return shape, offset


def _rng_state() -> dict[str, Any]:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": mcore.cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    mcore.cuda_rng_tracker().set_states(state["tracker"])


def _chunks(model) -> list[torch.nn.Module]:
    """The modules that own ``sharded_state_dict``: one per model chunk (``model`` is a module or a list)."""
    return [_unwrap(m) for m in (model if isinstance(model, (list, tuple)) else [model])]


def _model_keys(n: int) -> list[str]:
    """``["model"]`` for one chunk, ``["model0", "model1", ...]`` for virtual pipeline chunks (Megatron-LM's keys)."""
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def _model_state_dicts(chunks: list[torch.nn.Module]) -> dict:
    """Each chunk's ``sharded_state_dict()`` under its :func:`_model_keys` key."""
    return {key: chunk.sharded_state_dict() for key, chunk in zip(_model_keys(len(chunks)), chunks)}


def _load_model_state(chunks: list[torch.nn.Module], state: dict) -> None:
    for key, chunk in zip(_model_keys(len(chunks)), chunks):
        chunk.load_state_dict(state[key], strict=True)


def _sharded_state_dict(chunks: list[torch.nn.Module], optimizer, scheduler, progress: Progress, *,
                        is_loading: bool) -> dict:
    models = _model_state_dicts(chunks)
    # The optimizer maps its params to the models' sharded tensors (a nested dict of all chunks is walked whole).
    model_sd = models["model"] if len(chunks) == 1 else models
    shape, offset = _ranks()
    return {
        **models,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=dict(_OPTIMIZER_METADATA)),
        "opt_param_scheduler": scheduler.state_dict(),
        "optimizer_step": adam_step(optimizer),
        "iteration": progress.iteration,
        "consumed_samples": progress.consumed_samples,
        "extra": progress.extra or {},
        "rng_state": mcore.sharded_object(
            key="rng_state", data=_rng_state(), global_shape=shape, global_offset=offset, replica_id=0
        ),
    }


def _inner_optimizers(optimizer) -> list:
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer]) if hasattr(o, "optimizer")]


def adam_step(optimizer) -> int | None:
    """Adam's step count (its bias correction) from the torch optimizer states, or None before the first step."""
    steps = [float(st["step"]) for inner in _inner_optimizers(optimizer) for st in inner.state.values() if "step" in st]
    return int(max(steps)) if steps else None


def _restore_adam_step(optimizer, step: int | None) -> None:
    """Set every Adam state's ``step`` to the saved count.

    megatron-core's distributed optimizer with the ``dp_reshardable`` checkpoint format leaves ``step`` at the
    value ``_init_optimizer_states_with_dummy_values`` gave it (1) on load (0.16.1), so the bias correction
    of every later step was wrong (seen as a ~3e-4 relative loss difference on the 2nd iteration after a
    DP=2 resume). A no-op when the loaded state already holds ``step``.
    """
    if step is None:
        return
    for inner in _inner_optimizers(optimizer):
        for st in inner.state.values():
            if "step" in st:
                st["step"] = torch.tensor(float(step), dtype=st["step"].dtype, device=st["step"].device) \
                    if torch.is_tensor(st["step"]) else step
        for group in inner.param_groups:
            if "step" in group:
                group["step"] = step


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module that owns ``sharded_state_dict`` (inside DDP; Float16Module delegates itself)."""
    return model.module if hasattr(model, "module") and hasattr(model, "ddp_config") else model


@contextlib.contextmanager
def _in_process_write_results_queue() -> Iterator[None]:
    """Give megatron's FileSystemWriterAsync an in-process results queue while a synchronous save runs.

    Leaves megatron alone when the module or its ``_results_queue`` global is absent (other versions)
    or already set (an async save set it up).
    """
    filesystem_async = mcore.filesystem_async_module()
    if filesystem_async is None:
        yield
        return
    if getattr(filesystem_async, "_results_queue", "absent") is not None:
        yield
        return
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = None


def save_checkpoint(root: Path, model: torch.nn.Module, optimizer, scheduler, progress: Progress, *,
                    keep_last: int | None = None, async_queue=None) -> float:
    """Save ``root/iter_{N:07d}`` (torch_dist) then atomically point ``root/latest`` at it; returns seconds.

    Must be called on every rank. ``model``: one module or the list of model chunks, DDP-wrapped or not.
    ``keep_last``: then remove all but the newest K checkpoints (:func:`prune_checkpoints`, rank 0).
    Mirrors Megatron-LM's ``save_checkpoint`` with ``--ckpt-format torch_dist``; synchronous unless
    ``async_queue`` (:func:`megatron_ipt.training.mcore.async_calls_queue`) is given: then a save still in flight is
    finished first, the state is handed to megatron's async writer (a forked process writes the tensors while
    training goes on), and ``layout.json``, ``latest`` and pruning happen in the request's finalize step, once
    every rank's files are written (``async_queue.maybe_finalize_async_calls``). The seconds returned are then
    the time training was blocked.
    """
    start = time.perf_counter()
    if async_queue is not None:
        async_queue.maybe_finalize_async_calls(blocking=True)  # one save in flight at a time
    directory = checkpoint_dir(root, progress.iteration)
    rank = torch.distributed.get_rank()
    if rank == 0:
        if directory.exists() and latest_iteration(root) != progress.iteration:
            import shutil

            shutil.rmtree(directory)  # left half-written by an interrupted save ('latest' never named it)
        directory.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    chunks = _chunks(model)
    state = _sharded_state_dict(chunks, optimizer, scheduler, progress, is_loading=False)
    shape, _ = _ranks()
    layout = {**dict(zip(("pipeline", "tensor", "data"), shape)), "model_chunks": len(chunks)}
    finish = partial(_finish_save, Path(root), progress.iteration, layout, keep_last)
    if async_queue is None:
        with _in_process_write_results_queue():
            mcore.save_distributed(state, directory)
        finish()
    else:
        request = mcore.save_distributed_async(state, directory)
        request.finalize_fns.append(finish)
        async_queue.schedule_async_request(request)
    return time.perf_counter() - start


def _finish_save(root: Path, iteration: int, layout: dict, keep_last: int | None) -> None:
    """After every rank wrote its part: ``layout.json``, then ``latest`` (atomic), then pruning (rank 0)."""
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        atomic_write_text(checkpoint_dir(root, iteration) / LAYOUT, json.dumps(layout) + "\n")
        atomic_write_text(root / LATEST, f"{iteration}\n")
        if keep_last:
            prune_checkpoints(root, keep_last)
    torch.distributed.barrier()


def _init_optimizer_states(optimizer) -> None:
    """Give a fresh distributed optimizer real state tensors to load into (else it asserts on load)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
        if init is not None:
            init()


def load_checkpoint(root: Path, model: torch.nn.Module, optimizer, scheduler, *, iteration: int | None = None,
                    trust: bool = False) -> Progress:
    """Load ``root/iter_{N:07d}`` (``N`` from ``root/latest`` by default) into model, optimizer, scheduler, RNG.

    Returns the restored :class:`Progress`. Raises FileNotFoundError when there is nothing to load.
    Must be called on every rank, after the optimizer is built. Mirrors Megatron-LM's
    ``load_checkpoint`` for torch_dist: optimizer states are initialised first and the optimizer
    state is loaded under ``torch.no_grad()``. Unless ``trust``, the checkpoint's pickles are scanned first
    (:func:`megatron_ipt.training.checkpoint_trust.scan`: UntrustedCheckpointError naming a refused class).
    """
    if iteration is None:
        iteration = latest_iteration(root)
    if iteration is None:
        raise FileNotFoundError(f"no checkpoint to load: {Path(root) / LATEST} is missing")
    directory = checkpoint_dir(root, iteration)
    checkpoint_trust.check(directory, trust=trust)
    _init_optimizer_states(optimizer)
    chunks = _chunks(model)
    template = _sharded_state_dict(chunks, optimizer, scheduler, Progress(iteration), is_loading=True)
    saved_layout = json.loads((directory / LAYOUT).read_text()) if (directory / LAYOUT).is_file() else None
    shape, _ = _ranks()
    # Per-rank RNG states follow the (pipeline, tensor, data) grid; the number of model chunks does not matter.
    same_layout = saved_layout is None or tuple(saved_layout[k] for k in ("pipeline", "tensor", "data")) == shape
    if not same_layout:
        # Model and optimizer are resharded by megatron; per-rank RNG states have no counterpart in another
        # layout (Megatron-LM also drops them when TP/PP change): training continues with freshly seeded RNG.
        del template["rng_state"]
        if torch.distributed.get_rank() == 0:
            print(f"checkpoint: saved with layout {saved_layout}, loading into "
                  f"{dict(zip(('pipeline', 'tensor', 'data'), shape))}: resharding; RNG states not restored", flush=True)
    state = mcore.load_distributed(template, directory)
    _load_model_state(chunks, state)
    with torch.no_grad():
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["opt_param_scheduler"])
    _restore_adam_step(optimizer, state.get("optimizer_step"))
    if same_layout:
        _set_rng_state(state["rng_state"])
    return Progress(
        iteration=int(state["iteration"]),
        consumed_samples=int(state["consumed_samples"]),
        extra=state.get("extra") or {},
    )


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Remove all but the newest ``keep_last`` complete checkpoints (:func:`iteration_folders`, by iteration
    number) under ``root``; the one ``latest`` names is always kept, and a folder whose save has not finished
    (no ``layout.json``: an asynchronous save in flight, or one a crash interrupted) is neither counted nor
    removed. Call on rank 0 after a save finished. Returns the removed folders."""
    import shutil

    keep = latest_iteration(root)
    folders = [p for _, p in iteration_folders(root, complete=True)]
    removed = []
    for p in folders[: max(0, len(folders) - keep_last)]:
        if keep is not None and p == checkpoint_dir(root, keep):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The torch_dist folder to load from ``path``: a checkpoints folder with ``latest`` (its newest
    checkpoint) or an ``iter_*`` / converted folder holding megatron's ``metadata.json``.
    Raises FileNotFoundError naming the path when it is neither."""
    path = Path(path)
    if (path / LATEST).is_file():
        return checkpoint_dir(path, latest_iteration(path))  # type: ignore[arg-type]
    if (path / "metadata.json").is_file():
        return path
    raise FileNotFoundError(f"{path}: not a torch_dist checkpoint (no 'latest' file and no metadata.json)")


def save_model_weights(root: Path, model: torch.nn.Module, iteration: int = 0) -> Path:
    """Save the model's weights only (``{"model": sharded_state_dict}``, torch_dist) to ``root/iter_N`` and
    point ``root/latest`` at it: the layout :func:`load_model_weights` and ``train.init_from`` read (e.g. a
    checkpoint converted from Hugging Face). Must be called on every rank; returns the folder."""
    directory = checkpoint_dir(root, iteration)
    rank = torch.distributed.get_rank()
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    with _in_process_write_results_queue():
        mcore.save_distributed(_model_state_dicts(_chunks(model)), directory)
    torch.distributed.barrier()
    if rank == 0:
        atomic_write_text(Path(root) / LATEST, f"{iteration}\n")
    torch.distributed.barrier()
    return directory


def load_model_weights(path: str | Path, model: torch.nn.Module, *, trust: bool = False) -> Path:
    """Load model weights only from a torch_dist checkpoint (see :func:`resolve_checkpoint_dir`) into
    ``model`` (one module or the list of model chunks; any tensor/pipeline/virtual-pipeline layout: the
    checkpoint is resharded on load); optimizer state, scheduler,
    iteration and RNG are not read. Continual pre-training's starting point (Megatron-LM's
    ``--finetune --no-load-optim --no-load-rng``). Must be called on every rank; returns the folder read.
    Raises FileNotFoundError when ``path`` holds no checkpoint, UntrustedCheckpointError when its pickles name a
    class outside :mod:`~megatron_ipt.training.checkpoint_trust`'s list (not checked with ``trust``)."""
    directory = resolve_checkpoint_dir(path)
    checkpoint_trust.check(directory, trust=trust)
    chunks = _chunks(model)
    state = mcore.load_distributed(_model_state_dicts(chunks), directory)
    _load_model_state(chunks, state)
    return directory


def load_init_weights(path: str, model, *, trust: bool = False) -> Path:
    """Load the weights of ``train.init_from`` = ``path`` into ``model`` (:func:`load_model_weights`, ``trust``
    as there); returns the folder read. Raises DataError, one line naming the key: no checkpoint there, or one of
    another shape (the folder and the first tensor megatron-core found different, its shape in the checkpoint
    and in the model); UntrustedCheckpointError as :func:`load_model_weights`."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    from megatron_ipt.training.data import DataError

    from megatron_ipt.errors import IptError

    try:
        return load_model_weights(path, model, trust=trust)
    except FileNotFoundError as err:
        raise DataError(f"train.init_from = {path!r}: {err}") from None
    except IptError:
        raise
    except (Exception, CheckpointException) as err:  # megatron's report is 50+ lines: keep the informative one
        raise DataError(f"train.init_from = {path!r}: {resolve_checkpoint_dir(path)} does not fit the model config: "
                        f"{load_error_reason(err)}") from None


# megatron-core's CheckpointingException: "Global shape mismatch for loaded (torch.Size([2, 32])) and expected
# ((2, 64)) tensor for key decoder.layers...."
_SHAPE_MISMATCH = re.compile(r"shape mismatch for loaded (.*?) and expected (.*?) tensor for key (\S+)", re.IGNORECASE)


def load_error_reason(error: BaseException) -> str:
    """The informative line of a failed torch_dist load (megatron/torch wrap it in long multi-rank reports): a
    global shape mismatch as ``tensor KEY: shape (a, b) in the checkpoint, the model expects (c, d)``, else the first
    line naming a mismatch or a missing/unexpected key, else the first line."""
    text = str(error)
    if found := _SHAPE_MISMATCH.search(text):
        saved, expected, key = found.groups()
        shape = lambda dims: "(" + ", ".join(re.findall(r"\d+", dims)) + ")"  # noqa: E731
        return f"tensor {key}: shape {shape(saved)} in the checkpoint, the model expects {shape(expected)}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if any(k in line for k in ("mismatch", "Missing key", "Unexpected key", "not found", "size")):
            return line[:300]
    return (lines[0] if lines else type(error).__name__)[:300]
