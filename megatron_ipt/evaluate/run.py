"""Run an evaluation: tokenise examples, score them with a model, write a results file (JSON + Markdown)."""

from __future__ import annotations

import time
from pathlib import Path

from data_prep import atomic
from megatron_ipt.evaluate import rc, scoring


def tokenized_example(encoder, ex: rc.RCExample, answer: str, max_length: int) -> tuple[list[int], int, bool]:
    """``(ids, answer_start, truncated)``: demonstrations + document + question, then the answer; the document
    tokens are cut from the end when the whole does not fit ``max_length`` tokens. Pieces are tokenized
    separately (deterministic; boundaries may differ from tokenizing the joint string)."""
    doc_mark = ex.prompt.rfind("\n\nQuestion: ")
    head, question = ex.prompt[: doc_mark + 2], ex.prompt[doc_mark + 2 :]
    h, q, a = encoder.encode_batch([head, question, rc.TEMPLATE["answer"].format(answer=answer)])
    room = max_length - len(q) - len(a)
    if room < 1:
        q, a = q[-max(1, max_length // 2):], a[: max(1, max_length // 2)]
        room = max(1, max_length - len(q) - len(a))
    truncated = len(h) > room
    ids = h[:room] + q + a
    return ids, len(ids) - len(a), truncated


def evaluate_rc(scorer, encoder, docs: list[dict], shots: int, max_length: int,
                max_new_tokens: int | None = None, batch_size: int = 8) -> dict:
    """Mean answer NLL (nats/token, averaged over examples) and, where pairs have options, the accuracy of
    choosing the reference option by lowest mean NLL. With ``max_new_tokens``, also free-form answers: greedy
    generation after the prompt (at most that many tokens, up to the end of the first line), scored against the
    reference by ``exact_match`` and token ``f1`` (SQuAD normalisation), averaged over examples. Sequences go
    through the model ``batch_size`` at a time (``scorer.logits_batch`` / ``scorer.generate_batch``, grouped by
    length; the same metrics as one at a time, up to float rounding). Returns ``{"metrics", "n",
    "n_multiple_choice", "truncated"}`` (plus ``"generations"`` when generating). ValueError: ``batch_size`` < 1."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1 (got {batch_size})")
    if max_new_tokens and max_new_tokens >= max_length // 2:
        raise rc.EvalDataError(f"max new tokens {max_new_tokens} must be under half of max_length {max_length}")
    examples = rc.build_examples(docs, shots)
    if not examples:
        raise rc.EvalDataError("no reading-comprehension example to evaluate (no held-out pair)")
    answers = [tokenized_example(encoder, ex, ex.answer, max_length) for ex in examples]
    choices = [ex for ex in examples if ex.options and ex.answer in ex.options]
    options = [tokenized_example(encoder, ex, opt, max_length)[:2] for ex in choices for opt in ex.options]
    scored = answer_nlls(scorer, [(ids, start) for ids, start, _ in answers] + options, batch_size)
    nlls, option_nlls = scored[: len(examples)], iter(scored[len(examples):])
    correct = 0
    for ex in choices:
        per_option = [next(option_nlls) for _ in ex.options]
        correct += ex.options[scoring.choose_option(per_option)] == ex.answer
    metrics = {"answer_nll": sum(nlls) / len(nlls)}
    if choices:
        metrics["mc_accuracy"] = correct / len(choices)
    result = {"metrics": metrics, "n": len(examples), "n_multiple_choice": len(choices),
              "truncated": sum(cut for _, _, cut in answers)}
    if max_new_tokens:
        generations = free_form_answers(scorer, encoder, examples, max_length, max_new_tokens, batch_size)
        metrics["exact_match"] = sum(g["exact_match"] for g in generations) / len(generations)
        metrics["f1"] = sum(g["f1"] for g in generations) / len(generations)
        result["generations"] = generations
    return result


def by_length(sequences: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of ``sequences`` in batches of at most ``batch_size``, longest first, so each batch pads little
    (and a batch too large for memory fails at the start)."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def answer_nlls(scorer, sequences: list[tuple[list[int], int]], batch_size: int) -> list[float]:
    """Mean NLL (nats/token) of the tokens from ``answer_start`` on, for each ``(ids, answer_start)``, in order;
    the model runs ``batch_size`` sequences per forward (``scorer.logits_batch``)."""
    out: list[float] = [0.0] * len(sequences)
    with _progress("eval: scoring", len(sequences), "sequences") as progress:
        for batch in by_length([ids for ids, _ in sequences], batch_size):
            logits = scorer.logits_batch([sequences[i][0] for i in batch])
            for i, row in zip(batch, logits):
                ids, start = sequences[i]
                out[i] = scoring.mean_nll(*scoring.answer_logprob(row, _tensor(ids), start))
            progress.advance(len(batch))
    return out


def _progress(name: str, total: int, unit: str):
    """Progress on stderr (stdout carries the results table): a bar on a terminal, periodic lines otherwise."""
    import sys

    from data_prep.progress import StageProgress

    return StageProgress(name, total, unit, stream=sys.stderr)


def free_form_answers(scorer, encoder, examples: list[rc.RCExample], max_length: int, max_new_tokens: int,
                      batch_size: int = 1) -> list[dict]:
    """Greedy answer to each example's prompt (document cut so prompt + ``max_new_tokens`` fit ``max_length``),
    ``batch_size`` prompts per ``scorer.generate_batch``, scored by exact match and token F1. Returns, in order,
    ``{"doc_id", "prediction", "reference", "exact_match", "f1"}`` per example."""
    from megatron_ipt.evaluate.generate import answer_text, decode

    prompts = []
    for ex in examples:
        ids, start, _ = tokenized_example(encoder, ex, "", max_length - max_new_tokens)
        prompts.append(ids[:start])
    generated: list[list[int]] = [[] for _ in prompts]
    with _progress("eval: generating", len(prompts), "answers") as progress:
        for batch in by_length(prompts, batch_size):
            for i, new in zip(batch, scorer.generate_batch([prompts[i] for i in batch], max_new_tokens, encoder.eod_id)):
                generated[i] = new
            progress.advance(len(batch), generated_tokens=sum(len(generated[i]) for i in batch))
    out = []
    for ex, new in zip(examples, generated):
        prediction = answer_text(decode(encoder, new))
        out.append({"doc_id": ex.doc_id, "prediction": prediction, "reference": ex.answer,
                    "exact_match": scoring.exact_match(prediction, ex.answer),
                    "f1": scoring.token_f1(prediction, ex.answer)})
    return out


def _tensor(ids):
    import torch

    return torch.tensor(ids)


def write_results(path: str | Path, model: dict, task: str, result: dict, settings: dict) -> dict:
    """One results file: JSON (model fingerprint/iteration, task, metrics, n, settings) + a Markdown twin.
    The record is checked against :mod:`megatron_ipt.evaluate.schema` first (ResultsFileError naming ``path``)."""
    from megatron_ipt.evaluate.schema import validate_record

    path = Path(path)
    record = {"model": model, "task": task, **result, "settings": settings,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    validate_record(record, path)
    atomic.write_json(path, record, indent=2)
    atomic.write_text(path.with_suffix(".md"), markdown([record]))
    return record


# What a record's ``n`` counts, per task, for the table's last row (reading comprehension and harness tasks count
# examples; held-out perplexity counts the windows of up to the sequence length that were scored).
COUNT_LABELS = {"heldout_perplexity": "windows scored"}


def markdown(records: list[dict]) -> str:
    """A side-by-side table: one column per model (records of one model name on different tasks share a column;
    the same model and task twice gets a second column), one row per (task, metric), then what the task counted
    (:data:`COUNT_LABELS`: examples, or windows scored for held-out perplexity)."""
    labels: list[str] = []
    taken: list[tuple[str, set]] = []  # per column: model name, tasks in it
    cells: dict[str, dict[str, dict[int, str]]] = {}  # task -> metric ("examples" last) -> column -> text
    for r in records:
        name = r["model"].get("name") or r["model"].get("path", "?")
        j = next((i for i, (n, tasks) in enumerate(taken) if n == name and r["task"] not in tasks), None)
        if j is None:
            same = sum(n == name for n, _ in taken)
            labels.append(f"{name} ({same + 1})" if same else name)
            taken.append((name, set()))
            j = len(taken) - 1
        taken[j][1].add(r["task"])
        task = cells.setdefault(r["task"], {})
        for metric, value in r["metrics"].items():
            task.setdefault(metric, {})[j] = f"{value:.4f}"
        task.setdefault("\0examples", {})[j] = str(r.get("n", ""))
    lines = ["| task | metric | " + " | ".join(labels) + " |", "| --- | --- |" + " --- |" * len(labels)]
    for task, metrics in cells.items():
        examples = metrics.pop("\0examples")
        for metric, row in [*metrics.items(), (COUNT_LABELS.get(task, "examples"), examples)]:
            lines.append(f"| {task} | {metric} | " + " | ".join(row.get(i, "") for i in range(len(labels))) + " |")
    return "\n".join(lines) + "\n"
