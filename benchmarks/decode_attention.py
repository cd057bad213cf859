"""One decoding step's attention on CPU in bfloat16, at the quickstart synthesizer's shapes.

SmolLM2-135M-Instruct has 9 query heads over 3 key-value heads of 64 dimensions. A synthesis batch of ``--batch``
rows decodes one token per row against a static cache of ``--cache`` positions, of which the last ``--empty`` are
not yet written and ``--pad`` are left padding in every other row (masked out). Variants, same inputs, through
transformers' ``sdpa`` attention function (for one query it packs the query heads of a key head into one SDPA
call, ``pack_gqa``):

- ``upcast + sdpa float32``: query, keys and values upcast to float32 first (the engine's decoding steps in
  bfloat16 on CPU before 2026-12-06, session 10; its prompts' forward still runs so);
- ``sdpa bfloat16``: on the bfloat16 tensors as they are (the engine's decoding steps now).

Reported: median microseconds per call over ``--repeats`` rounds (after a warm-up; the variants alternate), the
speed-up over the upcast path, and the largest absolute difference from float32 SDPA on the same bfloat16 inputs.
Writes benchmarks/results/decode_attention.json.

    OMP_NUM_THREADS=2 python benchmarks/decode_attention.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from data_prep import atomic  # noqa: E402


def inputs(batch: int, cache: int, empty: int, pad: int, heads: int = 9, kv_heads: int = 3, dim: int = 64):
    """``(query, key, value, mask)``: bfloat16 ``[b, heads, 1, d]`` and ``[b, kv_heads, cache, d]``, boolean mask
    ``[b, 1, 1, cache]`` (True = attend)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, 1, dim, generator=g).bfloat16()
    k, v = (torch.randn(batch, kv_heads, cache, dim, generator=g).bfloat16() for _ in range(2))
    mask = torch.ones(batch, 1, 1, cache, dtype=torch.bool)
    mask[1::2, ..., :pad] = False
    mask[..., cache - empty:] = False
    return q, k, v, mask


def variants(q, k, v, mask) -> dict:
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    scale = q.shape[-1] ** -0.5
    layer = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], is_causal=True)  # what it reads
    return {
        "upcast + sdpa float32": lambda: sdpa_attention_forward(
            layer, q.float(), k.float(), v.float(), mask, scaling=scale)[0].bfloat16(),
        "sdpa bfloat16": lambda: sdpa_attention_forward(layer, q, k, v, mask, scaling=scale)[0],
    }


def median_us(fns: dict, repeats: int) -> dict[str, float]:
    """Median microseconds per call of each function, the functions called in turn (one call each per round, so
    that a slower stretch of a shared machine touches them alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] * 1e6 for name, t in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=24, help="rows decoding together (the quickstart's synthesis batch)")
    p.add_argument("--cache", type=int, default=850, help="static cache positions (prompt ~750 + 96 new tokens)")
    p.add_argument("--empty", type=int, default=96, help="cache positions not yet written (masked)")
    p.add_argument("--pad", type=int, default=120, help="left padding of every other row (masked)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", default=str(HERE / "results" / "decode_attention.json"))
    args = p.parse_args(argv)
    q, k, v, mask = inputs(args.batch, args.cache, args.empty, args.pad)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True,
                                         scale=q.shape[-1] ** -0.5).transpose(1, 2)
    fns = variants(q, k, v, mask)
    us = median_us(fns, args.repeats)
    rows = [{"variant": name, "us_per_call": us[name],
             "max_abs_diff_vs_float32": (fn().float() - ref).abs().max().item()} for name, fn in fns.items()]
    base = next(r["us_per_call"] for r in rows if r["variant"] == "upcast + sdpa float32")
    print(f"threads {torch.get_num_threads()}, batch {args.batch}, cache {args.cache}, torch {torch.__version__}")
    print(f"{'variant':<24}{'us/call':>10}{'speed-up':>10}{'max |diff|':>12}")
    for r in rows:
        r["speedup_vs_upcast"] = base / r["us_per_call"]
        print(f"{r['variant']:<24}{r['us_per_call']:>10.0f}{r['speedup_vs_upcast']:>9.2f}x"
              f"{r['max_abs_diff_vs_float32']:>12.5f}")
    atomic.write_json(args.out, {"settings": vars(args) | {"threads": torch.get_num_threads(),
                                                          "torch": torch.__version__}, "rows": rows}, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
