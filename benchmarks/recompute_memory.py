"""Peak memory of a training step with and without activation recompute, on CPU, each setting in a fresh process.

A model whose activations dominate (8 layers, hidden 64, 4 heads, sequence 1024, micro-batch 4, a 250-token
vocabulary: about 0.3M parameters, and per layer 3 attention-score tensors of 4 x 4 x 1024 x 1024 floats) trains
for ``--iters`` iterations through :func:`megatron_ipt.training.train.train_stage`; around every ``train_step`` the
process's peak resident memory is reset (``/proc/self/clear_refs`` 5) and read back (``VmHWM``), so the number is
the step's own peak, not the model setup's or the evaluation's. Reported: the largest step peak, and its growth
over the resident memory just before the step (what the step's activations and gradients added).

    python benchmarks/recompute_memory.py [--iters 2] [--json out.json]

Linux only (``/proc``). On a GPU the same comparison is ``torch.cuda.max_memory_allocated``; megatron's
``ipt plan`` estimates it (docs/training.md).
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

SETTINGS = {
    "none": {},
    "selective": {"recompute": "selective"},  # core attention (megatron-core's default module)
    "full": {"recompute": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}
SHAPE = dict(num_layers=8, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2)
SEQ, MICRO_BATCH = 1024, 4


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _child(setting: str, iters: int, seq: int, layers: int) -> dict:
    """In the fresh process: train ``iters`` iterations with ``setting``; return the step peaks in MB."""
    from train_fixtures import make_tokenized_dir, tiny_config

    from megatron_ipt.training import train as train_module

    peaks, growth = [], []
    inner = train_module.train_step

    def measured_step(*args, **kwargs):
        before = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set size (VmHWM) to the current
        out = inner(*args, **kwargs)
        peak = _status_kb("VmHWM")
        peaks.append(peak / 1024)
        growth.append((peak - before) / 1024)
        return out

    train_module.train_step = measured_step
    with tempfile.TemporaryDirectory() as d:
        tok = make_tokenized_dir(Path(d) / "tok", train_docs=200, heldout_docs=4)
        cfg = tiny_config(train_iters=iters, eval_iters=1, save_checkpoint=False, micro_batch_size=MICRO_BATCH,
                          global_batch_size=MICRO_BATCH, **SETTINGS[setting],
                          **{f"model__{k}": v for k, v in {**SHAPE, "num_layers": layers}.items()})
        cfg.model.seq_length = seq
        summary = train_module.train_stage(cfg, tok, Path(d) / "out", "memory")
    return {"setting": setting, "step_peak_mb": max(peaks), "step_growth_mb": max(growth),
            "final_train_loss": summary["final_train_loss"], "parameters": summary["parameters"]}


def measure(setting: str, iters: int = 2, *, seq: int = SEQ, layers: int = SHAPE["num_layers"]) -> dict:
    """Run :func:`_child` for ``setting`` in a fresh interpreter (sequence ``seq``, ``layers`` layers); returns its
    numbers: ``step_peak_mb``, ``step_growth_mb`` (MB), ``final_train_loss``, ``parameters``."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = subprocess.run([sys.executable, "-W", "ignore", __file__, "--child", setting, "--iters", str(iters),
                          "--seq", str(seq), "--layers", str(layers)],
                         capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{setting}: exit {out.returncode}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--seq", type=int, default=SEQ, help="sequence length")
    p.add_argument("--layers", type=int, default=SHAPE["num_layers"])
    p.add_argument("--child", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.iters, args.seq, args.layers)), flush=True)
        return
    results = [measure(s, args.iters, seq=args.seq, layers=args.layers) for s in SETTINGS]
    print(f"{'recompute':10} {'step peak MB':>13} {'step growth MB':>15} {'loss':>8}")
    for r in results:
        print(f"{r['setting']:10} {r['step_peak_mb']:13.0f} {r['step_growth_mb']:15.0f} {r['final_train_loss']:8.4f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
