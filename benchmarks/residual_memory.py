"""Peak memory and speed of ``ipt residual`` against the naive approach, on a synthetic multi-GB model.

The naive approach is what a short script does: load the three state dicts completely
(``safetensors.torch.load_file`` per shard, as ``transformers`` would for a sharded checkpoint), compute
``cpt + alpha * (instruct - base)`` per tensor in float32, and ``save_file`` the result shard by shard.
Ours is :func:`megatron_ipt.hf.residual.add_instruction_residual` (row blocks, positioned reads, streaming
writes).

The synthetic model is Llama-shaped (names and shapes of a ``LlamaForCausalLM`` state dict), random bf16,
written in shards whose boundaries differ between base, instruct and CPT. Each approach runs in a fresh
Python process; its peak resident memory is that process's ``ru_maxrss``. Both run with the inputs in the
page cache (the models were just written; the machine has room), so the GB/s compare compute and copies,
not the disk.

    python benchmarks/residual_memory.py --data-dir /tmp/ipt-residual-bench --layers 12   # ~1.5 GB per model
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from megatron_ipt.hf.safetensors_stream import ModelWeights, PlannedTensor, ShardedWriter  # noqa: E402


def llama_shapes(layers: int, hidden: int, ffn: int, vocab: int, kv_heads: int, heads: int) -> list[tuple[str, tuple]]:
    kv = hidden // heads * kv_heads
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)), (p + "self_attn.q_proj.weight", (hidden, hidden)),
                   (p + "self_attn.k_proj.weight", (kv, hidden)), (p + "self_attn.v_proj.weight", (kv, hidden)),
                   (p + "self_attn.o_proj.weight", (hidden, hidden)), (p + "post_attention_layernorm.weight", (hidden,)),
                   (p + "mlp.gate_proj.weight", (ffn, hidden)), (p + "mlp.up_proj.weight", (ffn, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, ffn))]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def write_model(folder: Path, shapes, seed: int, shard_bytes: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    w = ShardedWriter(folder, [PlannedTensor(n, torch.bfloat16, s) for n, s in shapes], shard_bytes)
    for name, shape in shapes:
        w.write(name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16))
    w.close()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "synthetic": True}))


def naive(base: Path, instruct: Path, cpt: Path, out: Path, alpha: float, shard_bytes: int) -> None:
    from safetensors.torch import load_file, save_file

    def load(folder: Path) -> dict:
        sd = {}
        for f in sorted(folder.glob("*.safetensors")):
            sd.update(load_file(f))
        return sd

    b, i, c = load(base), load(instruct), load(cpt)
    res = {k: (c[k].float() + alpha * (i[k].float() - b[k].float())).to(c[k].dtype) for k in c}
    out.mkdir(parents=True)
    shard, size, n = {}, 0, 0
    for k, v in res.items():
        if shard and size + v.nbytes > shard_bytes:
            save_file(shard, out / f"model-{n:05d}.safetensors")
            shard, size, n = {}, 0, n + 1
        shard[k] = v
        size += v.nbytes
    save_file(shard, out / f"model-{n:05d}.safetensors")


def child(args) -> None:
    d = Path(args.data_dir)
    out = d / f"out-{args.child}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    if args.child == "naive":
        naive(d / "base", d / "instruct", d / "cpt", out, 1.0, args.shard_mb * 2**20)
    else:
        from megatron_ipt.hf.residual import add_instruction_residual

        add_instruction_residual(d / "base", d / "instruct", d / "cpt", out, 1.0, max_shard_bytes=args.shard_mb * 2**20)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="/tmp/ipt-residual-bench")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-mb", type=int, default=500, help="output shard size")
    p.add_argument("--keep", action="store_true", help="keep the synthetic models and outputs")
    p.add_argument("--json", default=str(HERE / "results" / "residual_memory.json"))
    p.add_argument("--child", choices=["ours", "naive"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    d = Path(args.data_dir)
    shapes = llama_shapes(args.layers, args.hidden, args.ffn, args.vocab, kv_heads=8, heads=16)
    for name, seed, shard in (("base", 0, 400), ("instruct", 1, 470), ("cpt", 2, 530)):
        if not (d / name / "config.json").is_file():
            write_model(d / name, shapes, seed, shard * 2**20)
    model_bytes = ModelWeights(d / "base").total_bytes()
    rows = {}
    for which in ("ours", "naive"):
        cmd = [sys.executable, __file__, "--child", which, "--data-dir", str(d), "--shard-mb", str(args.shard_mb)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        r["gb_per_s"] = 3 * model_bytes / 1e9 / r["seconds"]
        rows[which] = r
    same = _same_tensors(d / "out-ours", d / "out-naive")
    result = {"model_gb": model_bytes / 1e9, "tensors": len(shapes), "ours": rows["ours"], "naive": rows["naive"],
              "memory_ratio": rows["naive"]["peak_rss_mb"] / rows["ours"]["peak_rss_mb"],
              "speed_ratio": rows["ours"]["gb_per_s"] / rows["naive"]["gb_per_s"], "identical_output": same}
    print(f"synthetic Llama-shaped bf16 model: {model_bytes / 1e9:.2f} GB x 3 inputs, {len(shapes)} tensors")
    print(f"{'approach':<8} {'seconds':>8} {'GB/s read':>10} {'peak RSS MB':>12}")
    for which in ("ours", "naive"):
        r = rows[which]
        print(f"{which:<8} {r['seconds']:>8.1f} {r['gb_per_s']:>10.2f} {r['peak_rss_mb']:>12,.0f}")
    print(f"peak memory: naive / ours = {result['memory_ratio']:.1f}x; speed ours / naive = {result['speed_ratio']:.2f}x; "
          f"identical outputs: {same}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(d)


def _same_tensors(ours: Path, naive: Path) -> bool:
    """Every tensor of our output equals the naive output's (read one at a time)."""
    from safetensors import safe_open

    w = ModelWeights(ours)
    seen = 0
    for f in sorted(naive.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                if not torch.equal(st.get_tensor(name), w.read_rows(name)):
                    return False
                seen += 1
    return seen == len(w.names())


if __name__ == "__main__":
    main()
