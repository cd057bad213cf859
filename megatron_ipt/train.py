"""The ``train`` stage: continual pre-training of a megatron-core GPT model on the IPT blend.

Reads top to bottom: set up devices and process groups -> build model, DDP, optimizer, scheduler ->
build the blend and the held-out sets -> resume if a checkpoint exists -> evaluate held-out loss ->
train (megatron's ``get_forward_backward_func`` schedule, so pipeline parallel works) -> evaluate ->
save a checkpoint -> write ``metrics.jsonl`` lines and the stage manifest.

Everything megatron-specific is megatron-core's public API (``get_megatron_optimizer``,
``OptimizerParamScheduler``, ``DistributedDataParallel``, ``finalize_model_grads``), called through
:mod:`megatron_ipt.mcore` (keywords only, config objects built from their actual fields), so every
megatron-core version in ``mcore.SUPPORTED`` runs the same code.
On CPU the whole stage runs inside :func:`megatron_ipt.cpu_backend.cpu_backend`.
"""

from __future__ import annotations

import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from megatron_ipt import checkpoint, cpu_backend, data, mcore, metrics, parallel, signals
from megatron_ipt.config import ExperimentConfig
from megatron_ipt.manifest import read_manifest, write_manifest
from megatron_ipt.model import build_model_chunks
from megatron_ipt.presets import padded_vocab_size, resolve_preset

METRICS = "metrics.jsonl"
STOPPED = "stopped.json"  # written by rank 0 when a run saved and stopped early on request (signal, time budget)
MIN_EVAL_SEQ_LENGTH = 16  # tokens; a held-out set shorter than this is not evaluated
PER_SPLIT_EVAL_MICRO_BATCHES = 10  # per DP rank: the size of a weighted blend.per_split valid/test set without eval_iters


def _say(message: str) -> None:
    """Print a notice once (rank 0)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(message, flush=True)


# ---------------------------------------------------------------------------------------------- setup
def build_optimizer(cfg: ExperimentConfig, model: list[torch.nn.Module]):
    """megatron's optimizer over the model chunks (``get_megatron_optimizer``: Adam with decoupled weight decay, grad clipping,
    the distributed optimizer when ``parallel.use_distributed_optimizer``) and its
    ``OptimizerParamScheduler`` (linear warmup, then cosine / linear / constant decay to ``min_lr``,
    stepped once per iteration)."""
    t = cfg.train
    bf16 = t.precision == "bf16"
    optimizer = mcore.optimizer(
        model=model, optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=1e-8, clip_grad=t.clip_grad,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    scheduler = mcore.param_scheduler(
        optimizer=optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, **lr_schedule(t),
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_style="constant",
    )
    return optimizer, scheduler


def lr_schedule(t) -> dict[str, Any]:
    """``OptimizerParamScheduler`` arguments for the configured schedule (iterations are scheduler steps).

    Linear warmup over ``lr_warmup_iters`` from 0 to ``lr``, then until ``train_iters``: ``cosine`` or
    ``linear`` decay to ``min_lr``; ``constant`` at ``lr``; ``wsd`` (warmup-stable-decay, Hu et al., MiniCPM,
    arXiv 2404.06395 §4): ``lr`` until the last ``lr_wsd_decay_fraction`` of the iterations, then
    ``lr_wsd_decay_style`` down to ``min_lr`` (megatron-core's ``WSD`` style)."""
    decay_iters = max(t.train_iters - t.lr_warmup_iters, 1) + t.lr_warmup_iters
    out: dict[str, Any] = {"lr_warmup_steps": t.lr_warmup_iters, "lr_decay_steps": decay_iters,
                           "lr_decay_style": t.lr_decay_style, "wd_incr_steps": decay_iters}
    if t.lr_decay_style == "wsd":
        out["lr_decay_style"] = "WSD"
        out["wsd_decay_steps"] = max(1, min(decay_iters - t.lr_warmup_iters, round(t.lr_wsd_decay_fraction * t.train_iters)))
        out["lr_wsd_decay_style"] = t.lr_wsd_decay_style
    return out


def wrap_ddp(cfg: ExperimentConfig, chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """megatron-core's ``DistributedDataParallel`` around each model chunk, wired into the (shared) model config
    the way Megatron-LM's ``setup_model_and_optimizer`` does (``no_sync_func``: one per chunk, a list with
    virtual pipeline stages; ``finalize_model_grads_func``) so the schedule reduces grads. Returns the list."""
    config = chunks[0].config
    wrapped, finalize_model_grads = [], None
    for chunk in chunks:
        ddp, finalize_model_grads = mcore.distributed_data_parallel(
            config=config, module=chunk,
            grad_reduce_in_fp32=cfg.train.precision == "bf16",
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        )
        wrapped.append(ddp)
    no_sync = [ddp.no_sync for ddp in wrapped]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


# ------------------------------------------------------------------------------------------ one step
def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Mean per-token loss of a micro-batch, plus its (sum, tokens) for exact token-weighted reporting.

    The schedule divides the returned loss in place, so the reported numbers are detached clones.
    """
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss_sum = torch.sum(losses * mask)
    tokens = mask.sum()
    loss = loss_sum / tokens.clamp(min=1.0)
    return loss, {"loss_sum": loss_sum.detach().clone(), "tokens": tokens.detach().clone()}


def _forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
    """The schedule's ``forward_step_func``: one micro-batch through the model (per-token losses)."""
    batch = next(data_iterator)
    device = next(model.parameters()).device  # batches are built on the host; a no-op on CPU
    batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    output = model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=batch.get("attention_mask"),
        labels=batch["labels"],
    )
    return output, partial(_loss_func, batch["loss_mask"])


def _reduce_losses(outputs: list[dict]) -> tuple[float, float]:
    """Sum (loss_sum, tokens) over micro-batches and data-parallel ranks; the same result on every rank.

    Only the last pipeline stage has losses, and tensor-parallel ranks hold copies, so only
    (last stage, TP rank 0) ranks contribute to a world all-reduce.
    """
    ps = mcore.parallel_state()

    totals = torch.zeros(2, dtype=torch.float64, device=_collective_device())
    contributes = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    if contributes:
        for out in outputs:
            totals[0] += float(out["loss_sum"])
            totals[1] += float(out["tokens"])
    torch.distributed.all_reduce(totals)
    return float(totals[0]), float(totals[1])


def evaluate(model: list[torch.nn.Module], forward_backward: Callable, dataset, cfg: ExperimentConfig,
             layout: parallel.Layout, seq_length: int | None = None) -> float:
    """Mean per-token loss (nats) over the whole held-out ``dataset`` (or ``train.eval_iters`` batches).

    ``model``: the model chunks. ``seq_length``: the dataset's sequence length (default ``model.seq_length``;
    shorter for small sets). With virtual pipeline stages the micro-batch count is rounded up to a multiple of
    the pipeline size (the interleaved schedule needs it; the extra micro-batches carry a zero loss mask).
    """
    ps = mcore.parallel_state()

    multiple = layout.pipeline_model_parallel_size if layout.virtual_pipeline_model_parallel_size else 1
    iterators = []
    for _chunk in model:  # the interleaved schedule takes one iterator per model chunk (Megatron-LM's convention)
        count, batches = data.eval_micro_batches(
            dataset, micro_batch_size=layout.micro_batch_size,
            data_parallel_rank=ps.get_data_parallel_rank(), data_parallel_size=layout.data_parallel_size,
            max_batches=cfg.train.eval_iters, multiple_of=multiple,
        )
        iterators.append(batches)
    for chunk in model:
        chunk.eval()
    with torch.no_grad():
        outputs = forward_backward(
            forward_step_func=_forward_step, data_iterator=iterators, model=model, num_microbatches=count,
            seq_length=seq_length or cfg.model.seq_length, micro_batch_size=layout.micro_batch_size, forward_only=True,
        )
    for chunk in model:
        chunk.train()
    loss_sum, tokens = _reduce_losses(outputs or [])
    return loss_sum / max(tokens, 1.0)


def train_step(model: list[torch.nn.Module], optimizer, scheduler, forward_backward: Callable,
               batches: list[Iterator[dict]], cfg: ExperimentConfig, layout: parallel.Layout) -> dict:
    """One iteration (Megatron-LM's ``train_step``): zero grads, forward/backward over the micro-batches,
    optimizer step, scheduler step. ``model`` / ``batches``: the model chunks and one micro-batch iterator per
    chunk. Returns loss (token-weighted mean), lr, grad norm, skipped flag."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = forward_backward(
        forward_step_func=_forward_step, data_iterator=batches, model=model,
        num_microbatches=layout.num_microbatches, seq_length=cfg.model.seq_length,
        micro_batch_size=layout.micro_batch_size, forward_only=False,
    )
    ok, grad_norm, _num_zeros = optimizer.step()
    lr = optimizer.param_groups[0]["lr"]  # the lr this step used
    scheduler.step(increment=1)
    loss_sum, tokens = _reduce_losses(outputs or [])
    return {"loss": loss_sum / max(tokens, 1.0), "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None, "skipped": not ok}


# ----------------------------------------------------------------------------------------- reporting
def _memory(device: torch.device) -> dict[str, float]:
    """Peak accelerator memory allocated (GiB) on cuda; this process's resident memory (GiB) on CPU."""
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    try:
        import psutil

        return {"rss_gib": psutil.Process().memory_info().rss / 2**30}
    except ImportError:
        return {}


def _parameter_count(model: list[torch.nn.Module]) -> int:
    """Parameters of the whole model: this rank's non-duplicated params (all chunks) summed over TP and PP ranks."""
    ps = mcore.parallel_state()

    local = sum(p.numel() for chunk in model for p in chunk.parameters()
                if mcore.param_is_not_tensor_parallel_duplicate(p))
    total = torch.tensor([local], dtype=torch.int64, device=_collective_device())
    torch.distributed.all_reduce(total, group=ps.get_model_parallel_group())
    return int(total.item())


def _collective_device() -> torch.device:
    """Where tensors for torch.distributed collectives live: the current GPU under NCCL, else the CPU (gloo)."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


class _Reporter:
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


# ----------------------------------------------------------------------------------------- the stage
def train_stage(cfg: ExperimentConfig, tokenized_dir: Path, out_dir: Path, fingerprint: str,
                *, exit_after_iterations: int | None = None) -> dict:
    """Train ``cfg.model`` on the blend of ``train_raw`` / ``train_ipt`` in ``tokenized_dir``; returns the summary.

    ``tokenized_dir`` holds Megatron indexed datasets ``train_raw``, ``train_ipt``, ``heldout_raw``,
    ``heldout_pairs`` and a tokenize ``manifest.json`` with ``tokenizer.{path, vocab_size, eod_id}``.
    Resumes from ``out_dir/checkpoints/latest`` when present (exact: same losses as an uninterrupted run).
    ``cfg.blend.extra`` adds indexed datasets outside ``tokenized_dir`` to the blend; each extra's
    ``valid_prefix`` becomes one more held-out component (``heldout_<name>``). ``cfg.blend.per_split`` replaces the
    training blend by its ``train`` blend (megatron-core's ``blend_per_split``); its ``valid`` and ``test`` blends
    are evaluated as components ``valid`` and ``test`` (``test`` before and after training only) and, for a blend of
    several datasets, each dataset on its own too (``valid.STEM`` / ``test.STEM``, :func:`data.split_component_keys`).
    Held-out losses are measured before training (stored in the checkpoint on resume), after, and every
    ``train.eval_interval`` iterations (``metrics.jsonl`` event ``eval``). On resume, ``metrics.jsonl``
    records after the checkpoint's iteration are dropped (:func:`truncate_metrics`).
    ``exit_after_iterations`` stops early after that many total iterations, saving a checkpoint and
    writing no manifest (Megatron-LM's ``--exit-interval``; used to test resume).
    On rank 0 writes ``out_dir/metrics.jsonl`` and, when finished, ``out_dir/manifest.json``.
    Must be called on every rank. Raises ManifestError / FileNotFoundError / ``data.DataError`` (naming the
    config key) for bad inputs, before any process group is built, and ParallelLayoutError for a layout
    that does not divide.
    """
    device = parallel.resolve_device(cfg.train.device)
    with cpu_backend.cpu_backend(enabled=device.type == "cpu"):
        try:
            return _run(cfg, Path(tokenized_dir), Path(out_dir), fingerprint, device, exit_after_iterations)
        finally:
            parallel.teardown()


def _run(cfg: ExperimentConfig, tokenized_dir: Path, out_dir: Path, fingerprint: str,
         device: torch.device, exit_after: int | None) -> dict:
    ps = mcore.parallel_state()

    started = time.time()
    mcore.warn_if_unsupported()
    t = cfg.train
    tokenize_manifest = read_manifest(tokenized_dir, "tokenize")
    tokenizer = data.DatasetTokenizer.from_manifest(tokenize_manifest)
    data.check_prefixes(tokenized_dir, data.TRAIN_PREFIXES + data.HELDOUT_PREFIXES)
    if t.init_from and checkpoint.latest_iteration(out_dir / "checkpoints") is None:
        try:
            checkpoint.resolve_checkpoint_dir(t.init_from)
        except FileNotFoundError as err:
            raise data.DataError(f"train.init_from = {t.init_from!r}: {err}") from None
    for i, component in enumerate(cfg.blend.extra):  # before any process group or model is built
        data.check_extra_prefix(component.prefix, f"blend.extra[{i}].prefix")
        if component.valid_prefix:
            data.check_extra_prefix(component.valid_prefix, f"blend.extra[{i}].valid_prefix")
    per_split = None
    if cfg.blend.per_split is not None:
        per_split = data.check_per_split({split: [(c.prefix, c.weight) for c in getattr(cfg.blend.per_split, split)]
                                          for split in data.SPLITS}, tokenized_dir)
    preset = resolve_preset(cfg.model)

    if cfg.parallel.nproc_per_node > 1 and not parallel.launched_by_torchrun():
        raise RuntimeError(
            f"parallel.nproc_per_node = {cfg.parallel.nproc_per_node} but this process was not started by torchrun; "
            "start it through megatron_ipt.launch.relaunch_under_torchrun (the ipt CLI does)"
        )
    # Process groups and layout (every divisibility rule checked before anything is built).
    layout = parallel.setup(
        cfg.parallel, device, micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
        num_layers=preset.num_layers, num_attention_heads=preset.num_attention_heads,
        num_query_groups=preset.num_query_groups, seed=t.seed, seq_length=cfg.model.seq_length,
    )
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)

    # Model, DDP, optimizer, schedule.
    # A model taken from Hugging Face keeps its own (possibly larger) embedding table, padded the same way.
    model_vocab = max(tokenizer.vocab_size, preset.vocab_size) if cfg.model.hf_config else tokenizer.vocab_size
    vocab_size = padded_vocab_size(model_vocab, layout.tensor_model_parallel_size)
    from megatron_ipt.model import transformer_engine_available
    from megatron_ipt.precision import precision_fields, resolve_transformer_impl

    te = transformer_engine_available()
    impl = resolve_transformer_impl(cfg.model.transformer_impl, device.type, te)
    fields = precision_fields(t, impl, device.type, te, preset.num_layers, layout.pipeline_model_parallel_size)
    # One chunk per virtual pipeline stage (one without): the schedule, optimizer and checkpoints take the list.
    model = build_model_chunks(preset, layout, vocab_size=vocab_size, seq_length=cfg.model.seq_length,
                               device=device, precision=t.precision, transformer_impl=impl, precision_fields=fields)
    model = wrap_ddp(cfg, model)
    optimizer, scheduler = build_optimizer(cfg, model)
    forward_backward = mcore.forward_backward_func()
    parameters = _parameter_count(model)
    # Throughput in model FLOPs (megatron_ipt.metrics documents the formula); MFU where the device peak is known.
    flops_token = metrics.flops_per_token(preset, cfg.model.seq_length, vocab_size)
    peak = metrics.peak_tflops(torch.cuda.get_device_name() if device.type == "cuda" else None,
                               "fp8" if t.fp8 else "bf16") if t.precision == "bf16" else None

    # Data: the weighted blend for training, whole held-out prefixes for evaluation.
    cache_dir = out_dir / "blend_cache"
    common = dict(tokenizer=tokenizer, seq_length=cfg.model.seq_length, seed=t.seed, cache_dir=cache_dir)
    valid_set = test_set = None
    if per_split is not None:
        # A weighted valid/test blend has a size: what one evaluation reads (eval_iters micro-batches per DP rank).
        eval_samples = (t.eval_iters or PER_SPLIT_EVAL_MICRO_BATCHES) * layout.micro_batch_size * layout.data_parallel_size
        train_set, valid_set, test_set = data.build_per_split_datasets(
            per_split, num_samples=t.train_iters * t.global_batch_size, eval_samples=eval_samples, **common)
    elif cfg.blend.mock:
        train_set = data.build_mock_train_dataset(num_samples=t.train_iters * t.global_batch_size, **common)
    else:
        train_set = data.build_train_dataset(
            tokenized_dir, raw_weight=cfg.blend.raw_weight, instruct_weight=cfg.blend.instruct_weight,
            extra=[(c.prefix, c.weight) for c in cfg.blend.extra],
            num_samples=t.train_iters * t.global_batch_size, **common,
        )
    # Held-out components, keyed by their metric names: the tokenize stage's heldout_raw / heldout_pairs, then
    # each blend.extra valid_prefix, then blend.per_split's valid and test blends, each blend of several
    # datasets followed by its datasets one by one (valid.STEM; data.split_component_keys).
    heldout, eval_seq = {}, {}

    def add_heldout(key: str, prefix: Path) -> None:
        """A whole prefix as one held-out set; one shorter than a training sequence (few held-out documents got
        pairs) is evaluated as one shorter sequence; one under MIN_EVAL_SEQ_LENGTH tokens is not evaluated."""
        n = data.prefix_tokens(prefix.parent, prefix.name)
        seq = min(cfg.model.seq_length, n - 1)
        if seq < MIN_EVAL_SEQ_LENGTH:
            _say(f"train: {prefix.name} has {n} tokens, too few to evaluate")
            return
        if seq < cfg.model.seq_length:
            _say(f"train: {prefix.name} has {n} tokens, less than one sequence: evaluated as one sequence of {seq}")
        heldout[key] = data.build_heldout_dataset(prefix.parent, prefix.name, **{**common, "seq_length": seq})
        eval_seq[key] = seq

    for name in data.HELDOUT_PREFIXES:
        add_heldout(name, tokenized_dir / name)
    for c in cfg.blend.extra:
        if c.valid_prefix:
            add_heldout(f"heldout_{c.name}", Path(c.valid_prefix))
    for split, dataset in (("valid", valid_set), ("test", test_set)):
        if dataset is not None and len(dataset) == 0:
            _say(f"train: blend.per_split.{split} has no whole sequence of {cfg.model.seq_length} tokens: not evaluated")
        elif dataset is not None:
            heldout[split], eval_seq[split] = dataset, cfg.model.seq_length
        components = [prefix for prefix, _weight in (per_split or {}).get(split, [])]
        if len(components) > 1:  # a single dataset is the split's set itself: no second copy
            for key, prefix in zip(data.split_component_keys(split, components), components):
                add_heldout(key, prefix)
    every_eval = [k for k in heldout if k.partition(".")[0] != "test"]  # the test blend: before and after only

    # Resume, or measure the held-out losses before training.
    ckpt_root = out_dir / "checkpoints"
    load_seconds = None
    initialized_from = None
    if rank0:
        (out_dir / STOPPED).unlink(missing_ok=True)
    if checkpoint.latest_iteration(ckpt_root) is None and t.init_from:
        # Continual pre-training: weights only; optimizer, schedule (LR warms up again) and data start fresh.
        initialized_from = str(checkpoint.load_model_weights(t.init_from, model))
        reload = getattr(optimizer, "reload_model_params", None)
        if reload is not None:  # main (fp32) copies of bf16 params were taken when the optimizer was built
            reload()
        _say(f"train: initialised model weights from {initialized_from}")
    if checkpoint.latest_iteration(ckpt_root) is not None:
        tick = time.perf_counter()
        progress = checkpoint.load_checkpoint(ckpt_root, model, optimizer, scheduler)
        load_seconds = time.perf_counter() - tick
        before = progress.extra["heldout_before"]
    else:
        before = {k: evaluate(model, forward_backward, ds, cfg, layout, eval_seq[k]) for k, ds in heldout.items()}
        progress = checkpoint.Progress(iteration=0, consumed_samples=0)
    progress.extra = {"heldout_before": before}
    batches = [data.micro_batches(  # one iterator per model chunk, each over the same samples
        train_set, micro_batch_size=layout.micro_batch_size, data_parallel_rank=ps.get_data_parallel_rank(),
        data_parallel_size=layout.data_parallel_size, start_sample=progress.consumed_samples,
    ) for _chunk in model]

    # Train.
    stop = min(t.train_iters, exit_after) if exit_after is not None else t.train_iters
    tokens_per_iteration = t.global_batch_size * cfg.model.seq_length
    reporter = _Reporter(out_dir, t.train_iters, progress.iteration, enabled=rank0)
    tensorboard = metrics.TensorBoard(out_dir / "tensorboard", enabled=rank0 and t.tensorboard)
    resumed_from = progress.iteration
    train_seconds, first_seconds, last, window = 0.0, 0.0, {}, []
    stopper = signals.StopRequest(t.exit_duration_minutes, device=device)
    stopped_by = None

    # train.async_save: megatron-core's async checkpoint writer; finished before the next save and before returning.
    async_queue = mcore.async_calls_queue() if t.async_save else None

    def save() -> float:
        return checkpoint.save_checkpoint(ckpt_root, model, optimizer, scheduler, progress, keep_last=t.keep_last,
                                          async_queue=async_queue)

    try:
        stopper.__enter__()
        if resumed_from == 0:
            reporter.log({"event": "heldout_before", **before})
        while progress.iteration < stop:
            tick = time.perf_counter()
            last = train_step(model, optimizer, scheduler, forward_backward, batches, cfg, layout)
            seconds = time.perf_counter() - tick
            train_seconds += seconds
            first_seconds = first_seconds or seconds
            window.append(seconds)
            progress.iteration += 1
            progress.consumed_samples += t.global_batch_size
            if not math.isfinite(last["loss"]):
                raise FloatingPointError(f"iteration {progress.iteration}: loss is {last['loss']}")
            if async_queue is not None:  # finalize a background save every rank finished (Megatron-LM does it each step)
                async_queue.maybe_finalize_async_calls(blocking=False)
            if stopper.should_stop() and progress.iteration < stop:
                stopped_by = stopper.reason
                _say(f"train: {stopped_by} received: saving at iteration {progress.iteration} and stopping")
                break
            if t.save_interval and progress.iteration % t.save_interval == 0 and progress.iteration < stop:
                save()
            if t.eval_interval and progress.iteration % t.eval_interval == 0 and progress.iteration < t.train_iters:
                evals = {k: evaluate(model, forward_backward, heldout[k], cfg, layout, eval_seq[k]) for k in every_eval}
                reporter.log({"event": "eval", "at_iteration": progress.iteration, **evals})
                tensorboard.log({f"eval_{k}": v for k, v in evals.items()}, progress.iteration)
            if progress.iteration % t.log_interval == 0 or progress.iteration == stop:
                step_s = sum(window) / len(window)
                record = {
                    "iteration": progress.iteration, "loss": last["loss"], "lr": last["lr"],
                    "grad_norm": last["grad_norm"], "skipped": last["skipped"],
                    "consumed_samples": progress.consumed_samples, "ms_per_iteration": 1000 * step_s,
                    "tokens_per_s": tokens_per_iteration / step_s,
                    **metrics.throughput(tokens_per_iteration / step_s, flops_token, layout.world_size, peak),
                    **_memory(device),
                }
                reporter.log(record)
                tensorboard.log(record, progress.iteration)
                window = []
            else:
                reporter.advance(progress.iteration)
    except BaseException:
        if async_queue is not None:
            async_queue.close(abort=True)  # an error: 'latest' stays at the last finished checkpoint
        raise
    finally:
        stopper.__exit__()
        reporter.close()
        tensorboard.close()

    save_seconds = None
    trained = progress.iteration - resumed_from
    if (t.save_checkpoint or stop < t.train_iters or stopped_by) and trained > 0:
        save_seconds = save()
    if async_queue is not None:
        tick = time.perf_counter()
        async_queue.close()  # waits for the save in flight and finalizes it ('latest' moves)
        if save_seconds is not None:
            save_seconds += time.perf_counter() - tick
    if stopped_by and rank0:
        from megatron_ipt.manifest import atomic_write_text

        atomic_write_text(out_dir / STOPPED, json.dumps({"iteration": progress.iteration, "reason": stopped_by}) + "\n")
    # Steady state: the first iteration of a run pays for warm-up (allocations, lazy init).
    steady_iters, steady_seconds = (trained - 1, train_seconds - first_seconds) if trained > 1 else (trained, train_seconds)
    summary = {
        "completed": progress.iteration >= t.train_iters,
        "iterations": progress.iteration,
        "iterations_this_run": trained,
        "resumed_from_iteration": resumed_from,
        "stopped_by": stopped_by,
        "initialized_from": initialized_from,
        "consumed_samples": progress.consumed_samples,
        "tokens_trained": progress.consumed_samples * cfg.model.seq_length,
        "final_train_loss": last.get("loss"),
        "tokens_per_s": steady_iters * tokens_per_iteration / steady_seconds if steady_seconds > 0 else None,
        "ms_per_iteration": 1000 * steady_seconds / steady_iters if steady_iters else None,
        "train_seconds": train_seconds,
        **({f"{k}": v for k, v in metrics.throughput(steady_iters * tokens_per_iteration / steady_seconds, flops_token,
                                                      layout.world_size, peak).items()} if steady_seconds > 0 else {}),
        "checkpoint_save_seconds": save_seconds,
        "checkpoint_load_seconds": load_seconds,
        "parameters": parameters,
        "flops_per_token": flops_token,
        "padded_vocab_size": vocab_size,
        "device": device.type,
        "parallel": layout.as_dict(),
    }
    if not summary["completed"]:
        return summary

    after = {k: evaluate(model, forward_backward, ds, cfg, layout, eval_seq[k]) for k, ds in heldout.items()}
    # (.get: a checkpoint from a run that had fewer held-out components has no "before" for the new ones)
    summary["losses"] = {k: {"before": before.get(k), "after": after[k], "sequence_length": eval_seq[k]} for k in heldout}
    if rank0:
        reporter.log({"event": "heldout_after", **after})
        write_manifest(
            out_dir, stage="train", fingerprint=fingerprint, config=cfg.model_dump(mode="json"),
            inputs={"tokenize_manifest": tokenized_dir / "manifest.json"},
            counts={k: summary[k] for k in ("iterations", "consumed_samples", "tokens_trained", "parameters")},
            started=started, losses=summary["losses"],
            train={k: v for k, v in summary.items() if k not in ("losses", "parallel")},
            parallel=summary["parallel"], checkpoint=str(checkpoint.checkpoint_dir(ckpt_root, progress.iteration)),
        )
    return summary
