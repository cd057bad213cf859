"""``ipt eval`` reading comprehension at batch 1 against batched (``--batch-size``), on CPU, same model and task.

What ``ipt eval --task rc [--generate]`` runs on a megatron checkpoint (:func:`megatron_ipt.evaluate.run.evaluate_rc`
through :class:`megatron_ipt.evaluate.scorers.MegatronScorer`, megatron-core's KV cache for generation), timed in
two parts for each batch size in ``--batch-sizes``:

- ``scoring``: every example's reference answer and, for multiple-choice examples, each option, scored by mean
  NLL (``logits_batch``: right-padded rows, one forward per batch);
- ``generation``: greedy free-form answers of ``--max-new-tokens`` tokens at most (``generate_batch``: the
  prompts left-padded into one KV cache, padding keys masked), stopped at the end-of-text token.

The model: SmolLM2-135M-Instruct converted with ``ipt convert hf-to-megatron`` (the folders
``benchmarks/generate_throughput.py`` uses: ``$IPT_CACHE_DIR/models/smollm2-135m-instruct`` and its
``-megatron`` checkpoint next to it, converted there when missing), float32, its own tokenizer. The task: the
first ``--docs`` Python topic documents of ``pydoc_data.topics`` (over 500 characters, cut to 1,200), each
with the question "Which Python topic does this text document?", the topic's name as the answer and four
options (the answer and three other names, seeded); ``--shots`` demonstrations. Every prompt is cut to
``--max-length`` tokens (default 256, the quickstart's ``model.seq_length``) as ``ipt eval`` cuts it.

Reported per batch size: wall seconds and the process's CPU seconds of each part, sequences (or new tokens) per
second, and whether the metrics equal batch 1's (answer NLL within 1e-5 relative, accuracy and every generated
answer exactly). Writes ``benchmarks/results/eval_batching.json``.

    OMP_NUM_THREADS=2 python benchmarks/eval_batching.py                    # about 4 minutes on 2 cores
    OMP_NUM_THREADS=2 python benchmarks/eval_batching.py --tiny --json /tmp/e.json   # random llama-tiny sizes
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from generate_throughput import _environment, _uptime, bench_model, smollm2_paths, timed, write_result  # noqa: E402


def topic_docs(n: int, seed: int) -> list[dict]:
    """``n`` held-out records in ``ipt eval``'s shape: a Python topic's documentation, one four-option pair."""
    from pydoc_data.topics import topics

    names = sorted(k for k, t in topics.items() if len(t) > 500)
    rng = random.Random(seed)
    docs = []
    for name in names[:n]:
        options = [name, *rng.sample([m for m in names if m != name], 3)]
        rng.shuffle(options)
        docs.append({"id": name, "text": topics[name].strip()[:1200],
                     "pairs": [{"question": "Which Python topic does this text document?", "answer": name,
                                "options": options}]})
    return docs


def run(args) -> dict:
    from data_prep.encoders import load_encoder
    from megatron_ipt.training import mcore
    from megatron_ipt.config import ExperimentConfig
    from megatron_ipt.evaluate import rc
    from megatron_ipt.evaluate.run import evaluate_rc, free_form_answers
    from megatron_ipt.evaluate.scorers import MegatronScorer

    load_before = _uptime()
    tmp, hf, ckpt, model_name = bench_model(args, "ipt-eval-batching-")
    encoder = load_encoder(smollm2_paths(args)[0] if args.tiny else hf)  # the random model has SmolLM2's vocabulary
    docs = topic_docs(args.docs, args.seed)
    examples = rc.build_examples(docs, args.shots)

    cfg = ExperimentConfig()
    cfg.model.hf_config = str(hf)
    cfg.model.seq_length = args.max_length
    cfg.train.device, cfg.train.precision = "cpu", "fp32"
    rows, first = [], {}
    with MegatronScorer(cfg, encoder.vocab_size, ckpt) as scorer:
        params = sum(p.numel() for p in scorer.model.parameters())
        scorer.logits_batch([[1, 2, 3]] * 2)  # warm-up
        for size in args.batch_sizes:
            scored, s_wall, s_cpu = timed(lambda: evaluate_rc(scorer, encoder, docs, args.shots, args.max_length,
                                                              batch_size=size), 1)
            gens, g_wall, g_cpu = timed(lambda: free_form_answers(scorer, encoder, examples, args.max_length,
                                                                  args.max_new_tokens, size), 1)
            sequences = scored["n"] + sum(len(ex.options) for ex in examples if ex.options)
            first.setdefault("scored", scored)
            first.setdefault("gens", gens)
            same_nll = abs(scored["metrics"]["answer_nll"] - first["scored"]["metrics"]["answer_nll"]) <= \
                1e-5 * abs(first["scored"]["metrics"]["answer_nll"])
            rows.append({"batch_size": size, "examples": scored["n"], "scored_sequences": sequences,
                         "scoring_s": s_wall, "scoring_cpu_s": s_cpu, "sequences_per_s": sequences / s_wall,
                         "generation_s": g_wall, "generation_cpu_s": g_cpu, "prompts_per_s": len(gens) / g_wall,
                         "answer_nll": scored["metrics"]["answer_nll"],
                         "mc_accuracy": scored["metrics"].get("mc_accuracy"),
                         "same_metrics_as_first": same_nll and scored["metrics"].get("mc_accuracy") ==
                         first["scored"]["metrics"].get("mc_accuracy"),
                         "same_generations_as_first": gens == first["gens"],
                         "batched_cache_fallback": scorer.no_batched_kv_cache})
            print(f"  batch {size}: scoring {sequences} sequences in {s_wall:.1f} s, generation of {len(gens)} "
                  f"answers in {g_wall:.1f} s", flush=True)
    if tmp is not None:
        tmp.cleanup()
    return {"model": model_name, "megatron_checkpoint": None if args.tiny else str(ckpt), "parameters": params,
            "task": {"docs": args.docs, "shots": args.shots, "max_length": args.max_length,
                     "max_new_tokens": args.max_new_tokens, "source": "pydoc_data.topics, seeded options"},
            "dtype": "float32", "rows": rows, "environment": _environment(mcore, load_before)}


def print_table(result: dict) -> None:
    env, t = result["environment"], result["task"]
    print(f"\n{result['model']} ({result['parameters']:,} parameters), float32, {t['docs']} examples, "
          f"{t['shots']}-shot, max_length {t['max_length']}, up to {t['max_new_tokens']} new tokens; "
          f"{env['torch_threads']} torch threads on {env['cpus']} CPUs, megatron-core {env['megatron_core']}\n"
          f"before: {env['uptime_before']}\nafter:  {env['uptime_after']}")
    base = result["rows"][0]
    print("speed-up: batch 1's seconds / this row's (wall; CPU seconds of the process in brackets)")
    print(f"{'batch':>5} {'scoring s':>9} {'CPU s':>6} {'seq/s':>6} {'speed-up':>15} {'generation s':>12} "
          f"{'CPU s':>6} {'prompts/s':>9} {'speed-up':>15} {'same metrics':>12} {'same answers':>12}")
    for r in result["rows"]:
        scoring = f"{base['scoring_s'] / r['scoring_s']:.2f}x ({base['scoring_cpu_s'] / r['scoring_cpu_s']:.2f}x)"
        generation = (f"{base['generation_s'] / r['generation_s']:.2f}x "
                      f"({base['generation_cpu_s'] / r['generation_cpu_s']:.2f}x)")
        print(f"{r['batch_size']:>5} {r['scoring_s']:>9.1f} {r['scoring_cpu_s']:>6.1f} {r['sequences_per_s']:>6.2f} "
              f"{scoring:>15} {r['generation_s']:>12.1f} {r['generation_cpu_s']:>6.1f} {r['prompts_per_s']:>9.2f} "
              f"{generation:>15} {str(r['same_metrics_as_first']):>12} {str(r['same_generations_as_first']):>12}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a random llama with llama-tiny's sizes (SmolLM2's tokenizer)")
    p.add_argument("--hf", help="Hugging Face folder (default: $IPT_CACHE_DIR/models/smollm2-135m-instruct)")
    p.add_argument("--megatron-ckpt", help="its converted checkpoint (default: next to it + '-megatron')")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(HERE / "results" / "eval_batching.json"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args)
    print_table(result)
    print(f"wrote {write_result(result, args.json)}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
