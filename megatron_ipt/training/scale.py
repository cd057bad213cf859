"""Settings that large runs need: activation recompute, communication overlap and CUDA graphs.

Each is a typed config key mapped here onto megatron-core's own configs, the way Megatron-LM's ``arguments.py``
and ``training.py`` map their flags:

- ``train.recompute`` (``none | selective | full``), ``recompute_method``, ``recompute_num_layers``,
  ``recompute_modules`` -> ``TransformerConfig.recompute_granularity / recompute_method / recompute_num_layers /
  recompute_modules`` (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models");
- ``parallel.overlap_grad_reduce``, ``overlap_param_gather``, ``align_param_gather``, ``bucket_size``,
  ``average_in_collective``, ``grad_reduce_in_fp32`` -> ``DistributedDataParallelConfig`` (and
  ``OptimizerConfig.overlap_param_gather``), wired into the schedule by :func:`wire_schedule` as Megatron-LM's
  ``setup_model_and_optimizer`` / ``train`` do (``no_sync_func``, ``grad_sync_func``, ``param_sync_func``);
  with the parameter gather overlapped the model's forward pre-hooks wait for the gather, so every use of the
  weights outside a training step (evaluation, checkpoint save) runs inside :func:`params_synced`;
- ``parallel.tp_comm_overlap`` -> ``TransformerConfig.tp_comm_overlap`` (Transformer Engine userbuffers,
  initialised by :func:`initialize_tp_communicators`);
- ``train.cuda_graph`` -> ``TransformerConfig.cuda_graph_impl``.

:func:`check` runs every rule before any process group is built and raises :class:`ScaleError` with one line per
broken rule, each naming its key. A setting the installed megatron-core has no field for is refused the same way.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from megatron_ipt.config import ConfigError, ExperimentConfig
from megatron_ipt.training import mcore

DEFAULT_RECOMPUTE_MODULES = ("core_attn",)  # megatron-core's default for selective recompute


class ScaleError(ConfigError):
    """A recompute / overlap / CUDA graph setting that cannot run here; the message names the key."""


def layers_per_chunk(num_layers: int, pipeline: int, virtual: int | None) -> int:
    """Transformer layers in one model chunk (one pipeline stage, or one virtual stage of it)."""
    return num_layers // (pipeline * (virtual or 1))


def recompute_num_layers(cfg: ExperimentConfig, num_layers: int) -> int | None:
    """``recompute_num_layers`` for full recompute: the configured one, else 1 (uniform) or every layer of a stage
    (block); None for selective or no recompute."""
    t, p = cfg.train, cfg.parallel
    if t.recompute != "full":
        return None
    if t.recompute_num_layers is not None:
        return t.recompute_num_layers
    return 1 if t.recompute_method == "uniform" else layers_per_chunk(
        num_layers, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size)


def problems(cfg: ExperimentConfig, *, num_layers: int, device_type: str, te_available: bool) -> list[str]:
    """Every broken rule of the recompute / overlap / CUDA graph settings, one line each, naming the key."""
    t, p = cfg.train, cfg.parallel
    out: list[str] = []
    tc_fields = mcore.transformer_config_fields()
    ddp_fields = mcore.ddp_config_fields()
    # Activation recompute
    per_chunk = layers_per_chunk(num_layers, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size)
    if t.recompute != "none" and "recompute_granularity" not in tc_fields:
        out.append(f"train.recompute = {t.recompute}: megatron-core {mcore.version()} has no recompute_granularity")
    if t.recompute == "selective" and t.recompute_modules is not None and "recompute_modules" not in tc_fields:
        out.append(f"train.recompute_modules: megatron-core {mcore.version()} has no recompute_modules (it recomputes "
                   "core attention only); leave the key out")
    if t.recompute == "selective" and "layernorm" in (t.recompute_modules or ()) and not te_available:
        out.append("train.recompute_modules: layernorm needs Transformer Engine (megatron-core's CheckpointWithoutOutput "
                   "reads TE's FP8 state even without FP8); recompute core_attn / mlp here")
    if t.recompute == "full" and per_chunk >= 1:
        n = recompute_num_layers(cfg, num_layers)
        stage = "pipeline stage" if p.virtual_pipeline_model_parallel_size is None else "model chunk"
        if t.recompute_method == "uniform" and per_chunk % n:
            out.append(f"train.recompute_num_layers = {n} does not divide the {per_chunk} layers of a {stage} "
                       "(recompute_method uniform)")
        elif t.recompute_method == "block" and n > per_chunk:
            out.append(f"train.recompute_num_layers = {n} is more than the {per_chunk} layers of a {stage} "
                       "(recompute_method block)")
    # Communication overlap (Megatron-LM's validate_args rules)
    if p.overlap_param_gather and not p.use_distributed_optimizer:
        out.append("parallel.overlap_param_gather needs parallel.use_distributed_optimizer: true")
    if p.overlap_param_gather and not p.overlap_grad_reduce:
        out.append("parallel.overlap_param_gather needs parallel.overlap_grad_reduce: true")
    if p.align_param_gather and not p.overlap_param_gather:
        out.append("parallel.align_param_gather needs parallel.overlap_param_gather: true")
    if p.overlap_param_gather_with_optimizer_step:
        out.append("parallel.overlap_param_gather_with_optimizer_step: megatron-core does not support it with "
                   "distributed checkpoints, which this trainer writes (Megatron-LM refuses the same); use "
                   "overlap_param_gather")
    if p.bucket_size is not None and not p.overlap_grad_reduce:
        out.append("parallel.bucket_size applies to overlapped reduction: set parallel.overlap_grad_reduce: true")
    for key in ("overlap_grad_reduce", "overlap_param_gather", "align_param_gather", "average_in_collective"):
        if getattr(p, key) and key not in ddp_fields:
            out.append(f"parallel.{key}: megatron-core {mcore.version()}'s DistributedDataParallelConfig has no {key}")
    # Document masking: only megatron-core's own attention (local spec) applies a per-sample mask
    if cfg.blend.reset_attention_mask and te_available and device_type == "cuda" and \
            cfg.model.transformer_impl != "local":
        out.append("blend.reset_attention_mask needs model.transformer_impl: local (Transformer Engine's attention "
                   "follows its causal mask type and ignores a per-sample mask)")
    # GPU-only settings
    if p.tp_comm_overlap:
        if device_type != "cuda" or not te_available:
            out.append("parallel.tp_comm_overlap needs CUDA GPUs with Transformer Engine (userbuffers); set it to false")
        elif p.tensor_model_parallel_size < 2 or not p.sequence_parallel:
            out.append("parallel.tp_comm_overlap needs tensor_model_parallel_size >= 2 and sequence_parallel: true")
        elif "tp_comm_overlap" not in tc_fields:
            out.append(f"parallel.tp_comm_overlap: megatron-core {mcore.version()} has no tp_comm_overlap")
    if t.cuda_graph != "none":
        if device_type != "cuda":
            out.append(f"train.cuda_graph = {t.cuda_graph} needs CUDA GPUs (device is {device_type}); set it to none")
        elif t.cuda_graph == "transformer_engine" and not te_available:
            out.append("train.cuda_graph = transformer_engine needs Transformer Engine, which does not import here")
        elif "cuda_graph_impl" not in tc_fields and t.cuda_graph != "local":
            out.append(f"train.cuda_graph = {t.cuda_graph}: megatron-core {mcore.version()} has no cuda_graph_impl")
    return out


def check(cfg: ExperimentConfig, *, num_layers: int, device_type: str, te_available: bool) -> None:
    """Raise :class:`ScaleError` listing every broken rule (:func:`problems`); call before any process group."""
    found = problems(cfg, num_layers=num_layers, device_type=device_type, te_available=te_available)
    if found:
        raise ScaleError("\n".join(found))


def transformer_fields(cfg: ExperimentConfig, *, num_layers: int) -> dict[str, Any]:
    """``TransformerConfig`` keywords for recompute, TP communication overlap and CUDA graphs (after :func:`check`)."""
    t, p = cfg.train, cfg.parallel
    out: dict[str, Any] = {}
    if t.recompute == "full":
        out.update(recompute_granularity="full", recompute_method=t.recompute_method,
                   recompute_num_layers=recompute_num_layers(cfg, num_layers))
    elif t.recompute == "selective":
        out.update(recompute_granularity="selective",
                   recompute_modules=list(t.recompute_modules or DEFAULT_RECOMPUTE_MODULES))
    if p.tp_comm_overlap:
        out["tp_comm_overlap"] = True
    if t.cuda_graph != "none":
        if "cuda_graph_impl" in mcore.transformer_config_fields():
            out["cuda_graph_impl"] = t.cuda_graph
        else:  # older megatron-core: the local implementation behind enable_cuda_graph
            out["enable_cuda_graph"] = True
    return out


def grad_reduce_in_fp32(cfg: ExperimentConfig) -> bool:
    """``parallel.grad_reduce_in_fp32``, by default true with bf16 (what the trainer always did)."""
    g = cfg.parallel.grad_reduce_in_fp32
    return cfg.train.precision == "bf16" if g is None else g


def ddp_fields(cfg: ExperimentConfig) -> dict[str, Any]:
    """``DistributedDataParallelConfig`` keywords."""
    p = cfg.parallel
    out: dict[str, Any] = dict(
        grad_reduce_in_fp32=grad_reduce_in_fp32(cfg), overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather, align_param_gather=p.align_param_gather,
        average_in_collective=p.average_in_collective, use_distributed_optimizer=p.use_distributed_optimizer,
    )
    if p.bucket_size is not None:
        out["bucket_size"] = p.bucket_size
    return out


def optimizer_fields(cfg: ExperimentConfig) -> dict[str, Any]:
    """``OptimizerConfig`` keywords: ``overlap_param_gather`` mirrors the DDP setting (megatron-core reads both)."""
    return {"overlap_param_gather": cfg.parallel.overlap_param_gather}


def wire_schedule(cfg: ExperimentConfig, config, chunks: list, finalize_model_grads) -> None:
    """Hook the DDP chunks into the (shared) model config that the pipeline schedule reads, as Megatron-LM's
    ``train`` does: ``no_sync_func`` (grads of all but the last micro-batch are not reduced), with
    ``overlap_grad_reduce`` and ``align_grad_reduce`` also ``grad_sync_func`` (each chunk's reduction launched after
    its last backward), with ``overlap_param_gather`` and ``align_param_gather`` also ``param_sync_func``, and
    ``finalize_model_grads_func``. ``config``: the chunks' shared ``TransformerConfig``; ``chunks``: the DDP
    modules. One function per chunk; a single function without virtual stages."""
    p = cfg.parallel

    def per_chunk(name: str):
        fns = [getattr(chunk, name) for chunk in chunks]
        return fns[0] if len(fns) == 1 else fns

    config.no_sync_func = per_chunk("no_sync")
    if p.overlap_grad_reduce and p.align_grad_reduce:
        config.grad_sync_func = per_chunk("start_grad_sync")
    if p.overlap_param_gather and p.align_param_gather:
        config.param_sync_func = per_chunk("start_param_sync")
    config.finalize_model_grads_func = finalize_model_grads


def overlaps_param_gather(chunks: list) -> bool:
    """True when the chunks gather parameters in forward pre-hooks (distributed optimizer + overlap_param_gather)."""
    return any(getattr(chunk, "use_forward_hook", False) for chunk in chunks)


@contextlib.contextmanager
def params_synced(chunks: list) -> Iterator[None]:
    """The model's parameters gathered and the forward pre-hooks off for the block (Megatron-LM's
    ``disable_forward_pre_hook`` / ``enable_forward_pre_hook`` around evaluation and checkpoint saves): after an
    optimizer step with ``overlap_param_gather`` the updated parameters reach the model only in the next forward,
    so a save or an evaluation must gather them first. A no-op without the overlap."""
    if not overlaps_param_gather(chunks):
        yield
        return
    for chunk in chunks:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in chunks:
            chunk.enable_forward_pre_hook()


def initialize_tp_communicators(cfg: ExperimentConfig, *, hidden_size: int, fp8: bool) -> None:
    """Transformer Engine's userbuffers for ``parallel.tp_comm_overlap`` (Megatron-LM's
    ``_initialize_tp_communicators``): one buffer of ``[seq_length * micro_batch_size / CP, hidden]``, before the
    model is built. Only called on CUDA with Transformer Engine (:func:`check`)."""
    from transformer_engine.pytorch import module as te_module

    p = cfg.parallel
    shape = [cfg.model.seq_length * cfg.train.micro_batch_size // p.context_parallel_size, hidden_size]
    mcore.call_with_accepted(te_module.base.initialize_ub, shape=shape, tp_size=p.tensor_model_parallel_size,
                             use_fp8=fp8, bootstrap_backend="nccl")
