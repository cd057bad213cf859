"""The trainer's overhead on CPU: ``ipt``'s megatron-core training step vs a plain PyTorch loop, same model shape.

- ``megatron-ipt``: :func:`megatron_ipt.training.train.train_stage` (megatron-core GPTModel with the local layer spec,
  megatron's DDP wrapper, optimizer, scheduler and pipeline schedule, blended dataset, logging), world size 1.
- ``plain PyTorch``: the loop a user would otherwise write: transformers' ``LlamaForCausalLM`` of the same
  shape (layers, hidden, heads, query groups, SwiGLU size, vocabulary), ``torch.optim.AdamW``, gradient
  clipping, the same micro/global batch (gradient accumulation), sequence length and tokens.

Both run in fresh processes with the same thread count, alternating (ours, plain, ours, plain, ...) for
``--rounds`` rounds so that a change of machine load hits both; each run's steady-state time per iteration is
the median over its iterations after the warm-up ones, and each trainer's number is the median over its rounds.
The ratio plain / ours of iteration time is the framework's overhead factor (above 1: ours is faster). CPU only;
on a GPU the comparison would be dominated by kernels (see gpu_throughput.py).

    python benchmarks/train_overhead.py --preset llama-tiny --iters 30 --rounds 3
    python benchmarks/train_overhead.py --preset llama-tiny --iters 30 --attention-backend unfused   # before SDPA
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))


def run_ours(args) -> dict:
    from train_fixtures import make_tokenized_dir, tiny_config

    from megatron_ipt.training.train import train_stage

    with tempfile.TemporaryDirectory() as d:
        tok = make_tokenized_dir(Path(d) / "tok", train_docs=2000, heldout_docs=4)
        cfg = tiny_config(train_iters=args.iters, eval_iters=1, log_interval=1, save_checkpoint=False,
                          micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size)
        cfg.model.preset, cfg.model.seq_length = args.preset, args.seq_length
        cfg.model.attention_backend = args.attention_backend
        train_stage(cfg, tok, Path(d) / "out", "bench")
        rows = [json.loads(x) for x in (Path(d) / "out" / "metrics.jsonl").read_text().splitlines()]
    times = [r["ms_per_iteration"] for r in rows if "iteration" in r and r["iteration"] > args.warmup]
    return {"ms_per_iteration": statistics.median(times)}


def run_plain(args) -> dict:
    import torch
    import transformers

    from megatron_ipt.config import ModelConfig
    from megatron_ipt.training.presets import padded_vocab_size, resolve_preset
    from train_fixtures import VOCAB

    p = resolve_preset(ModelConfig(preset=args.preset))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=padded_vocab_size(VOCAB, 1), hidden_size=p.hidden_size, intermediate_size=p.ffn_hidden_size,
        num_hidden_layers=p.num_layers, num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_query_groups, max_position_embeddings=max(args.seq_length, 64),
        rms_norm_eps=p.norm_epsilon, tie_word_embeddings=False))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    accumulation = args.global_batch_size // args.micro_batch_size
    gen = torch.Generator().manual_seed(0)
    times = []
    for it in range(args.iters):
        tick = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for _ in range(accumulation):
            tokens = torch.randint(1, VOCAB, (args.micro_batch_size, args.seq_length + 1), generator=gen)
            out = model(input_ids=tokens[:, :-1], labels=tokens[:, 1:].contiguous())
            (out.loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if it >= args.warmup:
            times.append(time.perf_counter() - tick)
    return {"ms_per_iteration": 1000 * statistics.median(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-tiny")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="alternating runs of each trainer (median reported)")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "sdpa", "unfused"],
                   help="model.attention_backend of ours (unfused: megatron-core's DotProductAttention)")
    p.add_argument("--json", default=str(HERE / "results" / "train_overhead.json"))
    p.add_argument("--child", choices=["ours", "plain"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(run_ours(args) if args.child == "ours" else run_plain(args)))
        return
    runs: dict[str, list[float]] = {"ours": [], "plain": []}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for _ in range(args.rounds):
        for which in ("ours", "plain"):
            cmd = [sys.executable, __file__, "--child", which] + [a for a in sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            runs[which].append(json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])["ms_per_iteration"])
    results = {k: {"ms_per_iteration": statistics.median(v), "rounds_ms_per_iteration": [round(x, 1) for x in v]} for k, v in runs.items()}
    tokens = args.global_batch_size * args.seq_length
    for r in results.values():
        r["tokens_per_s"] = tokens / (r["ms_per_iteration"] / 1000)
    ratio = results["plain"]["ms_per_iteration"] / results["ours"]["ms_per_iteration"]
    print(f"{args.preset}, seq {args.seq_length}, micro {args.micro_batch_size} / global {args.global_batch_size}, "
          f"attention {args.attention_backend}, {args.threads} thread(s), {args.iters} iterations ({args.warmup} warm-up excluded), "
          f"median of {args.rounds} alternating rounds")
    print(f"{'trainer':<28} {'ms/iteration':>12} {'tokens/s':>10}")
    print(f"{'megatron-ipt (megatron-core)':<28} {results['ours']['ms_per_iteration']:>12.1f} {results['ours']['tokens_per_s']:>10.0f}")
    print(f"{'plain PyTorch + transformers':<28} {results['plain']['ms_per_iteration']:>12.1f} {results['plain']['tokens_per_s']:>10.0f}")
    print(f"plain / ours iteration time: {ratio:.2f}x (rounds, ms: ours {results['ours']['rounds_ms_per_iteration']}, "
          f"plain {results['plain']['rounds_ms_per_iteration']})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k not in ("json", "child")},
                                           **results, "plain_over_ours": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
