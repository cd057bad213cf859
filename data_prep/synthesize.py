"""Synthesis driver: documents in, instruction-response pairs per document out (paper section 2.1).

One round, zero-shot per document (the reference's multi-round chaining is not done here): build a
prompt per document (``prompts``), generate greedily (``engines``), parse and filter the output
(``parse``), and write one JSONL line per input document, in input order::

    {"id", "split", "text", "pairs": [{"question", "answer"}, ...], "raw_output", "dropped": {reason: n}}

``text`` is the full document even when the prompt showed only its first ``max_context_tokens`` tokens;
``raw_output`` is what the parser saw: the prompt's prefill (``<QUE>`` for the fewshot format) plus the
generated text.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from data_prep.engines import TransformersEngine
from data_prep.errors import DataPrepError
from data_prep.models import resolve_model
from data_prep.parse import CON, CON_CLOSE, filter_grounded, filter_repetitive, parse_pairs, structure_counts
from data_prep.prompts import CHAT_INSTRUCTION, build_prompt

REQUIRED_FIELDS = ("id", "split", "text")


def make_engine(cfg, model_path: Path) -> TransformersEngine:
    """The engine named by ``cfg.engine`` for ``model_path``. Raises DataPrepError for an unknown engine
    or a vLLM engine that is not installed."""
    sampling = {"temperature": getattr(cfg, "temperature", 0.0), "top_p": getattr(cfg, "top_p", 1.0)}
    if cfg.engine == "transformers":
        return TransformersEngine(model_path, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, **sampling)
    if cfg.engine == "vllm":
        from data_prep.engines import VllmEngine

        return VllmEngine(
            model_path,
            dtype=cfg.dtype,
            seed=cfg.seed,
            tensor_parallel_size=cfg.tensor_parallel_size,
            max_model_len=cfg.max_model_len,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            **sampling,
        )
    raise DataPrepError(f"synthesis.engine {cfg.engine!r} is not available here (known: transformers, vllm)")


def synthesize_documents(
    cfg,
    documents: list[dict],
    out_path: Path,
    progress: bool = True,
    engine: TransformersEngine | None = None,
) -> dict:
    """Synthesize pairs for ``documents`` with the settings of ``cfg`` (a ``SynthesisConfig``) into ``out_path``.

    ``documents``: dicts ``{"id": str, "split": "train"|"heldout", "text": str}``. ``engine``: an already
    loaded engine to reuse (default: built from ``cfg.model``/``cfg.engine``). Generation runs in batches
    of ``cfg.batch_size`` prompts, longest first, with a rich progress bar when ``progress``. In lenient
    mode generation also stops at ``<CON>``/``</CON>`` (the parser ignores everything after them anyway).
    ``out_path`` is written through a temp file and ``os.replace``, so it is complete or absent.

    Returns counts: documents, documents_with_pairs, pairs_kept, pairs_dropped {reason: n},
    generated_tokens, generation_seconds, generated_tokens_per_second, model (resolved path),
    prompt_format, parse_mode. Raises DataPrepError for an empty list or a document missing a field.
    """
    if not documents:
        raise DataPrepError("no documents to synthesize")
    for i, doc in enumerate(documents):
        missing = [f for f in REQUIRED_FIELDS if f not in doc]
        if missing:
            raise DataPrepError(f"document {i} (id {doc.get('id', '?')!r}) has no field(s) {', '.join(missing)}")
    model_path = resolve_model(cfg.model)
    engine = engine or make_engine(cfg, model_path)
    instruction = getattr(cfg, "chat_instruction", None) or CHAT_INSTRUCTION
    prompts = [build_prompt(d["text"], cfg.prompt_format, engine.tokenizer, cfg.max_context_tokens, instruction)
               for d in documents]
    add_special = prompts[0].add_special_tokens
    stop = [CON, CON_CLOSE] if cfg.parse_mode == "lenient" else None
    lengths = [len(ids) for ids in engine.tokenizer([p.text for p in prompts], add_special_tokens=add_special)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])

    outputs: list = [None] * len(prompts)
    generated_tokens, seconds = 0, 0.0
    with _progress_bar(progress, len(prompts)) as (bar, task):
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            t0 = time.perf_counter()
            results = engine.generate(
                [prompts[i].text for i in idx], cfg.max_new_tokens, cfg.batch_size, add_special, stop=stop
            )
            seconds += time.perf_counter() - t0
            for i, r in zip(idx, results):
                outputs[i] = r
                generated_tokens += r.num_generated_tokens
            if bar is not None:
                bar.update(task, advance=len(idx), tok_s=generated_tokens / max(seconds, 1e-9),
                           doc_s=(start + len(idx)) / max(seconds, 1e-9))

    pairs_dropped: Counter[str] = Counter()
    structure: Counter[str] = Counter()
    documents_with_pairs = pairs_kept = 0
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for doc, prompt, result in zip(documents, prompts, outputs):
                raw = prompt.prefill + result.text
                parsed = filter_grounded(parse_pairs(raw, cfg.parse_mode), doc["text"], cfg.min_grounding)
                parsed = filter_repetitive(parsed, cfg.max_repetition)
                pairs_dropped.update(parsed.dropped)
                structure.update(structure_counts(parsed.pairs))
                pairs_kept += len(parsed.pairs)
                documents_with_pairs += bool(parsed.pairs)
                record = {
                    "id": doc["id"],
                    "split": doc["split"],
                    "text": doc["text"],
                    "pairs": [p.to_dict() for p in parsed.pairs],
                    "raw_output": raw,
                    "dropped": dict(parsed.dropped),
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {
        "documents": len(documents),
        "documents_with_pairs": documents_with_pairs,
        "pairs_kept": pairs_kept,
        "pairs_dropped": dict(sorted(pairs_dropped.items())),
        "pair_structure": dict(sorted(structure.items())),  # plain / options / cot / options_cot, issue:<reason>
        "generated_tokens": generated_tokens,
        "generation_seconds": round(seconds, 3),
        "generated_tokens_per_second": round(generated_tokens / seconds, 2) if seconds > 0 else 0.0,
        "model": str(model_path),
        "prompt_format": cfg.prompt_format,
        "parse_mode": cfg.parse_mode,
    }


@contextmanager
def _progress_bar(enabled: bool, total: int):
    """Yield (rich Progress, task id): documents bar, documents/s, generated tokens/s, elapsed and ETA; or (None, None)."""
    if not enabled:
        yield None, None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    with Progress(
        TextColumn("synthesize"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("documents  {task.fields[doc_s]:.2f} documents/s"),
        TextColumn("{task.fields[tok_s]:.1f} generated tokens/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ) as bar:
        yield bar, bar.add_task("synthesize", total=total, tok_s=0.0, doc_s=0.0)
