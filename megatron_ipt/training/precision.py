"""Numerical precision and the transformer implementation: config -> megatron-core ``TransformerConfig`` fields.

- ``train.precision``: ``fp32`` or ``bf16`` (parameters in bf16 inside megatron's ``Float16Module``, fp32 main
  weights in the optimizer, gradients reduced in fp32), on CPU and GPU; ``auto`` is resolved per device by
  :func:`resolve_precision` before anything reads it.
- ``train.fp8``: ``hybrid`` (e4m3 forward, e5m2 gradients) or ``e4m3``, through Transformer Engine on top of
  bf16, with ``train.fp8_recipe`` ``delayed`` (amax history, Megatron-LM's default for Hopper; history length
  ``fp8_amax_history_len`` and ``fp8_amax_compute_algo``), ``tensorwise`` (current scaling), ``blockwise`` or
  ``mxfp8`` (Blackwell) as megatron-core offers them (``TransformerConfig.fp8_recipe``), and optionally the first
  and last ``fp8_bf16_layers`` layers kept in bf16 (``first_last_layers_bf16``; not with ``delayed``, which
  megatron-core refuses). megatron-core's ``TransformerBlock`` enters TE's FP8 autocast itself from these fields.
- ``model.transformer_impl``: ``transformer_engine`` (TE layer spec), ``local`` (megatron-core's own modules,
  what runs on CPU) or ``auto`` (TE when the device is cuda and ``transformer_engine`` imports).

Everything is checked before a model is built: FP8 on CPU, FP8 without Transformer Engine, FP8 without bf16,
FP8 with the local implementation, and the TE implementation without TE are one-line errors naming the key.
"""

from __future__ import annotations

from typing import Any

from megatron_ipt.errors import IptError


class PrecisionError(IptError, ValueError):
    """An impossible precision / implementation combination; the message names the config key."""


def resolve_transformer_impl(impl: str, device_type: str, te_available: bool) -> str:
    """``transformer_engine`` or ``local`` for ``model.transformer_impl`` on this device."""
    if impl == "auto":
        return "transformer_engine" if device_type == "cuda" and te_available else "local"
    if impl == "transformer_engine":
        if device_type != "cuda":
            raise PrecisionError("model.transformer_impl = transformer_engine needs a cuda device; use local or auto on CPU")
        if not te_available:
            raise PrecisionError("model.transformer_impl = transformer_engine but transformer_engine does not import: "
                                 "install the gpu extra (pip install -e '.[train,gpu]') or use local")
    return impl


def resolve_precision(precision: str, device_type: str) -> str:
    """``fp32`` or ``bf16`` for ``train.precision`` on ``device_type`` (``cpu`` / ``cuda``).

    ``auto``: ``bf16`` on a GPU that computes it (``torch.cuda.is_bf16_supported()``: Ampere and newer; a GPU
    job planned where no GPU is visible is taken to have one), and on a CPU with native bfloat16
    (:func:`data_prep.engines.native_bf16_cpu`: ``avx512_bf16`` / ``amx_bf16`` / Arm ``bf16``, where a
    llama-tiny step at the quickstart's shape takes 0.75x the fp32 time, docs/benchmarks.md); else ``fp32``,
    since bf16 without these instructions is emulated and slower than fp32. Any other value is returned as given.
    """
    if precision != "auto":
        return precision
    if device_type == "cuda":
        import torch

        return "fp32" if torch.cuda.is_available() and not torch.cuda.is_bf16_supported() else "bf16"
    from data_prep.engines import native_bf16_cpu

    return "bf16" if native_bf16_cpu() else "fp32"


def with_resolved_precision(cfg, device_type: str):
    """``cfg`` (an ``ExperimentConfig``), or a copy of it whose ``train.precision`` is resolved for
    ``device_type`` (:func:`resolve_precision`); the caller's object is never changed."""
    resolved = resolve_precision(cfg.train.precision, device_type)
    if resolved == cfg.train.precision:
        return cfg
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": resolved})})


def precision_fields(train, transformer_impl: str, device_type: str, te_available: bool, num_layers: int,
                     pipeline_model_parallel_size: int = 1) -> dict[str, Any]:
    """The ``TransformerConfig`` precision fields for ``train`` (a ``TrainConfig``), after checking them.

    ``transformer_impl`` is the resolved implementation (:func:`resolve_transformer_impl`). Returns bf16,
    params_dtype-free keywords: ``bf16`` and, with FP8, ``fp8``, ``fp8_recipe``, ``fp8_amax_history_len``,
    ``fp8_amax_compute_algo``, ``first_last_layers_bf16``, ``num_layers_at_start_in_bf16``,
    ``num_layers_at_end_in_bf16``. Raises PrecisionError naming the key."""
    precision = resolve_precision(train.precision, device_type)
    out: dict[str, Any] = {"bf16": precision == "bf16"}
    if train.fp8 is None:
        return out
    if device_type != "cuda":
        raise PrecisionError(f"train.fp8 = {train.fp8} needs an FP8-capable GPU (Hopper or newer) with Transformer "
                             "Engine; on CPU use train.fp8: null")
    if not te_available:
        raise PrecisionError("train.fp8 needs Transformer Engine, which does not import here: install the gpu extra "
                             "(pip install -e '.[train,gpu]')")
    if transformer_impl != "transformer_engine":
        raise PrecisionError("train.fp8 needs model.transformer_impl transformer_engine (or auto on a GPU)")
    if precision != "bf16":
        raise PrecisionError("train.fp8 runs on top of bf16: set train.precision: bf16")
    keep = train.fp8_bf16_layers
    if keep and train.fp8_recipe == "delayed":
        raise PrecisionError("train.fp8_bf16_layers needs a current-scaling recipe (train.fp8_recipe tensorwise, "
                             "blockwise or mxfp8); megatron-core does not support it with delayed scaling")
    if keep and 2 * keep > num_layers // pipeline_model_parallel_size:
        raise PrecisionError(f"train.fp8_bf16_layers = {keep}: keeping {keep} first and {keep} last layers in bf16 "
                             f"leaves no FP8 layer among {num_layers // pipeline_model_parallel_size} per pipeline stage")
    out.update(fp8=train.fp8, fp8_recipe=train.fp8_recipe, fp8_amax_history_len=train.fp8_amax_history_len,
               fp8_amax_compute_algo=train.fp8_amax_compute_algo, first_last_layers_bf16=bool(keep),
               num_layers_at_start_in_bf16=keep or 1, num_layers_at_end_in_bf16=keep or 1)
    return out
