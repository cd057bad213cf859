"""Synthesis driver: documents in, instruction-response pairs per document out (paper section 2.1).

Build prompts (``prompts``), generate (``engines``), parse and filter the outputs (``parse``), and write one
JSONL line per input document, in input order::

    {"id", "split", "text", "pairs": [{"question", "answer"}, ...], "raw_output", "dropped": {reason: n}}

``text`` is always the full document; ``raw_output`` is what the parser saw: the prompt's prefill (``<QUE>``
for the fewshot/chat formats) plus the generated text.

Multi-round (M-shot) synthesis, ``rounds`` = M > 1, as the reference does (LMOps ``instruction_pretrain``
README and ``utils/read_compre.py``): the documents of each split (in
input order) are cut into M consecutive slices of ``ceil(n / M)``; round r synthesizes slice r, and the text at
position i of slice r is prompted after the chain that ends with the entry at position i of slice r - 1: that
entry's (text, pairs), preceded by the entries it was itself chained after. The chain is broken, and the text
is prompted zero-shot, when the previous entry kept no pairs or when the chained prompt plus
``max_new_tokens`` would not fit the context (``max_model_len``, default the model's; prompt length measured
with the synthesizer's tokenizer). A record then carries ``round`` (0-based) and ``prev_id``: the previous
entry's id when the text was prompted after it and kept pairs itself (the reference's ``inherit_from_prev``),
else null. ``data_prep.format`` rebuilds the chains from these links. Each round's prompts are generated
together, ``batch_size`` per engine call (:func:`generate_batch_size`: by default the whole round in one vLLM
call, as the reference does, and 8 prompts per call for transformers). With one round records carry neither field (format then groups consecutive documents).
The slices are cut over the documents given, so a sharded run chains within each shard.

Long documents (``chunking``, default on): a document longer than the chunk budget
(``min(max_context_tokens, context - max_new_tokens - prompt overhead)`` tokens) is split at paragraph, then
sentence boundaries (``data_prep.chunking.split_text``) and every chunk is synthesized as a prompt of its own;
the pairs of all chunks belong to the document (a question repeated by a later chunk is dropped as
``duplicate_question``). Such a record also has ``chunks`` (their number), each pair a ``chunk`` index, and
``raw_output`` is a list, one output per chunk. A chunked document is always prompted zero-shot and ends a
chain. With chunking off, documents are truncated to the budget (the reference neither chunks nor truncates).

Resume: given a :class:`data_prep.shards.ShardJournal`, every finished batch is journaled and a rerun skips
the batches already there (same batches, same greedy outputs, so the result equals an uninterrupted run).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data_prep import atomic
from data_prep.chunking import split_text
from data_prep.engines import TransformersEngine
from data_prep.errors import DataPrepError
from data_prep.models import resolve_model
from data_prep.parse import (CON, CON_CLOSE, Pair, ParseResult, drop_shared_answers, filter_grounded,
                             filter_repetitive, parse_pairs, structure_counts)
from data_prep.progress import StageProgress
from data_prep.prompts import CHAT_INSTRUCTION, Prompt, build_prompt, truncate_to_tokens

REQUIRED_FIELDS = ("id", "split", "text")
TRANSFORMERS_BATCH_SIZE = 8  # prompts per generate call for the transformers engine when batch_size is unset


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


def context_length(cfg, model_path: Path, tokenizer) -> int:
    """The synthesizer's context in tokens: ``cfg.max_model_len``, else the model folder's ``config.json``
    (``max_position_embeddings``), else the tokenizer's ``model_max_length``. Raises DataPrepError if none is known."""
    if getattr(cfg, "max_model_len", None):
        return int(cfg.max_model_len)
    config = Path(model_path) / "config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if isinstance(data.get(key), int):
                return data[key]
    n = getattr(tokenizer, "model_max_length", None)
    if isinstance(n, int) and n < 10**7:
        return n
    raise DataPrepError(f"the context length of {model_path} is unknown: set synthesis.max_model_len")


def generate_batch_size(cfg, round_prompts: int) -> int:
    """Prompts per engine call (and per journaled batch) in a round of ``round_prompts`` prompts:
    ``cfg.batch_size`` when set, else the whole round for ``engine: vllm`` (the reference generates a round in
    one ``LLM.generate`` call; vLLM schedules the prompts itself) and :data:`TRANSFORMERS_BATCH_SIZE` for
    transformers. Always at least 1."""
    if cfg.batch_size:
        return int(cfg.batch_size)
    if getattr(cfg, "engine", "transformers") == "vllm":
        return max(1, round_prompts)
    return TRANSFORMERS_BATCH_SIZE


def round_slices(documents: list[dict], rounds: int) -> list[tuple[int, int | None]]:
    """Per document: ``(round, index of the previous round's document at the same position, or None)``.

    The documents of each split, in input order, are cut into ``rounds`` consecutive slices of ``ceil(n / rounds)``
    (the reference's ``BSZ = (N + M - 1) // M``); the text at position i of slice r follows position i of slice r - 1.
    """
    if rounds < 1:
        raise DataPrepError(f"synthesis.rounds must be >= 1, got {rounds}")
    out: list[tuple[int, int | None]] = [(0, None)] * len(documents)
    by_split: dict[str, list[int]] = {}
    for i, doc in enumerate(documents):
        by_split.setdefault(doc["split"], []).append(i)
    for idx in by_split.values():
        size = math.ceil(len(idx) / rounds)
        for pos, d in enumerate(idx):
            r = pos // size
            out[d] = (r, idx[pos - size] if r > 0 else None)
    return out


@dataclass
class _Doc:
    """One document's state during synthesis: its contexts (chunks), prompts, outputs and kept pairs per chunk."""

    contexts: list[str]
    round: int = 0
    previous: int | None = None  # the previous round's document at the same position
    link: int | None = None  # the document this one is chained after (prev_id), when it kept pairs
    prompts: list[Prompt] = field(default_factory=list)
    raws: list[str] = field(default_factory=list)
    pairs: list[list[Pair]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)

    @property
    def kept(self) -> list[Pair]:
        return [p for chunk in self.pairs for p in chunk]


def synthesize_documents(
    cfg,
    documents: list[dict],
    out_path: Path,
    progress: bool = True,
    engine: TransformersEngine | None = None,
    journal=None,
) -> dict:
    """Synthesize pairs for ``documents`` with the settings of ``cfg`` (a ``SynthesisConfig``) into ``out_path``.

    ``documents``: dicts ``{"id": str, "split": "train"|"heldout", "text": str}``. ``engine``: an already
    loaded engine to reuse (default: built from ``cfg.model``/``cfg.engine``). ``journal``: a
    :class:`data_prep.shards.ShardJournal` to resume from and append finished batches to. Rounds, chains and
    chunks: see the module docstring. Generation runs in batches of :func:`generate_batch_size` prompts, longest first,
    with progress reports when ``progress`` (:class:`data_prep.progress.StageProgress`: a rich bar on a terminal,
    periodic lines otherwise; a resumed run first says how many prompts the journal holds). In lenient mode
    generation also stops at ``<CON>``/``</CON>``
    (the parser ignores everything after them anyway). ``out_path`` is written atomically
    (``data_prep.atomic``), so it is complete or absent.

    Returns counts: documents, documents_with_pairs, pairs_kept, pairs_dropped {reason: n}, pair_structure,
    prompts, chunked_documents, rounds, chained_documents, resumed_prompts, generated_tokens, generation_seconds,
    generated_tokens_per_second, model (resolved path), dtype (the engine's compute dtype), prompt_format, parse_mode. Raises DataPrepError for an
    empty list, a document missing a field, or a context too small for ``max_new_tokens``.
    """
    _check_documents(documents)
    model_path = resolve_model(cfg.model)
    engine = engine or make_engine(cfg, model_path)
    plan = _plan_prompts(cfg, model_path, engine.tokenizer)
    docs = _prepare_documents(cfg, documents, plan)
    gen = _Generation(done=journal.load() if journal is not None else {},
                      seconds=journal.seconds if journal is not None else 0.0)  # time spent on the resumed batches
    total = sum(len(d.contexts) for d in docs)
    resumed = _resumed_prompts(documents, docs, gen.done)
    if resumed and progress:
        print(f"synthesize: resuming: {resumed} of {total} prompts already done (journal {journal.path})", flush=True)
    with StageProgress("synthesize", total, "prompts", rates={"generated tokens": 0}, done=resumed,
                       enabled=progress) as bar:
        for r in range(plan.rounds):
            members = [i for i, d in enumerate(docs) if d.round == r]
            _build_round_prompts(cfg, docs, members, plan)
            outputs = _generate_round(cfg, engine, plan, documents, docs, members, gen, journal, bar)
            for i in members:
                texts_out = [outputs[(i, c)]["text"] for c in range(len(docs[i].contexts))]
                _parse_document(cfg, docs[i], documents[i]["text"], texts_out)
    _drop_shared_answers(docs)
    atomic.write_jsonl(out_path, [_record(cfg, doc, d, documents, plan.rounds) for doc, d in zip(documents, docs)])
    return _counts(cfg, documents, docs, plan, gen, model_path, getattr(engine, "dtype", cfg.dtype))


def _check_documents(documents: list[dict]) -> None:
    """Raise DataPrepError for an empty list or a document without one of :data:`REQUIRED_FIELDS`."""
    if not documents:
        raise DataPrepError("no documents to synthesize")
    for i, doc in enumerate(documents):
        missing = [f for f in REQUIRED_FIELDS if f not in doc]
        if missing:
            raise DataPrepError(f"document {i} (id {doc.get('id', '?')!r}) has no field(s) {', '.join(missing)}")


@dataclass
class _PromptPlan:
    """The token budgets prompts are built to: ``budget`` tokens per prompt (the context minus
    ``max_new_tokens``), ``chunk_tokens`` per document text (the budget minus the template's own tokens, at most
    ``max_context_tokens``), the synthesizer's tokenizer and whether prompts take its special tokens."""

    tok: object
    instruction: str
    rounds: int
    budget: int
    chunk_tokens: int
    add_special: bool

    def count(self, texts: list[str], special: bool | None = None) -> list[int]:
        """Token counts of ``texts`` (with the prompts' special tokens unless ``special`` says otherwise)."""
        special = self.add_special if special is None else special
        return [len(ids) for ids in self.tok(texts, add_special_tokens=special)["input_ids"]]


def _plan_prompts(cfg, model_path: Path, tok) -> _PromptPlan:
    """The prompt budgets of ``cfg`` on the synthesizer at ``model_path``. Raises DataPrepError when
    ``max_new_tokens`` leaves fewer than 16 tokens of the context for a document."""
    instruction = getattr(cfg, "chat_instruction", None) or CHAT_INSTRUCTION
    empty = build_prompt("", cfg.prompt_format, tok, 1, instruction)
    plan = _PromptPlan(tok=tok, instruction=instruction, rounds=getattr(cfg, "rounds", 1),
                       budget=context_length(cfg, model_path, tok) - cfg.max_new_tokens,  # tokens a prompt may have
                       chunk_tokens=0, add_special=empty.add_special_tokens)
    plan.chunk_tokens = min(cfg.max_context_tokens, plan.budget - plan.count([empty.text])[0])
    if plan.chunk_tokens < 16:
        raise DataPrepError(f"synthesis.max_new_tokens={cfg.max_new_tokens} leaves {plan.chunk_tokens} tokens of the "
                            f"{plan.budget + cfg.max_new_tokens}-token context for a document: "
                            "lower it or raise synthesis.max_model_len")
    return plan


def _prepare_documents(cfg, documents: list[dict], plan: _PromptPlan) -> list[_Doc]:
    """Each document's contexts (chunks when ``chunking``, else the text cut to the budget) and its round."""
    def one(s: str) -> int:
        return plan.count([s], False)[0]

    docs: list[_Doc] = []
    for doc in documents:
        chunks = split_text(doc["text"], plan.chunk_tokens, one) if getattr(cfg, "chunking", False) else [doc["text"]]
        docs.append(_Doc([truncate_to_tokens(c, plan.tok, plan.chunk_tokens) for c in chunks]))
    for d, (r, previous) in zip(docs, round_slices(documents, plan.rounds)):
        d.round, d.previous = r, previous
    return docs


@dataclass
class _Generation:
    """Generation so far: the journal's finished outputs by (document id, chunk), seconds spent generating
    (including the resumed batches'), tokens generated and prompts finished."""

    done: dict
    seconds: float
    tokens: int = 0
    finished: int = 0


def _generate_round(cfg, engine, plan: _PromptPlan, documents: list[dict], docs: list[_Doc], members: list[int],
                    gen: _Generation, journal, bar) -> dict[tuple[int, int], dict]:
    """Generate every prompt of one round, longest first, in batches of :func:`generate_batch_size`; a batch the
    journal holds is taken from it, a new one is journaled. Returns the outputs by (document index, chunk)."""
    units = [(i, c) for i in members for c in range(len(docs[i].contexts))]
    if not units:
        return {}
    texts = [docs[i].prompts[c].text for i, c in units]
    lengths = plan.count(texts)
    order = sorted(range(len(units)), key=lambda k: -lengths[k])
    stop = [CON, CON_CLOSE] if cfg.parse_mode == "lenient" else None
    outputs: dict[tuple[int, int], dict] = {}
    size = generate_batch_size(cfg, len(order))
    for start in range(0, len(order), size):
        batch = order[start : start + size]
        keys = [(str(documents[units[k][0]]["id"]), units[k][1]) for k in batch]
        fresh = not all(key in gen.done for key in keys)
        if not fresh:
            results = [gen.done[key] for key in keys]
        else:
            t0 = time.perf_counter()
            generated = engine.generate([texts[k] for k in batch], cfg.max_new_tokens, size, plan.add_special, stop=stop)
            elapsed = time.perf_counter() - t0
            gen.seconds += elapsed
            results = [{"id": key[0], "chunk": key[1], "text": g.text, "tokens": g.num_generated_tokens}
                       for key, g in zip(keys, generated)]
            if journal is not None:
                journal.append(results, elapsed)
        for k, res in zip(batch, results):
            outputs[units[k]] = res
            gen.tokens += int(res["tokens"])
        gen.finished += len(batch)
        if fresh:  # resumed batches were counted as done when the progress report started
            bar.advance(len(batch), generated_tokens=sum(int(res["tokens"]) for res in results))
    return outputs


def _resumed_prompts(documents: list[dict], docs: list[_Doc], done: dict) -> int:
    """Prompts (document, chunk) whose output the journal already holds."""
    return sum(1 for d, doc in zip(docs, documents) for c in range(len(d.contexts)) if (str(doc["id"]), c) in done)


def _counts(cfg, documents: list[dict], docs: list[_Doc], plan: _PromptPlan, gen: _Generation, model_path: Path,
            dtype: str) -> dict:
    """The counts :func:`synthesize_documents` returns."""
    pairs_dropped: Counter[str] = Counter()
    structure: Counter[str] = Counter()
    for d in docs:
        pairs_dropped.update(d.dropped)
        structure.update(structure_counts(d.kept))
    return {
        "documents": len(documents),
        "documents_with_pairs": sum(bool(d.kept) for d in docs),
        "pairs_kept": sum(len(d.kept) for d in docs),
        "pairs_dropped": dict(sorted(pairs_dropped.items())),
        "pair_structure": dict(sorted(structure.items())),  # plain / options / cot / options_cot, issue:<reason>
        "prompts": sum(len(d.contexts) for d in docs),
        "chunked_documents": sum(len(d.contexts) > 1 for d in docs),
        "rounds": plan.rounds,
        "chained_documents": sum(d.link is not None for d in docs),
        "resumed_prompts": _resumed_prompts(documents, docs, gen.done),
        "generated_tokens": gen.tokens,
        "generation_seconds": round(gen.seconds, 3),
        "generated_tokens_per_second": round(gen.tokens / gen.seconds, 2) if gen.seconds > 0 else 0.0,
        "model": str(model_path),
        "dtype": dtype,  # the compute dtype used (synthesis.dtype auto resolved: data_prep.engines.resolve_dtype)
        "prompt_format": cfg.prompt_format,
        "parse_mode": cfg.parse_mode,
    }


def _chain(docs: list[_Doc], last: int) -> list[tuple[str, list[Pair]]]:
    """The (text, pairs) entries of the chain ending with document ``last``, oldest first."""
    entries, i = [], last
    while i is not None:
        entries.append((docs[i].contexts[0], docs[i].kept))
        i = docs[i].link
    return entries[::-1]


def _build_round_prompts(cfg, docs: list[_Doc], members: list[int], plan: _PromptPlan) -> None:
    """Set ``prompts`` of this round's documents: chained after the previous round's entry when it kept pairs,
    neither document is chunked, and the chained prompt fits the plan's budget; else zero-shot."""
    fmt, tok, chunk_tokens, instruction = cfg.prompt_format, plan.tok, plan.chunk_tokens, plan.instruction
    candidates = [i for i in members if docs[i].previous is not None and len(docs[i].contexts) == 1
                  and len(docs[docs[i].previous].contexts) == 1 and docs[docs[i].previous].kept]
    chained = {i: build_prompt(docs[i].contexts[0], fmt, tok, chunk_tokens, instruction, _chain(docs, docs[i].previous))
               for i in candidates}
    fits = dict(zip(chained, plan.count([p.text for p in chained.values()]))) if chained else {}
    for i in members:
        d = docs[i]
        if i in chained and fits[i] <= plan.budget:
            d.prompts = [chained[i]]
            d.link = d.previous  # kept only if this document keeps pairs (see _parse_document)
        else:
            d.prompts = [build_prompt(c, fmt, tok, chunk_tokens, instruction) for c in d.contexts]


def _parse_document(cfg, d: _Doc, text: str, outputs: list[str]) -> None:
    """Parse and filter each chunk's output; drop questions an earlier chunk already asked; settle the chain link."""
    seen: set[str] = set()
    for prompt, out in zip(d.prompts, outputs):
        raw = prompt.prefill + out
        parsed = filter_repetitive(filter_grounded(parse_pairs(raw, cfg.parse_mode), text, cfg.min_grounding),
                                   cfg.max_repetition)
        kept = [p for p in parsed.pairs if p.question.lower() not in seen]
        if len(kept) < len(parsed.pairs):
            parsed = ParseResult(kept, parsed.dropped + Counter(duplicate_question=len(parsed.pairs) - len(kept)))
        seen.update(p.question.lower() for p in kept)
        d.raws.append(raw)
        d.pairs.append(kept)
        d.dropped.update(parsed.dropped)
    if not d.kept:
        d.link = None  # the reference's inherit_from_prev: chained only when the text kept pairs


def _drop_shared_answers(docs: list[_Doc]) -> None:
    """Drop answers kept for more than one document (``data_prep.parse.drop_shared_answers``), after every round:
    within this call, so a sharded run compares the documents of one shard. A document left without pairs is
    no longer a chain link (the prompts chained after it were already built)."""
    results = drop_shared_answers([ParseResult(d.kept, Counter()) for d in docs])
    for d, result in zip(docs, results):
        if result.dropped:
            keep = set(map(id, result.pairs))
            d.pairs = [[p for p in chunk if id(p) in keep] for chunk in d.pairs]
            d.dropped.update(result.dropped)
            if not d.kept:
                d.link = None


def _record(cfg, doc: dict, d: _Doc, documents: list[dict], rounds: int) -> dict:
    chunked = len(d.contexts) > 1
    record = {
        "id": doc["id"],
        "split": doc["split"],
        "text": doc["text"],
        "pairs": [dict(p.to_dict(), chunk=c) if chunked else p.to_dict() for c, ps in enumerate(d.pairs) for p in ps],
        "raw_output": d.raws if chunked else d.raws[0],
        "dropped": dict(d.dropped),
    }
    if chunked:
        record["chunks"] = len(d.contexts)
    if rounds > 1:
        record["round"] = d.round
        record["prev_id"] = documents[d.link]["id"] if d.link is not None else None
    if getattr(cfg, "save_prompts", False):
        record["prompts"] = [p.text for p in d.prompts]
    return record
