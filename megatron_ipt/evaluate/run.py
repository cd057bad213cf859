"""Run an evaluation: tokenise examples, score them with a model, write a results file (JSON + Markdown)."""

from __future__ import annotations

import json
import time
from pathlib import Path

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
                max_new_tokens: int | None = None) -> dict:
    """Mean answer NLL (nats/token, averaged over examples) and, where pairs have options, the accuracy of
    choosing the reference option by lowest mean NLL. With ``max_new_tokens``, also free-form answers: greedy
    generation after the prompt (at most that many tokens, up to the end of the first line), scored against the
    reference by ``exact_match`` and token ``f1`` (SQuAD normalisation), averaged over examples.
    Returns ``{"metrics", "n", "n_multiple_choice", "truncated"}`` (plus ``"generations"`` when generating)."""
    if max_new_tokens and max_new_tokens >= max_length // 2:
        raise rc.EvalDataError(f"max new tokens {max_new_tokens} must be under half of max_length {max_length}")
    examples = rc.build_examples(docs, shots)
    if not examples:
        raise rc.EvalDataError("no reading-comprehension example to evaluate (no held-out pair)")
    nlls, correct, mc, truncated, generations = [], 0, 0, 0, []
    for ex in examples:
        ids, start, cut = tokenized_example(encoder, ex, ex.answer, max_length)
        truncated += cut
        lp, n = scoring.answer_logprob(scorer.logits(ids), _tensor(ids), start)
        nlls.append(scoring.mean_nll(lp, n))
        if ex.options and ex.answer in ex.options:
            option_nlls = []
            for opt in ex.options:
                oids, ostart, _ = tokenized_example(encoder, ex, opt, max_length)
                olp, on = scoring.answer_logprob(scorer.logits(oids), _tensor(oids), ostart)
                option_nlls.append(scoring.mean_nll(olp, on))
            correct += ex.options[scoring.choose_option(option_nlls)] == ex.answer
            mc += 1
        if max_new_tokens:
            generations.append(free_form_answer(scorer, encoder, ex, max_length, max_new_tokens))
    metrics = {"answer_nll": sum(nlls) / len(nlls)}
    if mc:
        metrics["mc_accuracy"] = correct / mc
    result = {"metrics": metrics, "n": len(examples), "n_multiple_choice": mc, "truncated": truncated}
    if max_new_tokens:
        metrics["exact_match"] = sum(g["exact_match"] for g in generations) / len(generations)
        metrics["f1"] = sum(g["f1"] for g in generations) / len(generations)
        result["generations"] = generations
    return result


def free_form_answer(scorer, encoder, ex: rc.RCExample, max_length: int, max_new_tokens: int) -> dict:
    """Greedy answer to one example's prompt (document cut so prompt + ``max_new_tokens`` fit ``max_length``),
    scored by exact match and token F1. Returns ``{"doc_id", "prediction", "reference", "exact_match", "f1"}``."""
    from megatron_ipt.evaluate.generate import answer_text, decode

    ids, start, _ = tokenized_example(encoder, ex, "", max_length - max_new_tokens)
    prediction = answer_text(decode(encoder, scorer.generate(ids[:start], max_new_tokens, encoder.eod_id)))
    return {"doc_id": ex.doc_id, "prediction": prediction, "reference": ex.answer,
            "exact_match": scoring.exact_match(prediction, ex.answer), "f1": scoring.token_f1(prediction, ex.answer)}


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    md = path.with_suffix(".md")
    md_tmp = md.with_name(md.name + ".tmp")
    md_tmp.write_text(markdown([record]))
    md_tmp.replace(md)
    return record


def markdown(records: list[dict]) -> str:
    """A side-by-side table: one column per model (records of one model name on different tasks share a column;
    the same model and task twice gets a second column), one row per (task, metric), then the task's number of
    examples."""
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
        for metric, row in [*metrics.items(), ("examples", examples)]:
            lines.append(f"| {task} | {metric} | " + " | ".join(row.get(i, "") for i in range(len(labels))) + " |")
    return "\n".join(lines) + "\n"
