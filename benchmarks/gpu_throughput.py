"""Training throughput of Llama-3-8B-shaped layers on one GPU (H100/H200): bf16 vs FP8, tokens/s, TFLOP/s, MFU.

Runs ``ipt``'s own trainer (:func:`megatron_ipt.training.train.train_stage`: megatron-core GPTModel with the Transformer
Engine layer spec, distributed optimizer off, world size 1) on llama3-8b layers (hidden 4096, 32 heads, 8
query groups, SwiGLU 14336) at reduced depth so one GPU holds weights, gradients and Adam states, over
synthetic token data. Each precision runs in a fresh process; the numbers are the trainer's steady-state
summary (first iteration excluded). TFLOP/s and MFU use :func:`megatron_ipt.training.metrics.flops_per_token` and the
device's dense peak (:data:`megatron_ipt.training.metrics.PEAK_TFLOPS`; FP8 MFU against the FP8 peak).

The synthetic vocabulary is tiny (256 after padding), so the output layer's FLOPs are negligible here; the
full model's 128k vocabulary adds about 2 * 4096 * 128256 * 3 FLOPs per token (in the formula when real).

    python benchmarks/gpu_throughput.py                      # 4 layers, seq 8192, bf16 and fp8
    python benchmarks/gpu_throughput.py --layers 8 --precisions bf16 --seq-length 4096

Needs a CUDA GPU and transformer_engine (the gpu extra); exits with status 2 and one line otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

PRECISIONS = ("bf16", "fp8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3-8b", help="layer shape (default llama3-8b)")
    p.add_argument("--layers", type=int, default=4, help="transformer layers (reduced depth; default 4)")
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=8, help="gradient accumulation = global / micro")
    p.add_argument("--iters", type=int, default=12, help="training iterations per precision (first excluded)")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--fp8-recipe", default="tensorwise", choices=["delayed", "tensorwise", "blockwise", "mxfp8"])
    p.add_argument("--transformer-impl", default="transformer_engine", choices=["transformer_engine", "local"],
                   help="layer implementation; local (megatron-core's own modules, no FP8) runs without TE")
    p.add_argument("--json", default=str(HERE / "results" / "gpu_throughput.json"))
    p.add_argument("--child", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.global_batch_size % args.micro_batch_size:
        p.error(f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size {args.micro_batch_size}")
    if args.transformer_impl == "local" and "fp8" in args.precisions:
        p.error("FP8 needs --transformer-impl transformer_engine; with local pass --precisions bf16")
    return args


def build_config(args: argparse.Namespace, precision: str):
    """The experiment config one run trains with: bf16 always, FP8 (hybrid, ``--fp8-recipe``) on top for ``fp8``."""
    from train_fixtures import tiny_config

    cfg = tiny_config(device="cuda", precision="bf16", train_iters=args.iters, eval_iters=1, log_interval=1,
                      save_checkpoint=False, micro_batch_size=args.micro_batch_size,
                      global_batch_size=args.global_batch_size, lr_warmup_iters=1)
    cfg.model.preset, cfg.model.num_layers, cfg.model.seq_length = args.preset, args.layers, args.seq_length
    cfg.model.transformer_impl = args.transformer_impl
    if precision == "fp8":
        cfg.train.fp8, cfg.train.fp8_recipe = "hybrid", args.fp8_recipe
    return cfg


def gpu_problem(transformer_impl: str = "transformer_engine") -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU: this benchmark needs one H100/H200 (see benchmarks/train_overhead.py for CPU)"
    from megatron_ipt.training.model import transformer_engine_available

    if transformer_impl == "transformer_engine" and not transformer_engine_available():
        return "transformer_engine does not import: install the gpu extra (pip install -e '.[train,gpu]')"
    return None


def run_child(args: argparse.Namespace) -> dict:
    from train_fixtures import make_tokenized_dir

    from megatron_ipt.training.train import train_stage

    tokens_needed = args.iters * args.global_batch_size * (args.seq_length + 1)
    with tempfile.TemporaryDirectory() as d:
        tok = make_tokenized_dir(Path(d) / "tok", train_docs=tokens_needed // 70 + 100, heldout_docs=4)
        summary = train_stage(build_config(args, args.child), tok, Path(d) / "out", "bench")
    keep = ("tokens_per_s", "ms_per_iteration", "tflops_per_device", "mfu", "peak_memory_gib", "max_memory_allocated_gib",
            "parameters", "flops_per_token", "final_train_loss")
    return {k: summary[k] for k in keep if k in summary}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_child(args)))
        return 0
    problem = gpu_problem(args.transformer_impl)
    if problem:
        print(f"gpu_throughput: {problem}", file=sys.stderr)
        return 2
    import torch

    device = torch.cuda.get_device_name()
    results = {}
    for precision in args.precisions:
        cmd = [sys.executable, __file__, "--child", precision] + list(argv if argv is not None else sys.argv[1:])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
            results[precision] = {"error": f"exit status {proc.returncode}"}
            continue
        results[precision] = json.loads(lines[-1][7:])
    print(f"{device}: {args.preset} shape ({args.transformer_impl}), {args.layers} layers, seq {args.seq_length}, "
          f"micro {args.micro_batch_size} / global {args.global_batch_size}, {args.iters} iterations (first excluded)")
    print(f"{'precision':<10} {'tokens/s':>10} {'TFLOP/s':>9} {'MFU':>7} {'ms/iter':>9}")
    for precision, r in results.items():
        if "error" in r:
            print(f"{precision:<10} failed: {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        print(f"{precision:<10} {r['tokens_per_s']:>10.0f} {r['tflops_per_device']:>9.1f} {mfu:>7} {r['ms_per_iteration']:>9.1f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "child")}
    Path(args.json).write_text(json.dumps({"device": device, "settings": settings, **results}, indent=2) + "\n")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
