"""The ``train`` stage: continual pre-training of a megatron-core GPT model on the IPT blend.

:func:`train_stage` reads the way Megatron-LM's ``pretrain()`` does, as named steps: check the inputs ->
set up process groups, model, DDP, optimizer and scheduler (:func:`setup_model_and_optimizer`) -> build the
blend and the held-out sets (:func:`build_datasets`) -> resume, or initialise from ``train.init_from`` and
measure the held-out losses before training (:func:`load_or_start`) -> the loop (:func:`train_loop`, one
:func:`megatron_ipt.training.step.train_step` per iteration through megatron's ``get_forward_backward_func``
schedule, so pipeline parallel works) -> the final save, evaluation and manifest (:func:`finish`).

Everything megatron-specific is megatron-core's public API (``get_megatron_optimizer``,
``OptimizerParamScheduler``, ``DistributedDataParallel``, ``finalize_model_grads``), called through
:mod:`megatron_ipt.training.mcore` (keywords only, config objects built from their actual fields), so every
megatron-core version in ``mcore.SUPPORTED`` runs the same code.
On CPU the whole stage runs inside :func:`megatron_ipt.training.cpu_backend.cpu_backend`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from megatron_ipt.config import ExperimentConfig
from megatron_ipt.manifest import atomic_write_text, read_manifest, write_manifest
from megatron_ipt.training import (checkpoint, checkpoint_trust, cpu_backend, cpu_memory, data, mcore, metrics, parallel, plan, scale,
                                   signals)
from megatron_ipt.training.model import build_model_chunks
from megatron_ipt.training.presets import ModelPreset, padded_vocab_size, resolve_preset
from megatron_ipt.training.reporting import Reporter, memory_stats
from megatron_ipt.training.step import evaluate, parameter_count, train_step
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
    stepped once per iteration; on resume the checkpoint's schedule wins, so a run whose ``train_iters`` grew keeps
    the decay length it started with and stays at its end value afterwards)."""
    t = cfg.train
    bf16 = t.precision == "bf16"
    optimizer = mcore.optimizer(
        model=model, optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=1e-8, clip_grad=t.clip_grad,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer, **scale.optimizer_fields(cfg),
    )
    scheduler = mcore.param_scheduler(
        optimizer=optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, **lr_schedule(t),
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,  # a resumed run keeps its schedule when train_iters grew
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
    """megatron-core's ``DistributedDataParallel`` around each model chunk (its ``DistributedDataParallelConfig``
    from :func:`scale.ddp_fields`: grad reduction in fp32, overlap, buckets), wired into the (shared) model config
    the way Megatron-LM does (:func:`scale.wire_schedule`: ``no_sync_func``, the grad / param sync functions when
    overlapping, ``finalize_model_grads_func``) so the schedule reduces grads. Returns the list."""
    config = chunks[0].config
    wrapped, finalize_model_grads = [], None
    for chunk in chunks:
        ddp, finalize_model_grads = mcore.distributed_data_parallel(config=config, module=chunk, **scale.ddp_fields(cfg))
        wrapped.append(ddp)
    scale.wire_schedule(cfg, config, wrapped, finalize_model_grads)
    return wrapped


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
    records after the checkpoint's iteration are dropped (:func:`megatron_ipt.training.reporting.truncate_metrics`).
    ``exit_after_iterations`` stops early after that many total iterations, saving a checkpoint and
    writing no manifest (Megatron-LM's ``--exit-interval``; used to test resume).
    On rank 0 writes ``out_dir/metrics.jsonl`` and, when finished, ``out_dir/manifest.json``.
    Must be called on every rank. Raises ManifestError / FileNotFoundError / ``data.DataError`` (naming the
    config key) for bad inputs, before any process group is built, and ParallelLayoutError for a layout
    that does not divide.
    """
    return on_training_device(cfg, lambda cfg, device: _run(cfg, Path(tokenized_dir), Path(out_dir), fingerprint,
                                                            device, exit_after_iterations))


def on_training_device(cfg: ExperimentConfig, run: Callable[[ExperimentConfig, torch.device], dict]) -> dict:
    """``run(cfg, device)`` on ``train.device``, with ``train.precision`` resolved for that device
    (:func:`megatron_ipt.training.precision.resolve_precision`), inside the CPU backend when that is the CPU (and
    with freed memory kept in the process: :mod:`megatron_ipt.training.cpu_memory`); the process groups are torn
    down afterwards, whatever happens. The entry of every training stage (train, sft)."""
    from megatron_ipt.training.precision import with_resolved_precision

    device = parallel.resolve_device(cfg.train.device)
    cfg = with_resolved_precision(cfg, device.type)
    on_cpu = device.type == "cpu"
    with cpu_backend.cpu_backend(enabled=on_cpu), cpu_memory.reuse_freed_memory(enabled=on_cpu):
        try:
            return run(cfg, device)
        finally:
            parallel.teardown()


def _run(cfg: ExperimentConfig, tokenized_dir: Path, out_dir: Path, fingerprint: str,
         device: torch.device, exit_after: int | None) -> dict:
    started = time.time()
    mcore.warn_if_unsupported()
    inputs = check_inputs(cfg, tokenized_dir, out_dir)
    run = setup_model_and_optimizer(cfg, inputs, device)
    if run.rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
    sets = build_datasets(cfg, tokenized_dir, out_dir, inputs, run.layout)
    state = load_or_start(cfg, out_dir, run, sets)
    loop = train_loop(cfg, out_dir, run, sets, state, exit_after, device)
    return finish(cfg, tokenized_dir, out_dir, fingerprint, started, run, sets, state, loop, device)


def prepare_data(cfg: ExperimentConfig, tokenized_dir: Path, out_dir: Path) -> dict[str, int]:
    """``ipt train --prepare-data``: build the blend's and the held-out sets' index caches in ``out_dir/blend_cache``
    on this one process and return, as Megatron-LM's ``tools/prepare_cache.py`` does, so a multi-node job never
    builds them while other ranks wait: its ranks find them and only read. Same inputs and checks as the run (a
    world-size-1 gloo group, which megatron-core's builder needs); the layout is taken at
    ``parallel.nproc_per_node`` processes (it matters only for the size of a weighted ``blend.per_split`` valid/test
    blend). Returns the number of samples per set."""
    single = cfg.model_copy(deep=True)
    single.parallel.nproc_per_node = 1  # this process alone (check_inputs refuses several without torchrun)
    inputs = check_inputs(single, tokenized_dir, out_dir)
    preset, t = inputs.preset, cfg.train
    layout = parallel.check_layout(cfg.parallel, world_size=cfg.parallel.nproc_per_node,
                                   micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
                                   seq_length=cfg.model.seq_length, **parallel.model_fields(preset))
    out_dir.mkdir(parents=True, exist_ok=True)
    created = not torch.distributed.is_initialized()
    parallel.init_process_group(torch.device("cpu"))
    try:
        sets = build_datasets(cfg, tokenized_dir, out_dir, inputs, layout)
    finally:
        if created:
            torch.distributed.destroy_process_group()
    return {"train": len(sets.train), **{k: len(v) for k, v in sets.heldout.items()}}


# ------------------------------------------------------------------------------------------ the steps
@dataclass
class Inputs:
    """What the checks read: the dataset tokenizer, the checked ``blend.per_split`` prefixes, the model preset."""

    tokenizer: data.DatasetTokenizer
    per_split: dict[str, list[tuple[Path, float]]] | None
    preset: ModelPreset


def check_inputs(cfg: ExperimentConfig, tokenized_dir: Path, out_dir: Path | None, *, launcher: bool = False) -> Inputs:
    """Every input the run reads, checked before any process group or model is built.

    ``out_dir`` None checks a run that starts fresh (``train.init_from`` must then hold a checkpoint);
    ``launcher`` skips the torchrun check (the caller starts the workers). Raises ManifestError (no or a
    foreign tokenize manifest, an output that differs from its record), ``data.DataError`` naming the config key
    (a missing prefix, a ``.bin`` / ``.idx`` pair that does not agree, ``train.init_from`` that holds no
    checkpoint, a bad ``blend.extra`` / ``blend.per_split`` prefix), UntrustedCheckpointError (an ``init_from``
    checkpoint whose pickles name a class other than data; see ``train.trust_checkpoint``) and RuntimeError when
    ``parallel.nproc_per_node > 1`` without torchrun.
    """
    t = cfg.train
    tokenized = read_manifest(tokenized_dir, "tokenize")
    tokenizer = data.DatasetTokenizer.from_manifest(tokenized)
    data.check_prefixes(tokenized_dir, data.TRAIN_PREFIXES + data.HELDOUT_PREFIXES)
    data.check_general(tokenized_dir, cfg.blend.general_weight)
    data.check_tokenized(tokenized_dir, tokenized)
    if t.init_from and (out_dir is None or checkpoint.latest_iteration(out_dir / "checkpoints") is None):
        try:
            folder = checkpoint.resolve_checkpoint_dir(t.init_from)
        except FileNotFoundError as err:
            raise data.DataError(f"train.init_from = {t.init_from!r}: {err}") from None
        checkpoint_trust.check(folder, trust=t.trust_checkpoint)
    for i, component in enumerate(cfg.blend.extra):
        data.check_extra_prefix(component.prefix, f"blend.extra[{i}].prefix")
        if component.valid_prefix:
            data.check_extra_prefix(component.valid_prefix, f"blend.extra[{i}].valid_prefix")
    per_split = None
    if cfg.blend.per_split is not None:
        per_split = data.check_per_split({split: [(c.prefix, c.weight) for c in getattr(cfg.blend.per_split, split)]
                                          for split in data.SPLITS}, tokenized_dir)
    if cfg.parallel.nproc_per_node > 1 and not launcher and not parallel.launched_by_torchrun():
        raise RuntimeError(
            f"parallel.nproc_per_node = {cfg.parallel.nproc_per_node} but this process was not started by torchrun; "
            "start it through megatron_ipt.launch.torchrun.relaunch_under_torchrun (the ipt CLI does)"
        )
    return Inputs(tokenizer=tokenizer, per_split=per_split, preset=resolve_preset(cfg.model))


def preflight(cfg: ExperimentConfig, tokenized_dir: Path, world_size: int) -> None:
    """Check a run that starts fresh before anything of an earlier run is moved aside: :func:`check_inputs` (as
    the launcher) and the parallel layout for ``world_size`` processes (:func:`parallel.check_layout`). Raises
    what they raise (ManifestError, ``data.DataError``, ParallelLayoutError), one line naming the key."""
    inputs = check_inputs(cfg, Path(tokenized_dir), None, launcher=True)
    t, preset = cfg.train, inputs.preset
    parallel.check_layout(cfg.parallel, world_size=world_size, micro_batch_size=t.micro_batch_size,
                          global_batch_size=t.global_batch_size, seq_length=cfg.model.seq_length,
                          **parallel.model_fields(preset))


@dataclass
class Run:
    """The process groups' layout and what trains: model chunks, optimizer, scheduler, schedule function, and the
    numbers the throughput needs (parameters, model FLOPs per token, the device's peak TFLOP/s or None)."""

    layout: parallel.Layout
    model: list[torch.nn.Module]
    optimizer: Any
    scheduler: Any
    forward_backward: Callable
    vocab_size: int
    parameters: int
    flops_per_token: float
    peak_tflops: float | None
    memory_plan: dict | None = None  # ipt plan's per-GPU estimate (megatron_ipt.training.plan)

    @property
    def rank0(self) -> bool:
        return torch.distributed.get_rank() == 0


def setup_model_and_optimizer(cfg: ExperimentConfig, inputs: Inputs, device: torch.device) -> Run:
    """Process groups and layout (every divisibility rule checked before anything is built; raises
    ParallelLayoutError), then the model chunks (one per virtual pipeline stage), DDP, optimizer and scheduler
    (Megatron-LM's ``setup_model_and_optimizer``)."""
    from megatron_ipt.training.model import transformer_engine_available
    from megatron_ipt.training.precision import precision_fields, resolve_transformer_impl

    t, preset = cfg.train, inputs.preset
    te = transformer_engine_available()
    impl = resolve_transformer_impl(cfg.model.transformer_impl, device.type, te)
    # Recompute / overlap / CUDA graph rules, checked before any process group is built (one line per key).
    scale.check(cfg, num_layers=preset.num_layers, device_type=device.type, te_available=te)
    layout = parallel.setup(
        cfg.parallel, device, micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
        seed=t.seed, seq_length=cfg.model.seq_length, **parallel.model_fields(preset),
    )
    # A model taken from Hugging Face keeps its own (possibly larger) embedding table, padded the same way.
    model_vocab = max(inputs.tokenizer.vocab_size, preset.vocab_size) if cfg.model.hf_config else inputs.tokenizer.vocab_size
    vocab_size = padded_vocab_size(model_vocab, layout.tensor_model_parallel_size)
    fields = precision_fields(t, impl, device.type, te, preset.num_layers, layout.pipeline_model_parallel_size)
    mcore.reset_moe_aux_losses()  # router losses tracked for an earlier model of this process
    if cfg.parallel.tp_comm_overlap:
        scale.initialize_tp_communicators(cfg, hidden_size=preset.hidden_size, fp8=t.fp8 is not None)
    # The recompute / TP-overlap / CUDA graph fields ride along with the precision fields into TransformerConfig.
    fields.update(scale.transformer_fields(cfg, num_layers=preset.num_layers))
    model = build_model_chunks(preset, layout, vocab_size=vocab_size, seq_length=cfg.model.seq_length,
                               device=device, precision=t.precision, transformer_impl=impl, precision_fields=fields,
                               attention_backend=cfg.model.attention_backend)
    model = wrap_ddp(cfg, model)
    optimizer, scheduler = build_optimizer(cfg, model)
    # Throughput in model FLOPs (megatron_ipt.training.metrics documents the formula); MFU where the peak is known.
    peak = metrics.peak_tflops(torch.cuda.get_device_name() if device.type == "cuda" else None,
                               "fp8" if t.fp8 else "bf16") if t.precision == "bf16" else None
    memory_plan = plan.for_run(cfg, preset, world_size=layout.world_size, vocab_size=vocab_size,
                               fused_attention=impl == "transformer_engine")
    if device.type == "cuda":
        _say("train: memory plan per GPU (ipt plan): " + ", ".join(f"{k} {v}" for k, v in memory_plan.items()))
    return Run(layout=layout, model=model, optimizer=optimizer, scheduler=scheduler,
               forward_backward=mcore.forward_backward_func(), vocab_size=vocab_size,
               parameters=parameter_count(model),
               flops_per_token=metrics.flops_per_token(preset, cfg.model.seq_length, vocab_size), peak_tflops=peak,
               memory_plan=memory_plan)


@dataclass
class Datasets:
    """The training blend and the held-out sets keyed by their metric names, with each set's sequence length;
    ``every_eval``: the keys evaluated every ``train.eval_interval`` (all but the test blend's)."""

    train: Any
    heldout: dict[str, Any] = field(default_factory=dict)
    eval_seq: dict[str, int] = field(default_factory=dict)

    @property
    def every_eval(self) -> list[str]:
        return [k for k in self.heldout if k.partition(".")[0] != "test"]  # the test blend: before and after only


def build_datasets(cfg: ExperimentConfig, tokenized_dir: Path, out_dir: Path, inputs: Inputs,
                   layout: parallel.Layout) -> Datasets:
    """The weighted blend for training and whole held-out prefixes for evaluation.

    Held-out components, keyed by their metric names: the tokenize stage's ``heldout_raw`` / ``heldout_pairs``,
    then each ``blend.extra`` valid_prefix, then ``blend.per_split``'s valid and test blends, each blend of
    several datasets followed by its datasets one by one (``valid.STEM``; :func:`data.split_component_keys`).
    """
    t, per_split = cfg.train, inputs.per_split
    common = dict(tokenizer=inputs.tokenizer, seq_length=cfg.model.seq_length, seed=t.seed,
                  cache_dir=out_dir / "blend_cache", masking=data.document_masking(cfg.blend))
    num_samples = t.train_iters * t.global_batch_size
    valid_set = test_set = None
    if per_split is not None:
        # A weighted valid/test blend has a size: what one evaluation reads (eval_iters micro-batches per DP rank).
        eval_samples = (t.eval_iters or PER_SPLIT_EVAL_MICRO_BATCHES) * layout.micro_batch_size * layout.data_parallel_size
        train_set, valid_set, test_set = data.build_per_split_datasets(
            per_split, num_samples=num_samples, eval_samples=eval_samples, **common)
    elif cfg.blend.mock:
        train_set = data.build_mock_train_dataset(num_samples=num_samples, **common)
    else:
        train_set = data.build_train_dataset(
            tokenized_dir, raw_weight=cfg.blend.raw_weight, instruct_weight=cfg.blend.instruct_weight,
            general_weight=cfg.blend.general_weight,
            extra=[(c.prefix, c.weight) for c in cfg.blend.extra], num_samples=num_samples, **common,
        )
    sets = Datasets(train=train_set)

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
        sets.heldout[key] = data.build_heldout_dataset(prefix.parent, prefix.name, **{**common, "seq_length": seq})
        sets.eval_seq[key] = seq

    for name in data.HELDOUT_PREFIXES:
        add_heldout(name, tokenized_dir / name)
    for c in cfg.blend.extra:
        if c.valid_prefix:
            add_heldout(f"heldout_{c.name}", Path(c.valid_prefix))
    for split, dataset in (("valid", valid_set), ("test", test_set)):
        if dataset is not None and len(dataset) == 0:
            _say(f"train: blend.per_split.{split} has no whole sequence of {cfg.model.seq_length} tokens: not evaluated")
        elif dataset is not None:
            sets.heldout[split], sets.eval_seq[split] = dataset, cfg.model.seq_length
        components = [prefix for prefix, _weight in (per_split or {}).get(split, [])]
        if len(components) > 1:  # a single dataset is the split's set itself: no second copy
            for key, prefix in zip(data.split_component_keys(split, components), components):
                add_heldout(key, prefix)
    return sets


def _evaluate_all(cfg: ExperimentConfig, run: Run, sets: Datasets, keys) -> dict[str, float]:
    """Mean held-out loss (nats per token) of each set in ``keys`` (parameters gathered first when their gather is
    overlapped with the forward: :func:`scale.params_synced`)."""
    with scale.params_synced(run.model):
        return {k: evaluate(run.model, run.forward_backward, sets.heldout[k], cfg, run.layout, sets.eval_seq[k])
                for k in keys}


@dataclass
class StartState:
    """Where training starts: the progress (iteration, consumed samples; resumed from a checkpoint or zero), the
    held-out losses before training, the checkpoint's load time and the ``train.init_from`` folder used."""

    progress: checkpoint.Progress
    before: dict[str, float]
    load_seconds: float | None
    initialized_from: str | None


def load_or_start(cfg: ExperimentConfig, out_dir: Path, run: Run, sets: Datasets) -> StartState:
    """Resume from ``out_dir/checkpoints`` (model, optimizer, scheduler, progress; the held-out losses before
    training come from the checkpoint), or start: initialise the weights from ``train.init_from`` (continual
    pre-training: weights only; optimizer, schedule and data start fresh) and measure the held-out losses."""
    t, ckpt_root = cfg.train, out_dir / "checkpoints"
    load_seconds = initialized_from = None
    if run.rank0:
        (out_dir / STOPPED).unlink(missing_ok=True)
    if checkpoint.latest_iteration(ckpt_root) is None and t.init_from:
        initialized_from = str(checkpoint.load_init_weights(t.init_from, run.model, trust=t.trust_checkpoint))
        reload = getattr(run.optimizer, "reload_model_params", None)
        if reload is not None:  # main (fp32) copies of bf16 params were taken when the optimizer was built
            reload()
        _say(f"train: initialised model weights from {initialized_from}")
    if checkpoint.latest_iteration(ckpt_root) is not None:
        tick = time.perf_counter()
        progress = checkpoint.load_checkpoint(ckpt_root, run.model, run.optimizer, run.scheduler,
                                              trust=t.trust_checkpoint)
        load_seconds = time.perf_counter() - tick
        if t.lr_decay_style == "wsd":  # the checkpoint's decay length won (train_iters grew): anneal over its share
            steps = lr_schedule(t.model_copy(update={"train_iters": run.scheduler.lr_decay_steps}))["wsd_decay_steps"]
            run.scheduler.wsd_decay_steps = steps
            run.scheduler.step(increment=0)  # the learning rate of the next iteration, from the corrected schedule
        before = progress.extra["heldout_before"]
    else:
        before = _evaluate_all(cfg, run, sets, sets.heldout)
        progress = checkpoint.Progress(iteration=0, consumed_samples=0)
    progress.extra = {"heldout_before": before}
    return StartState(progress=progress, before=before, load_seconds=load_seconds, initialized_from=initialized_from)


@dataclass
class LoopResult:
    """What the loop did: iterations trained in this process, their seconds (all, and the first one's), the last
    step's numbers, why it stopped early (a signal or the time budget; None otherwise), the final save's seconds."""

    trained: int = 0
    train_seconds: float = 0.0
    first_seconds: float = 0.0
    last: dict = field(default_factory=dict)
    stopped_by: str | None = None
    save_seconds: float | None = None
    reporter: Reporter | None = None  # closed (no progress bar) but still writes metrics.jsonl and log lines


def train_loop(cfg: ExperimentConfig, out_dir: Path, run: Run, sets: Datasets, state: StartState,
               exit_after: int | None, device: torch.device) -> LoopResult:
    """Iterations until ``train.train_iters`` (or ``exit_after``, or a stop request): one ``train_step`` each,
    periodic log lines, saves and evaluations; then the last save (asynchronous saves are finished here)."""
    t, layout, progress = cfg.train, run.layout, state.progress
    ps = mcore.parallel_state()
    batches = [data.micro_batches(  # one iterator per model chunk, each over the same samples
        sets.train, micro_batch_size=layout.micro_batch_size, data_parallel_rank=ps.get_data_parallel_rank(),
        data_parallel_size=layout.data_parallel_size, start_sample=progress.consumed_samples,
    ) for _chunk in run.model]
    stop = min(t.train_iters, exit_after) if exit_after is not None else t.train_iters
    tokens_per_iteration = t.global_batch_size * cfg.model.seq_length
    reporter = Reporter(out_dir, t.train_iters, progress.iteration, enabled=run.rank0)
    # TensorBoard, W&B, MLflow: each when configured, rank 0 only, the same scalars
    trackers = metrics.Trackers(out_dir, t, name=cfg.name, config=cfg.model_dump(mode="json"), enabled=run.rank0)
    resumed_from, result, window = progress.iteration, LoopResult(reporter=reporter), []
    stopper = signals.StopRequest(t.exit_duration_minutes, device=device)
    # train.async_save: megatron-core's async checkpoint writer; finished before the next save and before returning.
    async_queue = mcore.async_calls_queue() if t.async_save else None

    def save() -> float:
        with scale.params_synced(run.model):  # an overlapped parameter gather has not reached the model yet
            return checkpoint.save_checkpoint(out_dir / "checkpoints", run.model, run.optimizer, run.scheduler,
                                              progress, keep_last=t.keep_last, async_queue=async_queue)

    try:
        stopper.__enter__()
        if resumed_from == 0:
            reporter.log({"event": "heldout_before", **state.before})
        while progress.iteration < stop:
            tick = time.perf_counter()
            last = result.last = train_step(run.model, run.optimizer, run.scheduler, run.forward_backward, batches,
                                            cfg, layout)
            seconds = time.perf_counter() - tick
            result.train_seconds += seconds
            result.first_seconds = result.first_seconds or seconds
            window.append(seconds)
            progress.iteration += 1
            progress.consumed_samples += t.global_batch_size
            if not math.isfinite(last["loss"]):
                raise FloatingPointError(f"iteration {progress.iteration}: loss is {last['loss']}")
            if async_queue is not None:  # finalize a background save every rank finished (Megatron-LM does it each step)
                async_queue.maybe_finalize_async_calls(blocking=False)
            # a stop request (collective, every iteration) ends the loop after this iteration's record is logged
            # (a resumed run starts after it: without the record, the stopped iteration's loss would be missing)
            stopping = stopper.should_stop() and progress.iteration < stop
            if stopping:
                result.stopped_by = stopper.reason
                _say(f"train: {result.stopped_by} received: saving at iteration {progress.iteration} and stopping")
            elif t.save_interval and progress.iteration % t.save_interval == 0 and progress.iteration < stop:
                save()
            if (not stopping and t.eval_interval and progress.iteration % t.eval_interval == 0
                    and progress.iteration < t.train_iters):
                evals = _evaluate_all(cfg, run, sets, sets.every_eval)
                reporter.log({"event": "eval", "at_iteration": progress.iteration, **evals})
                trackers.log({f"eval_{k}": v for k, v in evals.items()}, progress.iteration)
            if progress.iteration % t.log_interval == 0 or progress.iteration == stop or stopping:
                step_s = sum(window) / len(window)
                record = {
                    "iteration": progress.iteration, "loss": last["loss"], "lr": last["lr"],
                    "grad_norm": last["grad_norm"], "skipped": last["skipped"],
                    **{k: v for k, v in last.items() if k.startswith("moe_")},  # MoE router losses
                    "consumed_samples": progress.consumed_samples, "ms_per_iteration": 1000 * step_s,
                    "tokens_per_s": tokens_per_iteration / step_s,
                    **metrics.throughput(tokens_per_iteration / step_s, run.flops_per_token, layout.world_size,
                                         run.peak_tflops),
                    **memory_stats(device),
                }
                reporter.log(record)
                trackers.log(record, progress.iteration)
                window = []
            else:
                reporter.advance(progress.iteration)
            if stopping:
                break
        # The last save runs with the signal handlers still installed: a second SIGTERM / SIGUSR1 (a repeated
        # scancel, Slurm's signal to every step) only sets the flag again instead of killing a half-written save.
        result.trained = progress.iteration - resumed_from
        if (t.save_checkpoint or stop < t.train_iters or result.stopped_by) and result.trained > 0:
            result.save_seconds = save()
        if async_queue is not None:
            tick = time.perf_counter()
            queue, async_queue = async_queue, None
            queue.close()  # waits for the save in flight and finalizes it ('latest' moves)
            if result.save_seconds is not None:
                result.save_seconds += time.perf_counter() - tick
    except BaseException:
        if async_queue is not None:
            async_queue.close(abort=True)  # an error: 'latest' stays at the last finished checkpoint
        raise
    finally:
        stopper.__exit__()
        reporter.close()
        trackers.close()
    return result


def process_environment() -> dict[str, str]:
    """The launch-relevant variables this process ran with (recorded in the manifest): thread count, CUDA
    connection count (tensor-parallel overlap), and every ``NCCL_*`` / ``TORCH_NCCL_*`` / ``NVTE_*`` setting."""
    return {k: v for k, v in sorted(os.environ.items())
            if k in ("OMP_NUM_THREADS", "CUDA_DEVICE_MAX_CONNECTIONS") or k.startswith(("NCCL_", "TORCH_NCCL_", "NVTE_"))}


def finish(cfg: ExperimentConfig, tokenized_dir: Path, out_dir: Path, fingerprint: str, started: float, run: Run,
           sets: Datasets, state: StartState, loop: LoopResult, device: torch.device, *, stage: str = "train",
           manifest_inputs: dict | None = None) -> dict:
    """The run's summary; when training completed, the held-out losses after it and (rank 0) the stage manifest
    (``stage``; its inputs: ``manifest_inputs``, default the tokenize manifest in ``tokenized_dir``).
    A run stopped early on request writes ``STOPPED`` (iteration, reason) instead of a manifest."""
    t, progress, layout = cfg.train, state.progress, run.layout
    if loop.stopped_by and run.rank0:
        atomic_write_text(out_dir / STOPPED,
                          json.dumps({"iteration": progress.iteration, "reason": loop.stopped_by}) + "\n")
    tokens_per_iteration = t.global_batch_size * cfg.model.seq_length
    # Steady state: the first iteration of a run pays for warm-up (allocations, lazy init).
    steady_iters, steady_seconds = ((loop.trained - 1, loop.train_seconds - loop.first_seconds) if loop.trained > 1
                                    else (loop.trained, loop.train_seconds))
    steady_tokens_per_s = steady_iters * tokens_per_iteration / steady_seconds if steady_seconds > 0 else None
    summary = {
        "completed": progress.iteration >= t.train_iters,
        "iterations": progress.iteration,
        "iterations_this_run": loop.trained,
        "resumed_from_iteration": progress.iteration - loop.trained,
        "stopped_by": loop.stopped_by,
        "initialized_from": state.initialized_from,
        "consumed_samples": progress.consumed_samples,
        "tokens_trained": progress.consumed_samples * cfg.model.seq_length,
        "final_train_loss": loop.last.get("loss"),
        "tokens_per_s": steady_tokens_per_s,
        "ms_per_iteration": 1000 * steady_seconds / steady_iters if steady_iters else None,
        "train_seconds": loop.train_seconds,
        **(metrics.throughput(steady_tokens_per_s, run.flops_per_token, layout.world_size, run.peak_tflops)
           if steady_seconds > 0 else {}),
        "checkpoint_save_seconds": loop.save_seconds,
        "checkpoint_load_seconds": state.load_seconds,
        "parameters": run.parameters,
        "flops_per_token": run.flops_per_token,
        "padded_vocab_size": run.vocab_size,
        "device": device.type,
        "parallel": layout.as_dict(),
        "environment": process_environment(),
    }
    if not summary["completed"]:
        return summary

    after = _evaluate_all(cfg, run, sets, sets.heldout)
    # (.get: a checkpoint from a run that had fewer held-out components has no "before" for the new ones)
    summary["losses"] = {k: {"before": state.before.get(k), "after": after[k], "sequence_length": sets.eval_seq[k]}
                         for k in sets.heldout}
    if run.rank0:
        loop.reporter.log({"event": "heldout_after", **after})
        write_manifest(
            out_dir, stage=stage, fingerprint=fingerprint, config=cfg.model_dump(mode="json"),
            inputs=manifest_inputs or {"tokenize_manifest": tokenized_dir / "manifest.json"},
            counts={k: summary[k] for k in ("iterations", "consumed_samples", "tokens_trained", "parameters")},
            started=started, losses=summary["losses"],
            train={k: v for k, v in summary.items() if k not in ("losses", "parallel")},
            parallel=summary["parallel"], memory_plan=run.memory_plan,
            checkpoint=str(checkpoint.checkpoint_dir(out_dir / "checkpoints", progress.iteration)),
        )
    return summary
