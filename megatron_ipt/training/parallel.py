"""Process groups and the parallel layout: torch.distributed plus megatron-core's ``parallel_state``.

The layout is checked before anything starts: data parallel size is derived as
``world_size / (TP * PP * CP)`` and every divisibility rule is checked up front, with one error listing
every broken rule and its numbers (:class:`ParallelLayoutError`).

World size 1 works in-process without torchrun (a free TCP port on 127.0.0.1 is picked), so tests can
set up and tear down several runs in one process; under torchrun (``RANK``/``WORLD_SIZE`` in the
environment) the usual ``env://`` rendezvous is used.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import asdict, dataclass
from datetime import timedelta

import numpy as np
import torch

from megatron_ipt.training import mcore
from megatron_ipt.config import ConfigError, ParallelConfig


class ParallelLayoutError(ConfigError):
    """The parallel layout does not divide the world, the batch or the model; the message names the numbers."""


@dataclass(frozen=True)
class Layout:
    """A checked parallel layout.

    ``num_microbatches`` is the gradient-accumulation steps per iteration:
    ``global_batch_size / (micro_batch_size * data_parallel_size)``.
    """

    world_size: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    data_parallel_size: int
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int = 1

    @property
    def expert_data_parallel_size(self) -> int:
        """Replicas of each expert shard: ``world_size / (ETP * EP * PP)`` (megatron-core's expert data parallel)."""
        return self.world_size // (self.expert_tensor_parallel_size * self.expert_model_parallel_size
                                   * self.pipeline_model_parallel_size)

    def as_dict(self) -> dict:
        return asdict(self)


def check_layout(
    parallel: ParallelConfig,
    *,
    world_size: int,
    micro_batch_size: int,
    global_batch_size: int,
    num_layers: int,
    num_attention_heads: int,
    num_query_groups: int,
    seq_length: int | None = None,
    num_moe_experts: int | None = None,
    moe_ffn_hidden_size: int | None = None,
) -> Layout:
    """Derive the data parallel size and check every divisibility rule of a Megatron layout.

    Rules (mirroring Megatron-LM's argument validation): world size divisible by TP * PP * CP; global
    batch divisible by micro batch * DP; layers divisible by PP (by PP * VPP with virtual stages, which
    need PP >= 2); attention heads and query groups divisible by TP; with context parallel the sequence
    length divisible by 2 * CP (causal load balancing); sequence parallel needs TP >= 2 and a sequence
    length divisible by TP; with virtual stages the micro-batches per iteration divisible by PP (megatron-core's
    interleaved schedule groups PP micro-batches per virtual stage, ``microbatch_group_size_per_vp_stage``, and
    refuses a remainder smaller than PP: ``pipeline_parallel/schedules.py``,
    ``forward_backward_pipelining_with_interleaving``). Expert parallel (EP) needs an MoE model
    (``num_moe_experts``) whose experts it divides. Expert tensor parallel (ETP, ``expert_tensor_parallel_size``;
    None = TP) other than TP needs an MoE model and EP > 1 (megatron-core marks the experts' parameters for the
    expert data parallel gradient reduction only when EP > 1, ``tensor_parallel/layers.py`` ``allreduce``; with
    EP = 1 it reduces them over the data parallel ranks, which hold other shards: measured as a different loss
    curve), and each expert's inner size (``moe_ffn_hidden_size``) divisible by it. With experts, the world size must be divisible by ETP * EP * PP (megatron-core's
    ``initialize_model_parallel``: expert data parallel = world / (ETP * EP * PP)), and TP > 1 needs
    ``sequence_parallel`` (megatron-core's ``MoELayer`` refuses to train with TP > 1 without it). Raises
    :class:`ParallelLayoutError` with one line per broken rule.
    """
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    cp, vpp, sp = parallel.context_parallel_size, parallel.virtual_pipeline_model_parallel_size, parallel.sequence_parallel
    problems = []
    if world_size % (tp * pp * cp):
        problems.append(
            f"world size {world_size} is not divisible by tensor_model_parallel_size {tp} * "
            f"pipeline_model_parallel_size {pp}" + (f" * context_parallel_size {cp}" if cp > 1 else "")
            + f" = {tp * pp * cp}"
        )
    dp = max(world_size // (tp * pp * cp), 1)
    if vpp is not None:
        if pp < 2:
            problems.append(f"virtual_pipeline_model_parallel_size {vpp} needs pipeline_model_parallel_size >= 2 (is {pp})")
        elif num_layers % (pp * vpp):
            problems.append(f"num_layers {num_layers} is not divisible by pipeline_model_parallel_size {pp} * "
                            f"virtual_pipeline_model_parallel_size {vpp} = {pp * vpp}")
    if cp > 1 and seq_length is not None and seq_length % (2 * cp):
        problems.append(f"seq_length {seq_length} is not divisible by 2 * context_parallel_size {cp} = {2 * cp}")
    if sp and tp < 2:
        problems.append(f"sequence_parallel needs tensor_model_parallel_size >= 2 (is {tp})")
    elif sp and seq_length is not None and seq_length % tp:
        problems.append(f"sequence_parallel: seq_length {seq_length} is not divisible by tensor_model_parallel_size {tp}")
    if global_batch_size % (micro_batch_size * dp):
        problems.append(
            f"global_batch_size {global_batch_size} is not divisible by micro_batch_size {micro_batch_size} * "
            f"data parallel size {dp} = {micro_batch_size * dp}"
        )
    elif vpp is not None and pp >= 2 and (global_batch_size // (micro_batch_size * dp)) % pp:
        m = global_batch_size // (micro_batch_size * dp)
        problems.append(
            f"virtual_pipeline_model_parallel_size {vpp}: micro-batches per iteration {m} (global_batch_size "
            f"{global_batch_size} / (micro_batch_size {micro_batch_size} * data parallel size {dp})) is not divisible "
            f"by pipeline_model_parallel_size {pp} (megatron-core's interleaved schedule)"
        )
    if num_layers % pp:
        problems.append(f"num_layers {num_layers} is not divisible by pipeline_model_parallel_size {pp}")
    if num_attention_heads % tp:
        problems.append(f"num_attention_heads {num_attention_heads} is not divisible by tensor_model_parallel_size {tp}")
    if num_query_groups % tp:
        problems.append(f"num_query_groups {num_query_groups} is not divisible by tensor_model_parallel_size {tp}")
    if num_attention_heads % num_query_groups:
        problems.append(f"num_attention_heads {num_attention_heads} is not divisible by num_query_groups {num_query_groups}")
    ep = parallel.expert_model_parallel_size
    if ep > 1 and not num_moe_experts:
        problems.append(f"expert_model_parallel_size {ep} needs a mixture-of-experts model (the model has no experts)")
    elif ep > 1 and num_moe_experts % ep:
        problems.append(f"number of experts {num_moe_experts} is not divisible by expert_model_parallel_size {ep}")
    etp = parallel.expert_tensor_parallel_size or tp
    if etp != tp and not num_moe_experts:
        problems.append(f"expert_tensor_parallel_size {etp} needs a mixture-of-experts model (the model has no experts)")
    elif etp != tp and ep == 1:
        problems.append(f"expert_tensor_parallel_size {etp} other than tensor_model_parallel_size {tp} needs "
                        "expert_model_parallel_size > 1 (megatron-core reduces the experts' gradients over the "
                        "expert data parallel ranks only with expert parallel; otherwise it mixes different shards)")
    if num_moe_experts and etp > 1 and moe_ffn_hidden_size and moe_ffn_hidden_size % etp:
        problems.append(f"expert inner size {moe_ffn_hidden_size} is not divisible by expert_tensor_parallel_size {etp}")
    if (num_moe_experts or ep > 1) and world_size % (etp * ep * pp):
        problems.append(f"world size {world_size} is not divisible by expert_tensor_parallel_size {etp} * "
                        f"expert_model_parallel_size {ep} * pipeline_model_parallel_size {pp} = {etp * ep * pp}")
    if num_moe_experts and tp > 1 and not sp:
        problems.append(f"tensor_model_parallel_size {tp} with a mixture-of-experts model needs sequence_parallel "
                        "true (megatron-core's MoELayer refuses to train without it)")
    if problems:
        raise ParallelLayoutError("invalid parallel layout:\n  " + "\n  ".join(problems))
    return Layout(
        world_size=world_size,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        data_parallel_size=dp,
        micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size,
        num_microbatches=global_batch_size // (micro_batch_size * dp),
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        sequence_parallel=sp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


def model_fields(preset) -> dict:
    """The keywords :func:`check_layout` / :func:`setup` take from a model preset (a
    :class:`~megatron_ipt.training.presets.ModelPreset`): layers, heads, query groups, experts and their inner size."""
    return dict(num_layers=preset.num_layers, num_attention_heads=preset.num_attention_heads,
                num_query_groups=preset.num_query_groups, num_moe_experts=preset.num_moe_experts,
                moe_ffn_hidden_size=preset.expert_ffn_hidden_size if preset.num_moe_experts else None)


def check_runnable(layout: Layout, device_type: str) -> None:
    """Refuse layouts this trainer cannot run on ``device_type`` (before any group is built).

    Context parallel needs Transformer Engine's attention on CUDA; sequence parallel's reduce-scatter /
    all-gather of activations is not run on CPU (gloo). Virtual pipeline stages run everywhere (model chunks
    with the interleaved schedule). Raises :class:`ParallelLayoutError` naming the setting.
    """
    problems = []
    if device_type != "cuda" and layout.context_parallel_size > 1:
        problems.append(f"context_parallel_size {layout.context_parallel_size} needs CUDA GPUs with Transformer Engine "
                        f"(device is {device_type}); set it to 1")
    if device_type != "cuda" and layout.sequence_parallel:
        problems.append(f"sequence_parallel runs on CUDA GPUs only (device is {device_type}); set it to false")
    if problems:
        raise ParallelLayoutError("parallel layout cannot run here:\n  " + "\n  ".join(problems))


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when ``torch.cuda.is_available()`` else cpu (never ``torch.version.cuda``).

    Raises RuntimeError when ``cuda`` is asked for and no GPU is available.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but torch.cuda.is_available() is False")
    return torch.device(name)


def launched_by_torchrun() -> bool:
    """True when this process was started by torchrun / srun (``WORLD_SIZE`` or ``LOCAL_RANK`` set)."""
    return "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(device: torch.device, *, timeout_minutes: int = 30) -> tuple[int, int]:
    """Initialise torch.distributed (gloo on CPU, nccl on GPU) and return ``(rank, world_size)``.

    Under torchrun uses ``env://``; otherwise starts a world of size 1 on a free local TCP port.
    Does nothing but report when a process group already exists.
    """
    dist = torch.distributed
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(minutes=timeout_minutes)
    if launched_by_torchrun():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    else:
        dist.init_process_group(
            backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, timeout=timeout
        )
    return dist.get_rank(), dist.get_world_size()


def initialize_model_parallel(layout: Layout, device: torch.device) -> None:
    """Create megatron's tensor/pipeline/data parallel groups (``parallel_state.initialize_model_parallel``).

    Keyword arguments only, so it works across megatron-core versions. ``pipeline_dtype`` is a
    TransformerConfig matter, not set here.
    """
    mcore.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
        context_parallel_size=layout.context_parallel_size,
        expert_model_parallel_size=layout.expert_model_parallel_size,
        expert_tensor_parallel_size=layout.expert_tensor_parallel_size,
    )


def set_seed(seed: int) -> None:
    """Seed python, numpy, torch and megatron's RNG tracker the way Megatron-LM does.

    The seed is offset by ``100 * pipeline rank`` so pipeline stages initialise differently; tensor
    parallel ranks share it (weights are initialised on CPU from the full master weight). Mirrors
    Megatron-LM's ``_set_random_seed`` and ``tensor_parallel.model_parallel_cuda_manual_seed``.
    """
    seed = seed + 100 * mcore.parallel_state().get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    mcore.model_parallel_cuda_manual_seed(seed)


def setup(
    parallel: ParallelConfig,
    device: torch.device,
    *,
    micro_batch_size: int,
    global_batch_size: int,
    num_layers: int,
    num_attention_heads: int,
    num_query_groups: int,
    seed: int,
    seq_length: int | None = None,
    num_moe_experts: int | None = None,
    moe_ffn_hidden_size: int | None = None,
) -> Layout:
    """Initialise the process group, check the layout, build megatron's groups and seed. Returns the layout.

    On CPU call it with :mod:`megatron_ipt.training.cpu_backend` active (megatron seeds its "CUDA" RNG tracker).
    Call :func:`teardown` when done. On a layout error the process group is left as it was found
    (destroyed again if this call created it), and :class:`ParallelLayoutError` is raised.
    """
    created = not torch.distributed.is_initialized()
    _, world_size = init_process_group(device)
    try:
        layout = check_layout(
            parallel,
            world_size=world_size,
            micro_batch_size=micro_batch_size,
            global_batch_size=global_batch_size,
            num_layers=num_layers,
            num_attention_heads=num_attention_heads,
            num_query_groups=num_query_groups,
            seq_length=seq_length,
            num_moe_experts=num_moe_experts,
            moe_ffn_hidden_size=moe_ffn_hidden_size,
        )
        check_runnable(layout, device.type)
        initialize_model_parallel(layout, device)
        set_seed(seed)
    except BaseException:
        if created:
            teardown()
        raise
    return layout


def teardown() -> None:
    """Destroy megatron's parallel groups and the torch.distributed process group (safe to call twice)."""
    mcore.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
