"""The project's one seam into megatron-core: every call the trainer makes into it goes through here.

Supported: megatron-core >= 0.16.1 and < 0.20 (:data:`SUPPORTED`); tested with 0.16.1 (Python 3.11)
and 0.19.2 (Python 3.12). The rules that let one code path serve every version in that range:

- calls use keyword arguments only (positional parameters moved between releases, e.g. ``common_strategy``
  of ``dist_checkpointing.save`` / ``load`` and ``moe_use_legacy_grouped_gemm`` of the layer specs);
- config dataclasses (``TransformerConfig``, ``OptimizerConfig``, ``DistributedDataParallelConfig``,
  ``GPTDatasetConfig``) are built from their actual fields (:func:`make_config`): a setting a version
  does not have is left out, never an error;
- functions whose parameters changed (``initialize_model_parallel``) get only the keywords they accept
  (:func:`call_with_accepted`);
- checkpoints are written so that every supported version can read them: 0.17+ no longer writes the
  ``common.pt`` file that 0.16.1's loader needs, so :func:`save_distributed` writes it when missing.

No version branches: each helper asks the installed megatron-core what it has.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

SUPPORTED = ">=0.16.1,<0.20"
TESTED = ("0.16.1", "0.19.2")
COMMON_STATE_FILE = "common.pt"  # megatron.core.dist_checkpointing.core.COMMON_STATE_FNAME in 0.16.1


@lru_cache(maxsize=1)
def version() -> str:
    """The installed megatron-core version string (``metadata.version("megatron-core")``)."""
    return metadata.version("megatron-core")


def is_supported(v: str | None = None) -> bool:
    """True when ``v`` (default: the installed version) lies in :data:`SUPPORTED`."""
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(SUPPORTED).contains(v or version(), prereleases=True)


def warn_if_unsupported() -> None:
    """Warn once (UserWarning) when the installed megatron-core is outside :data:`SUPPORTED`."""
    if not is_supported():
        warnings.warn(
            f"megatron-core {version()} is outside the supported range {SUPPORTED} (tested: {', '.join(TESTED)})",
            UserWarning, stacklevel=2,
        )


# ------------------------------------------------------------------------------------------ generic
def field_names(cls: type) -> set[str]:
    """Names of the dataclass fields of ``cls``."""
    return {f.name for f in dataclasses.fields(cls)}


def make_config(cls: type, **kwargs: Any):
    """``cls(**kwargs)`` keeping only the kwargs that are fields of dataclass ``cls`` in this version."""
    names = field_names(cls)
    return cls(**{k: v for k, v in kwargs.items() if k in names})


def accepted_kwargs(fn: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``fn`` accepts by name (all of them when it takes ``**kwargs``)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


def call_with_accepted(fn: Callable, **kwargs: Any) -> Any:
    """``fn(**kwargs)`` with the keywords ``fn`` does not accept in this version left out."""
    return fn(**accepted_kwargs(fn, kwargs))


# ---------------------------------------------------------------------------------- parallel state
def parallel_state():
    """``megatron.core.parallel_state``."""
    from megatron.core import parallel_state as ps

    return ps


def initialize_model_parallel(**kwargs: Any) -> None:
    """``parallel_state.initialize_model_parallel`` with keywords only (its parameters moved in 0.17+)."""
    call_with_accepted(parallel_state().initialize_model_parallel, **kwargs)


def destroy_model_parallel() -> None:
    parallel_state().destroy_model_parallel()


def model_parallel_cuda_manual_seed(seed: int) -> None:
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def cuda_rng_tracker():
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker()


def param_is_not_tensor_parallel_duplicate(param) -> bool:
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate as fn

    return fn(param)


# Modules holding megatron's own copies of the CUDA RNG accessors, for the CPU backend to redirect.
CUDA_RNG_MODULES = (
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel",
    "megatron.core.transformer.cuda_graphs",
)


# ------------------------------------------------------------------------------------------- model
def transformer_config(**kwargs: Any):
    """``TransformerConfig`` from the fields this version has."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return make_config(TransformerConfig, **kwargs)


def local_layer_spec(**kwargs: Any):
    """``get_gpt_layer_local_spec`` (keywords only; keywords this version lacks are left out)."""
    from megatron.core.models.gpt import gpt_layer_specs

    return call_with_accepted(gpt_layer_specs.get_gpt_layer_local_spec, **kwargs)


def transformer_engine_layer_spec(**kwargs: Any):
    """``get_gpt_layer_with_transformer_engine_spec`` (keywords only)."""
    from megatron.core.models.gpt import gpt_layer_specs

    return call_with_accepted(gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec, **kwargs)


def gpt_model(**kwargs: Any):
    """``GPTModel(**kwargs)`` (keywords only)."""
    from megatron.core.models.gpt import GPTModel

    with warnings.catch_warnings():  # 0.19 logs a deprecation in favour of HybridModel
        warnings.simplefilter("ignore", DeprecationWarning)
        return GPTModel(**kwargs)


def float16_module(config, module):
    from megatron.core.transformer.module import Float16Module

    return Float16Module(config, module)


def kv_cache_forward_kwargs(forward: Callable, *, max_batch_size: int, max_sequence_length: int) -> dict | None:
    """Keywords that make a ``GPTModel.forward`` keep and reuse its keys and values (megatron-core's KV cache
    for static-batch generation): a fresh ``StaticInferenceContext(max_batch_size, max_sequence_length)`` under
    ``inference_context=`` (under ``inference_params=`` where ``forward`` only has the older name; the older
    ``inference_params.InferenceParams`` where the context class is missing) and ``runtime_gather_output=True``
    (inference asserts it). The caller advances the context's ``sequence_len_offset`` by ``n`` after feeding
    ``n`` tokens (as ``MegatronScorer.kv_step`` does). None where this version has neither class or ``forward`` takes neither keyword."""
    with warnings.catch_warnings():  # contexts/__init__ warns about its dynamic-context re-exports
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from megatron.core.inference.contexts import StaticInferenceContext as Context
        except ImportError:
            try:
                from megatron.core.inference_params import InferenceParams as Context
            except ImportError:
                return None
    params = inspect.signature(forward).parameters
    name = next((n for n in ("inference_context", "inference_params") if n in params), None)
    if name is None:
        return None
    context = Context(max_batch_size=max_batch_size, max_sequence_length=max_sequence_length)
    return {name: context, **accepted_kwargs(forward, {"runtime_gather_output": True})}


def dot_product_attention_class() -> type:
    """``megatron.core.transformer.dot_product_attention.DotProductAttention``: the local layer spec's unfused core
    attention (the base of ``megatron_ipt.training.attention``'s SDPA one)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return DotProductAttention


def attention_module():
    """``megatron.core.transformer.attention``: its ``SelfAttention`` (the base of
    ``megatron_ipt.training.attention``'s rotated-key-cache one) and the RoPE helpers its ``forward`` calls
    (``apply_rotary_pos_emb``, ``_yarn_get_concentration_factor_from_config``), as that version binds them."""
    from megatron.core.transformer import attention

    return attention


def applies_attention_masks(model) -> bool:
    """True when every core attention in ``model`` is megatron-core's own ``DotProductAttention`` or a subclass
    (the local layer spec, unfused or SDPA: ``megatron_ipt.training.attention``), whose softmax applies a given boolean ``attention_mask`` (``[b, 1, sq, sk]``, True = masked) as
    it is, in prefill and in KV-cached decoding alike (``fused_softmax.forward_torch_softmax``). Transformer
    Engine's attention follows its ``attn_mask_type`` instead, so a per-row padding mask may not reach it: False."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    cores = [m.core_attention for m in model.modules() if hasattr(m, "core_attention")]
    return bool(cores) and all(isinstance(c, DotProductAttention) for c in cores)


# ------------------------------------------------------------------------------ fields of the configs
def transformer_config_fields() -> set[str]:
    """Field names of this version's ``TransformerConfig`` (which scale settings it can take)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return field_names(TransformerConfig)


def ddp_config_fields() -> set[str]:
    """Field names of this version's ``DistributedDataParallelConfig``."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return field_names(DistributedDataParallelConfig)


# ------------------------------------------------------------------------------- optimizer and DDP
def optimizer(**config_kwargs: Any):
    """``get_megatron_optimizer`` over the model chunks, its ``OptimizerConfig`` built from the fields this
    version has. ``model`` (one module, or a list of model chunks) is taken from ``config_kwargs['model']``."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = config_kwargs.pop("model")
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    return get_megatron_optimizer(config=make_config(OptimizerConfig, **config_kwargs), model_chunks=chunks)


def param_scheduler(**kwargs: Any):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return call_with_accepted(OptimizerParamScheduler, **kwargs)


def distributed_data_parallel(*, config, module, **ddp_kwargs: Any):
    """megatron's ``DistributedDataParallel`` with a ``DistributedDataParallelConfig`` built from the fields
    this version has; returns ``(ddp, finalize_model_grads)``."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp_config = make_config(DistributedDataParallelConfig, **ddp_kwargs)
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=module), finalize_model_grads


def moe_aux_losses(num_microbatches: int) -> dict[str, float]:
    """The MoE router's auxiliary losses of the last iteration, as Megatron-LM's ``track_moe_metrics`` reports them:
    name (``load_balancing_loss``: the unweighted loss, before ``moe_aux_loss_coeff``) -> mean over MoE layers
    and micro-batches, reduced over pipeline stages and data-parallel ranks; then the tracker is cleared. Empty
    for a dense model. A collective: every rank calls it after each iteration. Uses ``moe_utils``'
    ``reduce_aux_losses_tracker_across_ranks`` / ``get_moe_layer_wise_logging_tracker`` / ``clear_aux_losses_tracker``,
    present (deprecated since 0.16 in favour of a metrics tracker object) in every supported version."""
    from megatron.core.transformer.moe import moe_utils

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not moe_utils.get_moe_layer_wise_logging_tracker():
            return {}
        moe_utils.reduce_aux_losses_tracker_across_ranks()
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        out = {name: float(entry["values"].float().mean()) / num_microbatches for name, entry in tracker.items()}
        moe_utils.clear_aux_losses_tracker()
    return out


def reset_moe_aux_losses() -> None:
    """Forget the MoE router-loss entries an earlier model of this process left in megatron-core's global tracker
    (they hold that model's process groups); call before building a model. 0.19's ``MoEMetricsTracker``
    (``get_moe_metrics_tracker``) when present, else 0.16's module-level dict."""
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "get_moe_metrics_tracker"):
        moe_utils.get_moe_metrics_tracker().metrics.clear()
    else:
        moe_utils.get_moe_layer_wise_logging_tracker().clear()


def forward_backward_func():
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()


# -------------------------------------------------------------------------------------------- data
def gpt_dataset_config(**kwargs: Any):
    """``GPTDatasetConfig`` from the fields this version has."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return make_config(GPTDatasetConfig, **kwargs)


def build_gpt_datasets(sizes: list, config) -> tuple:
    """``BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank, config).build()`` on every rank."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()


def build_mock_gpt_datasets(sizes: list, config) -> tuple:
    """``BlendedMegatronDatasetBuilder(MockGPTDataset, ...)``: synthetic token sequences (``config.blend`` None)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import MockGPTDataset

    return BlendedMegatronDatasetBuilder(MockGPTDataset, sizes, lambda: True, config).build()


def indexed_dataset(path_prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(path_prefix)


def indexed_dataset_builder(bin_path: str, *, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    return IndexedDatasetBuilder(bin_path, dtype=dtype)


# ---------------------------------------------------------------------------------- checkpointing
def sharded_object(**kwargs: Any):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(**kwargs)


def sharded_tensor_classes() -> tuple[type, type]:
    """``(ShardedTensor, ShardedTensorFactory)`` of ``dist_checkpointing.mapping`` (entries of a sharded state
    dict, for code that rebinds their data, e.g. ``megatron_ipt.hf.convert``)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return ShardedTensor, ShardedTensorFactory


def save_distributed(state: dict, directory: Path | str) -> None:
    """``dist_checkpointing.save`` (default torch_dist strategy, keywords only), readable by every supported
    version: when this version wrote no ``common.pt`` (0.17+ keep the common state elsewhere), rank 0
    writes it from the checkpoint's own common state, which is what 0.16.1 loads. Call on every rank."""
    import torch
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(sharded_state_dict=state, checkpoint_dir=str(directory))
    _write_common_state_file(directory)


def _write_common_state_file(directory: Path | str) -> None:
    """Rank 0 writes ``common.pt`` from the finished checkpoint's common state when this version wrote none."""
    import torch

    common = Path(directory) / COMMON_STATE_FILE
    if torch.distributed.get_rank() == 0 and not common.exists():
        state_dict = load_common_state(directory)
        tmp = common.with_name(common.name + ".tmp")
        torch.save(state_dict, tmp)
        tmp.replace(common)
    torch.distributed.barrier()


def save_distributed_async(state: dict, directory: Path | str):
    """``dist_checkpointing.save(..., async_sharded_save=True)``: the common state is written now, the sharded
    tensors by the returned megatron ``AsyncRequest`` once :func:`async_calls_queue` schedules it. Its finalize
    functions (run on every rank when every rank's writes finished) write ``metadata.json`` and then, as
    :func:`save_distributed` does, ``common.pt``; append yours after them. Uses megatron-core's own async writer
    (``async_strategy="mcore"``; 0.17+ default to nvidia-resiliency-ext's, which is not a dependency here).
    Call on every rank."""
    from functools import partial

    from megatron.core import dist_checkpointing

    request = call_with_accepted(dist_checkpointing.save, sharded_state_dict=state, checkpoint_dir=str(directory),
                                 async_sharded_save=True, async_strategy="mcore")
    request.finalize_fns.append(partial(_write_common_state_file, directory))
    return request


def async_calls_queue():
    """megatron-core's ``AsyncCallsQueue`` (``dist_checkpointing.strategies.async_utils``): runs scheduled
    ``AsyncRequest`` s in a forked process; ``maybe_finalize_async_calls(blocking)`` runs their finalize functions
    on every rank once all ranks finished; ``close()`` waits for the rest. Call its methods on every rank."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    return AsyncCallsQueue()


def load_common_state(directory: Path | str) -> dict:
    """The checkpoint's common (non-sharded) state, as this version's loader sees it."""
    from megatron.core import dist_checkpointing

    with warnings.catch_warnings():  # deprecated in newer versions, still the public way
        warnings.simplefilter("ignore")
        return dist_checkpointing.load_common_state_dict(checkpoint_dir=str(directory))


def load_distributed(template: dict, directory: Path | str, *, whole_tensors: bool = True) -> dict:
    """``dist_checkpointing.load`` (keywords only; the strategy is read from the checkpoint).

    ``whole_tensors=False`` lets ``template`` ask for part of a tensor only (e.g. one layer of the stacked
    per-layer tensors): megatron's ``validate_access_integrity`` check, that the ranks together read every
    tensor whole, is skipped."""
    from megatron.core import dist_checkpointing

    with warnings.catch_warnings():  # torch deprecations inside megatron-core's torch_dist loader, on every load
        for message in LOAD_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        return dist_checkpointing.load(sharded_state_dict=template, checkpoint_dir=str(directory),
                                       validate_access_integrity=whole_tensors)


# FutureWarnings torch raises from megatron-core's torch_dist load path (megatron-core 0.16-0.19 with torch 2.13+):
# ``torch.distributed.checkpoint.load_state_dict`` and ``ShardedTensor`` are deprecated. Nothing a user can act on.
LOAD_DEPRECATIONS = (r"`load_state_dict` is deprecated", r"Please use DTensor instead and we are deprecating ShardedTensor")


def filesystem_async_module():
    """``dist_checkpointing.strategies.filesystem_async`` or None where this version lacks it."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return None
    return filesystem_async
