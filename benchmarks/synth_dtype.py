"""Synthesis on CPU: the transformers engine's defaults (``synthesis.dtype: auto``, static KV cache) against plain
transformers ``generate`` in float32, the way the engine ran before and a user would write it.

Three variants, each in a fresh process, on the same prompts (the ``fewshot`` synthesizer prompt for the first
``--docs`` Python topic documents, ``pydoc_data.topics``, cut to ``--context`` tokens; SmolLM2-135M-Instruct;
greedy; batches of ``--batch-size`` prompts, longest first, left padding):

- ``generate float32``: ``AutoModelForCausalLM.generate`` with float32 weights and transformers' default
  (dynamic) cache;
- ``engine float32``: ``data_prep.engines.TransformersEngine(dtype="float32")``: the static cache on CPU;
- ``engine auto``: ``TransformersEngine()``, the default: bfloat16 where the CPU has native bfloat16 (with
  attention computed in float32), else float32; the static cache.

Reported: generated tokens, wall seconds of generation (model load excluded), generated tokens/s, CPU seconds per
generated token (user + system time of the process), the speed-up over ``generate float32`` in wall time, and on
how many prompts the first 8 generated tokens equal ``generate float32``'s. Writes
benchmarks/results/synth_dtype.json.

    OMP_NUM_THREADS=2 python benchmarks/synth_dtype.py --docs 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from synth_engines import _cpu_seconds, matching_prefix, prompts_for  # noqa: E402

from data_prep import atomic  # noqa: E402

VARIANTS = ("generate float32", "engine float32", "engine auto")


def load_plain(path) -> tuple[object, object]:
    """The tokenizer (left padding) and float32 model a user of transformers ``generate`` loads."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return tok, model


def worker(args) -> dict:
    import torch

    from data_prep.engines import TransformersEngine
    from data_prep.models import resolve_model

    path = resolve_model("smollm2-135m-instruct")
    if args.worker == "generate float32":
        tok, model = load_plain(path)
    else:
        engine = TransformersEngine(path, device="cpu", dtype="float32" if args.worker == "engine float32" else "auto")
        tok = engine.tokenizer
    prompts = prompts_for(args.docs, args.context, tok)
    order = sorted(range(len(prompts)), key=lambda i: -len(tok(prompts[i])["input_ids"]))
    ids: list[list[int]] = [[] for _ in prompts]
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    if args.worker == "generate float32":
        for start in range(0, len(order), args.batch_size):
            idx = order[start:start + args.batch_size]
            batch = tok([prompts[i] for i in idx], return_tensors="pt", padding=True)
            with torch.inference_mode():
                out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id or tok.eos_token_id)
            for i, row in zip(idx, out[:, batch["input_ids"].shape[1]:].tolist()):
                ids[i] = [t for t in row if t not in (tok.pad_token_id, tok.eos_token_id)]
    else:
        results = engine.generate(prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        ids = [tok(r.text, add_special_tokens=False)["input_ids"] for r in results]
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    tokens = sum(len(x) for x in ids)
    return {"variant": args.worker, "dtype": "float32" if args.worker == "generate float32" else engine.dtype,
            "prompts": len(prompts), "generated_tokens": tokens, "wall_s": wall, "cpu_s": cpu,
            "tokens_per_s": tokens / wall, "cpu_s_per_token": cpu / max(tokens, 1), "output_ids": ids}


def run_worker(variant: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--docs", str(args.docs), "--context",
           str(args.context), "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--docs", type=int, default=16, help="pydoc topics (prompts) per variant")
    p.add_argument("--context", type=int, default=384, help="document tokens per prompt (the quickstart's)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="the quickstart's")
    p.add_argument("--batch-size", type=int, default=8, help="the quickstart's")
    p.add_argument("--out", default=str(HERE / "results" / "synth_dtype.json"))
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    rows = {v: run_worker(v, args) for v in VARIANTS}
    base = rows["generate float32"]
    print(f"{'variant':<18}{'dtype':>10}{'tokens':>8}{'wall s':>9}{'tokens/s':>10}{'CPU s/token':>13}{'speed-up':>10}{'same first 8':>14}")
    for v, r in rows.items():
        r["speedup_wall"] = base["wall_s"] / r["wall_s"]
        r["prompts_first_8_tokens_equal"] = sum(matching_prefix(a, b) >= 8 for a, b in zip(r["output_ids"], base["output_ids"]))
        print(f"{v:<18}{r['dtype']:>10}{r['generated_tokens']:>8}{r['wall_s']:>9.1f}{r['tokens_per_s']:>10.1f}"
              f"{r['cpu_s_per_token']:>13.4f}{r['speedup_wall']:>9.2f}x{r['prompts_first_8_tokens_equal']:>9}/{r['prompts']}")
    summary = {"settings": {k: getattr(args, k) for k in ("docs", "context", "max_new_tokens", "batch_size")},
               "threads": os.environ.get("OMP_NUM_THREADS"),
               "variants": {v: {k: x for k, x in r.items() if k != "output_ids"} for v, r in rows.items()}}
    atomic.write_json(args.out, summary, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
