"""Compare the SDPA core attention with megatron-core's unfused ``DotProductAttention`` on one model's weights.

:func:`compare` builds the same llama-test model twice (``model.attention_backend`` unfused and sdpa; the SDPA
model loads the unfused one's state dict, so parameter names must match), runs the same batch through both
(training mode, no dropout) and returns the largest absolute difference of the logits (real positions only) and of
every parameter's gradient of the mean token loss. Used in-process at TP=1 by tests/test_attention.py and, for
TP=2, as a script under torchrun (rank 0 prints ``RESULT {json}``):

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/attention_worker.py --tp 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_ipt.config import ModelConfig, ParallelConfig  # noqa: E402
from megatron_ipt.training import cpu_backend, parallel  # noqa: E402
from megatron_ipt.training.model import build_model  # noqa: E402
from megatron_ipt.training.presets import padded_vocab_size, resolve_preset  # noqa: E402

CASES = ("causal", "padding", "documents")
VOCAB, SEQ, BATCH = 250, 32, 3


def batch(case: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(tokens [b, s], attention_mask [b, 1, s, s] bool True = masked or None, real [b, s] bool)`` for ``case``:
    causal (no mask: megatron's causal mask), padding (rows left-padded by 0, 5 and 17 tokens: padding keys
    masked, as batched generation does) or documents (block-diagonal causal masks of documents ending at
    different places, as ``reset_attention_mask`` builds)."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, VOCAB, (BATCH, SEQ), generator=gen)
    real = torch.ones(BATCH, SEQ, dtype=torch.bool)
    later = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)  # key after query
    if case == "causal":
        return tokens, None, real
    if case == "padding":
        pos = torch.arange(SEQ)
        real = pos.unsqueeze(0) >= torch.tensor([0, 5, 17]).unsqueeze(1)
        mask = later.unsqueeze(0) | ~real.unsqueeze(1)
        return tokens, mask.unsqueeze(1), real
    if case == "documents":
        doc = torch.stack([(torch.arange(SEQ) >= 10).long(), (torch.arange(SEQ) // 7), torch.zeros(SEQ).long()])
        mask = later.unsqueeze(0) | (doc.unsqueeze(2) != doc.unsqueeze(1))
        return tokens, mask.unsqueeze(1), real
    raise ValueError(case)


def compare(cases=CASES, *, tp: int = 1, num_query_groups: int | None = None, precision: str = "fp32") -> dict:
    """``{case: {"logits": max |unfused - sdpa|, "grads": max over parameters, "grad_scale": max |gradient|,
    "names": same parameter names}}`` for each case of :func:`batch`, in one parallel world (set up and torn down
    here); ``precision`` as ``train.precision`` (bf16: megatron's ``Float16Module``, logits compared in float32)."""
    device = torch.device("cpu")
    preset = resolve_preset(ModelConfig(preset="llama-test", num_query_groups=num_query_groups))
    with cpu_backend.cpu_backend(enabled=True):
        layout = parallel.setup(ParallelConfig(tensor_model_parallel_size=tp), device, micro_batch_size=1,
                                global_batch_size=1, num_layers=preset.num_layers,
                                num_attention_heads=preset.num_attention_heads,
                                num_query_groups=preset.num_query_groups, seed=0)
        try:
            models = {b: build_model(preset, layout, vocab_size=padded_vocab_size(VOCAB, tp), seq_length=SEQ,
                                     device=device, precision=precision, attention_backend=b)
                      for b in ("unfused", "sdpa")}
            names = list(models["unfused"].state_dict()) == list(models["sdpa"].state_dict())
            models["sdpa"].load_state_dict(models["unfused"].state_dict())
            return {case: {**_differences(models, case), "names": names} for case in cases}
        finally:
            parallel.teardown()


def _differences(models: dict, case: str) -> dict:
    tokens, mask, real = batch(case)
    pos = torch.arange(SEQ).expand(BATCH, -1)
    labels = torch.roll(tokens, -1, dims=1)
    logits, grads = {}, {}
    for name, model in models.items():
        model.train()
        model.zero_grad(set_to_none=True)
        logits[name] = model(input_ids=tokens, position_ids=pos, attention_mask=mask).detach()[real].float()
        loss = model(input_ids=tokens, position_ids=pos, attention_mask=mask, labels=labels)[real].mean()
        loss.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
    return {"logits": (logits["unfused"] - logits["sdpa"]).abs().max().item(),
            "grads": max((grads["unfused"][n] - grads["sdpa"][n]).float().abs().max().item() for n in grads["unfused"]),
            "grad_scale": max(g.float().abs().max().item() for g in grads["unfused"].values())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--num-query-groups", type=int, default=None)
    args = p.parse_args()
    results = compare(tp=args.tp, num_query_groups=args.num_query_groups)
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
