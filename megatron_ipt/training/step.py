"""One training iteration and one held-out evaluation through megatron-core's pipeline schedules.

``train_step`` mirrors Megatron-LM's ``train_step`` (zero grads, forward/backward over the micro-batches of
one global batch, optimizer step, scheduler step); ``evaluate`` runs the same schedule with
``forward_only=True`` over a whole held-out set. Losses are reduced token-weighted over micro-batches and
data-parallel ranks, so every rank returns the same number.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator

import torch

from megatron_ipt.config import ExperimentConfig
from megatron_ipt.training import cpu_backend, data, mcore, parallel


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
    inputs = {"input_ids": batch["tokens"], "position_ids": batch["position_ids"],
              "attention_mask": batch.get("attention_mask"), "labels": batch["labels"]}
    return _model_forward(model, inputs), partial(_loss_func, batch["loss_mask"])


def _model_forward(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """``model(**inputs)``; on the CPU backend, for a model whose forward runs no model-parallel collective
    (tensor, pipeline, context and expert parallel size 1, dense), with the backend's function mode suspended
    (:func:`~megatron_ipt.training.cpu_backend.suspended`) once a forward of the same input shape has run under it:
    that first one moves RoPE's frequencies to ``torch.cuda.current_device()`` and caches the position embedding
    for the sequence length (megatron-core's ``RotaryEmbedding``), after which megatron-core's forward names no cuda
    device. The mode's Python hook on each of the ~2,800 torch calls of a llama-tiny iteration costs about 6% of
    the step (docs/benchmarks.md, trainer overhead). The backward still runs under the mode (the backend re-enters
    it around the autograd engine). Should a megatron-core version name a cuda device in a later forward, it fails
    without the mode and is rerun with it, as is every later forward of that model (the reason is kept in
    ``model.ipt_cpu_forward["needs_mode"]``).
    """
    if not cpu_backend.is_active() or not _forward_without_collectives(model):
        return model(**inputs)
    state = model.__dict__.setdefault("ipt_cpu_forward", {"shapes": set(), "needs_mode": None})
    shape = tuple(inputs["input_ids"].shape)
    if state["needs_mode"] is None and shape in state["shapes"]:
        try:
            with cpu_backend.suspended():
                return model(**inputs)
        except Exception as e:  # noqa: BLE001 - a cuda device named in the forward: rerun under the mode
            state["needs_mode"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    output = model(**inputs)
    state["shapes"].add(shape)
    return output


def _forward_without_collectives(model: torch.nn.Module) -> bool:
    """Whether ``model``'s forward runs no collective: tensor, pipeline, context and expert parallel size 1, and
    no MoE layer (the router and token dispatcher allocate on ``torch.cuda.current_device()``)."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    sizes = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
             "expert_model_parallel_size")
    return all(getattr(config, k, 1) in (1, None) for k in sizes) and not getattr(config, "num_moe_experts", None)


def _reduce_losses(outputs: list[dict]) -> tuple[float, float]:
    """Sum (loss_sum, tokens) over micro-batches and data-parallel ranks; the same result on every rank.

    Only the last pipeline stage has losses, and tensor-parallel ranks hold copies, so only
    (last stage, TP rank 0) ranks contribute to a world all-reduce.
    """
    ps = mcore.parallel_state()

    totals = torch.zeros(2, dtype=torch.float64, device=collective_device())
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
    chunk. Returns loss (token-weighted mean), lr, grad norm, skipped flag, and for an MoE model its router's
    auxiliary losses (``moe_load_balancing_loss``: :func:`megatron_ipt.training.mcore.moe_aux_losses`)."""
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
    moe = {f"moe_{k}": v for k, v in mcore.moe_aux_losses(layout.num_microbatches).items()}  # {} when dense
    return {"loss": loss_sum / max(tokens, 1.0), "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None, "skipped": not ok, **moe}


def parameter_count(model: list[torch.nn.Module]) -> int:
    """Parameters of the whole model: this rank's non-duplicated params (all chunks) summed over TP and PP ranks;
    the experts' parameters (``...mlp.experts.*``), split by expert parallel and expert tensor parallel, summed
    over the expert tensor x expert x pipeline group instead."""
    ps = mcore.parallel_state()
    dense = expert = 0
    for name, p in (x for chunk in model for x in chunk.named_parameters()):
        if not mcore.param_is_not_tensor_parallel_duplicate(p):
            continue
        if ".experts." in name:  # megatron's allreduce=False marks experts only when EP > 1
            expert += p.numel()
        else:
            dense += p.numel()
    totals = torch.tensor([dense, expert], dtype=torch.int64, device=collective_device())
    torch.distributed.all_reduce(totals[:1], group=ps.get_model_parallel_group())
    # every rank of an expert's expert-tensor x expert x pipeline group holds another part of the experts (with
    # EP = 1 and expert tensor parallel 2 too: each rank holds half of every expert's matrices)
    torch.distributed.all_reduce(totals[1:], group=ps.get_expert_tensor_model_pipeline_parallel_group())
    return int(totals.sum().item())


def collective_device() -> torch.device:
    """Where tensors for torch.distributed collectives live: the current GPU under NCCL, else the CPU (gloo)."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
