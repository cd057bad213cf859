"""Core attention alone on CPU: megatron-core's unfused ``DotProductAttention`` vs the SDPA one
(``model.attention_backend``, ``megatron_ipt/training/attention.py``), taken from real llama-tiny models.

Times one layer's ``core_attention`` on random ``[s, b, heads or groups, d]`` query/key/value: forward + backward of
causal self-attention over ``--seq-length`` tokens (training), and one KV-cached decode step (1 query against
``--seq-length`` keys, no grad). Reports process CPU milliseconds per call (less sensitive to other load on a
shared machine than wall time) and wall milliseconds; writes ``benchmarks/results/core_attention.json``.

    OMP_NUM_THREADS=1 python benchmarks/core_attention.py            # about 20 s
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main() -> None:
    from megatron_ipt.config import ModelConfig, ParallelConfig
    from megatron_ipt.training import cpu_backend, parallel
    from megatron_ipt.training.model import build_model
    from megatron_ipt.training.presets import resolve_preset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-tiny")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=str(HERE / "results" / "core_attention.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    preset = resolve_preset(ModelConfig(preset=args.preset))
    s, b, d = args.seq_length, args.micro_batch_size, preset.kv_channels
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, b, n, d, generator=gen, requires_grad=True)
               for n in (preset.num_attention_heads, preset.num_query_groups, preset.num_query_groups))
    results = {}
    with cpu_backend.cpu_backend(enabled=True):
        layout = parallel.setup(ParallelConfig(), torch.device("cpu"), micro_batch_size=1, global_batch_size=1,
                                num_layers=preset.num_layers, num_attention_heads=preset.num_attention_heads,
                                num_query_groups=preset.num_query_groups, seed=0)
        try:
            for backend in ("unfused", "sdpa"):
                model = build_model(preset, layout, vocab_size=256, seq_length=s, device=torch.device("cpu"),
                                    attention_backend=backend)
                core = next(m.core_attention for m in model.modules() if hasattr(m, "core_attention"))

                def train_step():
                    core.train()
                    core(q, k, v, None).sum().backward()

                def decode_step():
                    core.eval()
                    with torch.no_grad():
                        core(q[-1:], k, v, None)

                results[backend] = {"forward_backward": timed(train_step, 30), "decode_step": timed(decode_step, 300)}
        finally:
            parallel.teardown()
    print(f"{args.preset}: batch {b}, {preset.num_attention_heads} heads / {preset.num_query_groups} groups, head dim "
          f"{d}, sequence {s}, {args.threads} thread(s); ms per call (CPU / wall)")
    for backend, r in results.items():
        print(f"{backend:<8} forward+backward {r['forward_backward']['cpu_ms']:8.3f} / {r['forward_backward']['wall_ms']:8.3f}"
              f"   decode step {r['decode_step']['cpu_ms']:7.3f} / {r['decode_step']['wall_ms']:7.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "json"},
                                           "torch": torch.__version__, **results}, indent=2) + "\n")


def timed(fn, n: int) -> dict:
    """``{"cpu_ms", "wall_ms"}`` per call over ``n`` calls of ``fn()`` after 3 warm-up calls."""
    for _ in range(3):
        fn()
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        fn()
    return {"cpu_ms": 1000 * (time.process_time() - c0) / n, "wall_ms": 1000 * (time.perf_counter() - t0) / n}


if __name__ == "__main__":
    main()
