"""The instruction-augmented corpus (Instruction Pre-Training, arXiv 2406.14491; LMOps reference).

A chain of up to M documents (rebuilt from the synthesis's ``prev_id`` links; without links each document
is its own chain, or ``group_consecutive`` groups consecutive training documents) becomes ONE training
text: its documents joined by one separator drawn per chain, all rendered with one template set drawn per
chain (:class:`TemplateSet`, parts from :mod:`data_prep.templates`). The mode is drawn per chain: classic
95% and dialog 5%, or, when every document has at least 2 pairs, classic 80% and dialog, numbered
questions, inline few-shot and next-turn dialog 5% each; pairs go before the text 5% of the time.
Every draw comes from an RNG seeded by ``(seed, chain's first id)``, so the output is byte-identical
whatever the number of workers. A document with no pairs stays plain text. No BOS/EOS inside the text.

Pairs are sorted into families by the synthesizer's text conventions (section 1): options questions
carry ``\\nOptions:\\n- o1\\n- o2``; chain-of-thought questions end with ``Let's think step by step.``
and their answers read ``{reasoning}\\nTherefore, the answer is {final}``. Options answers that match no
option and chain-of-thought answers without a final answer are dropped here and counted.

Outputs of :func:`format_documents` (lists of ``{"id", "text"}``):
- ``train_raw``: training documents as plain text (continual pre-training's raw domain data);
- ``train_ipt``: instruction-augmented chains, raw replay texts, and mixed-in general instructions;
- ``heldout_raw``: held-out documents as plain text;
- ``heldout_pairs``: held-out documents' pairs alone (classic pattern, no document);
- ``train_general`` (only with general instructions): the general-instruction texts mixed into ``train_ipt``,
  alone, so that an arm without augmentation (the paper's Vanilla PT: raw text + general instructions) can
  blend the same general data.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from typing import Callable

from data_prep import templates as T
from data_prep.errors import DataPrepError
from data_prep.mixing import select_general

COT_TRIGGER = "Let's think step by step."
COT_FINAL = "Therefore, the answer is"
OPTIONS_RE = re.compile(r"\n\s*Options:\s*\n")

DEFAULT_MODE_WEIGHTS = {"classic": 0.80, "dialog": 0.05, "numbered": 0.05, "fewshot": 0.05, "next_turn": 0.05}


@dataclass(frozen=True)
class FormatOptions:
    """Knobs of the formatter (the ``format`` config section without mixing); defaults follow the paper."""

    mode_weights: dict = field(default_factory=lambda: dict(DEFAULT_MODE_WEIGHTS))
    dialog_share_few_pairs: float = 0.05  # chains where some document has fewer than 2 pairs: dialog, else classic
    inversion: float = 0.05  # pairs before the text (classic and numbered modes)
    read_wrapper: float = 0.5  # share of documents wrapped by a read prefix ("Article: ...")
    lead_in: float = 0.5  # share of chains with a lead-in line before the questions
    group_consecutive: int = 1  # without prev_id links: chains of up to this many consecutive training documents
    raw_replay: float = 0.0  # share of augmented chains whose documents are also added to train_ipt as plain text


# ---- pairs and their families ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One pair split into its parts: ``family`` in templates.FAMILIES."""

    family: str
    stem: str
    answer: str = ""
    options: tuple[str, ...] = ()
    correct: int = -1
    reasoning: str = ""


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().strip(".").strip()).lower()


def parse_item(pair: dict) -> tuple[Item | None, str | None]:
    """Sort a pair into its family. Returns ``(item, None)`` or ``(None, drop reason)``."""
    q, a = pair["question"].strip(), pair["answer"].strip()
    cot = q.endswith(COT_TRIGGER)
    if cot:
        q = q[: -len(COT_TRIGGER)].rstrip()
    options: tuple[str, ...] = ()
    m = OPTIONS_RE.search(q)
    if m:
        lines = [ln.strip() for ln in q[m.end():].splitlines() if ln.strip()]
        options = tuple(ln[1:].strip() for ln in lines if ln.startswith("-"))
        q = q[: m.start()].rstrip()
    final = a
    reasoning = ""
    if cot:
        cut = a.rfind(COT_FINAL)
        if cut < 0 or not a[cut + len(COT_FINAL):].strip():
            return None, "cot_without_final_answer"
        reasoning, final = a[:cut].strip(), a[cut + len(COT_FINAL):].strip()
    if options:
        norm = [_norm(o) for o in options]
        if _norm(final) not in norm:
            return None, "options_answer_matches_no_option"
        return Item("options_cot" if cot else "options", q, final, options, norm.index(_norm(final)), reasoning), None
    return Item("cot" if cot else "plain", q, final, reasoning=reasoning), None


# ---- the template set drawn per chain ----------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateSet:
    """Every template choice of one chain; all its documents are rendered with it."""

    mode: str
    inverted: bool
    wrappers: tuple  # per document: (prefix, suffix) or None (plain text)
    chain_sep: str
    text_pair_sep: str
    pair_sep: str
    lead_in: str | None
    inverted_lead_in: str
    qa: tuple[str, str, str]
    option_header: str
    option_markers: tuple[str, ...]
    option_joiner: str
    option_answer_style: str
    cot_trigger: str
    cot_final_lead: str
    roles: tuple[str, str]
    turn_joiner: str
    numbered_headings: tuple[str, str]
    number_style: tuple[str, str]
    fewshot_header: str
    fewshot_label: str
    fewshot_final: str
    next_turn_opener: str
    next_turn_bridge: str


def _weighted(rng: random.Random, weights: dict) -> str:
    names = sorted(weights)
    return rng.choices(names, weights=[weights[n] for n in names])[0]


def draw_template_set(rng: random.Random, n_docs: int, min_pairs: int, opts: FormatOptions) -> TemplateSet:
    """Draw one chain's template set. The number of RNG calls is fixed, so every choice is reproducible."""
    if min_pairs >= 2:
        mode = _weighted(rng, opts.mode_weights)
    else:
        mode = "dialog" if rng.random() < opts.dialog_share_few_pairs else "classic"
    inverted = rng.random() < opts.inversion and mode in ("classic", "numbered")
    wrapper = rng.choice(T.READ_WRAPPERS)
    wrappers = tuple(wrapper if rng.random() < opts.read_wrapper else None for _ in range(n_docs))
    lead_in = rng.choice(T.LEAD_INS)
    return TemplateSet(
        mode=mode, inverted=inverted, wrappers=wrappers, chain_sep=rng.choice(T.CHAIN_SEPARATORS),
        text_pair_sep=rng.choice(T.TEXT_PAIR_SEPARATORS), pair_sep=rng.choice(T.PAIR_SEPARATORS),
        lead_in=lead_in if rng.random() < opts.lead_in else None, inverted_lead_in=rng.choice(T.INVERTED_LEAD_INS),
        qa=rng.choice(T.qa_patterns()), option_header=rng.choice(T.OPTION_HEADERS),
        option_markers=rng.choice(T.OPTION_MARKERS), option_joiner=rng.choice(T.OPTION_JOINERS),
        option_answer_style=rng.choice(T.OPTION_ANSWER_STYLES), cot_trigger=rng.choice(T.COT_TRIGGERS),
        cot_final_lead=rng.choice(T.COT_FINAL_LEADS), roles=rng.choice(T.DIALOG_ROLES),
        turn_joiner=rng.choice(T.DIALOG_TURN_JOINERS), numbered_headings=rng.choice(T.NUMBERED_HEADINGS),
        number_style=rng.choice(T.NUMBER_STYLES), fewshot_header=rng.choice(T.FEWSHOT_HEADERS),
        fewshot_label=rng.choice(T.FEWSHOT_EXAMPLE_LABELS), fewshot_final=rng.choice(T.FEWSHOT_FINAL_LEADS),
        next_turn_opener=rng.choice(T.NEXT_TURN_OPENERS), next_turn_bridge=rng.choice(T.NEXT_TURN_BRIDGES),
    )


# ---- rendering ------------------------------------------------------------------------------------------------


def render_question(item: Item, ts: TemplateSet, rng: random.Random) -> tuple[str, tuple[int, ...]]:
    """The question with its options block (shuffled order) and reasoning trigger. Returns ``(text, order)``."""
    q, order = item.stem, tuple(range(len(item.options)))
    if item.options:
        order = tuple(rng.sample(range(len(item.options)), len(item.options)))
        marks = ts.option_markers
        opts = ts.option_joiner.join(f"{marks[k]}{item.options[i]}" for k, i in enumerate(order))
        head = f"{ts.option_header}{ts.option_joiner}" if ts.option_header else ""
        q = f"{q}\n{head}{opts}"
    if item.family in ("cot", "options_cot"):
        q += ts.cot_trigger
    return q, order


def render_answer(item: Item, ts: TemplateSet, order: tuple[int, ...]) -> str:
    """The answer: the chosen option in the set's style, after the reasoning and final-answer lead for CoT."""
    final = item.answer
    if item.options:
        pos = order.index(item.correct)
        marker = ts.option_markers[pos].strip()
        style = ts.option_answer_style if marker not in ("-", "*") else "text"
        final = {"marker_text": f"{marker} {item.options[item.correct]}", "text": item.options[item.correct],
                 "marker": marker.rstrip(":")}[style]
    if item.family in ("cot", "options_cot"):
        return f"{item.reasoning}{ts.cot_final_lead}{final}" if item.reasoning else f"{ts.cot_final_lead.lstrip()}{final}"
    return final


def _qa(q: str, a: str, ts: TemplateSet) -> str:
    qp, delim, ap = ts.qa
    return f"{qp}{q}{delim}{ap}{a}"


def _wrapped(text: str, wrapper) -> str:
    return f"{wrapper[0]}{text}{wrapper[1]}" if wrapper else text


def render_document(text: str, items: list[Item], ts: TemplateSet, rng: random.Random, wrapper=None) -> str:
    """One document and its pairs in the chain's mode."""
    text = text.strip()
    qa = [render_question(it, ts, rng) for it in items]
    pairs = [(q, render_answer(it, ts, order)) for it, (q, order) in zip(items, qa)]
    doc = _wrapped(text, wrapper)
    if ts.mode == "dialog":
        user, bot = ts.roles
        return doc + ts.text_pair_sep + ts.turn_joiner.join(f"{user}: {q}{ts.turn_joiner}{bot}: {a}" for q, a in pairs)
    if ts.mode == "next_turn":
        user, bot = ts.roles
        (q0, a0), rest = pairs[0], pairs[1:]
        turns = [f"{user}: {ts.next_turn_opener}{text}{ts.next_turn_bridge}{q0}", f"{bot}: {a0}"]
        for q, a in rest:
            turns += [f"{user}: {q}", f"{bot}: {a}"]
        return ts.turn_joiner.join(turns)
    if ts.mode == "numbered":
        (hq, ha), (pre, post) = ts.numbered_headings, ts.number_style
        qs = "\n".join(f"{pre}{n}{post}{q}" for n, (q, _) in enumerate(pairs, 1))
        ans = "\n".join(f"{pre}{n}{post}{a}" for n, (_, a) in enumerate(pairs, 1))
        body = f"{hq}\n{qs}\n\n{ha}\n{ans}"
    elif ts.mode == "fewshot":
        demos = ts.pair_sep.join(f"{ts.fewshot_label.replace('{n}', str(n))}\n{_qa(q, a, ts)}"
                                 for n, (q, a) in enumerate(pairs[:-1], 1))
        body = f"{ts.fewshot_header}\n\n{demos}\n\n{ts.fewshot_final}\n{_qa(*pairs[-1], ts)}"
    else:
        body = ts.pair_sep.join(_qa(q, a, ts) for q, a in pairs)
    if ts.inverted:
        return f"{ts.inverted_lead_in}\n{body}{ts.text_pair_sep}{doc}"
    lead = f"{ts.lead_in}\n" if ts.lead_in and ts.mode == "classic" else ""
    return f"{doc}{ts.text_pair_sep}{lead}{body}"


def chain_rng(seed: int, first_id: str) -> random.Random:
    return random.Random(f"{seed}:{first_id}")


def render_chain(docs: list[dict], seed: int, opts: FormatOptions = FormatOptions()) -> dict:
    """One chain of documents as one training text, with its statistics.

    Returns ``{"id", "text", "mode", "inverted", "families", "pairs", "dropped", "augmented", "template"}``;
    ``template`` is the drawn :class:`TemplateSet` (None when no document kept a pair).
    """
    rng = chain_rng(seed, docs[0]["id"])
    dropped: Counter = Counter()
    items_per_doc = []
    for d in docs:
        items = []
        for p in d.get("pairs") or []:
            item, reason = parse_item(p)
            if item:
                items.append(item)
            else:
                dropped[reason] += 1
        items_per_doc.append(items)
    with_pairs = [len(i) for i in items_per_doc if i]
    out = {"id": "+".join(d["id"] for d in docs), "pairs": [len(i) for i in items_per_doc], "dropped": dict(dropped),
           "families": dict(Counter(it.family for items in items_per_doc for it in items))}
    if not with_pairs:
        sep = rng.choice(T.CHAIN_SEPARATORS)
        return {**out, "text": sep.join(d["text"].strip() for d in docs), "mode": None, "inverted": False,
                "augmented": False, "template": None}
    ts = draw_template_set(rng, len(docs), min(with_pairs), opts)
    parts = [render_document(d["text"], items, ts, rng, ts.wrappers[k]) if items else d["text"].strip()
             for k, (d, items) in enumerate(zip(docs, items_per_doc))]
    return {**out, "text": ts.chain_sep.join(parts), "mode": ts.mode, "inverted": ts.inverted, "augmented": True,
            "template": ts}


def render_heldout_pairs(doc: dict, seed: int, opts: FormatOptions = FormatOptions()) -> tuple[str | None, Counter]:
    """A held-out document's pairs alone, classic pattern, no document. Returns ``(text or None, dropped)``."""
    rng = chain_rng(seed, doc["id"])
    dropped: Counter = Counter()
    items = []
    for p in doc.get("pairs") or []:
        item, reason = parse_item(p)
        if item:
            items.append(item)
        else:
            dropped[reason] += 1
    if not items:
        return None, dropped
    ts = draw_template_set(rng, 1, len(items), opts)
    pairs = []
    for it in items:
        q, order = render_question(it, ts, rng)
        pairs.append(_qa(q, render_answer(it, ts, order), ts))
    return ts.pair_sep.join(pairs), dropped


# ---- chains ----------------------------------------------------------------------------------------------------


def build_chains(train: list[dict], group_consecutive: int = 1) -> list[list[dict]]:
    """Rebuild chains from ``prev_id`` links when the records carry them; else group consecutive documents.

    A document whose ``prev_id`` is missing, null or not a training document starts a chain. Chains come out
    in the order of their first document.
    """
    if any("prev_id" in r for r in train):
        by_id = {r["id"]: r for r in train}
        nxt: dict[str, dict] = {}
        for r in train:
            p = r.get("prev_id")
            if p in by_id and p not in nxt:
                nxt[p] = r
        chains, seen = [], set()
        for r in train:
            if r.get("prev_id") in by_id and r.get("prev_id") != r["id"]:
                continue
            chain, cur = [], r
            while cur is not None and cur["id"] not in seen:
                seen.add(cur["id"])
                chain.append(cur)
                cur = nxt.get(cur["id"])
            chains.append(chain)
        chains += [[r] for r in train if r["id"] not in seen]  # cycles: each document alone
        return chains
    m = max(1, group_consecutive)
    return [train[i:i + m] for i in range(0, len(train), m)]


def _render_many(args: tuple) -> list[dict]:
    chains, seed, opts = args
    return [render_chain(c, seed, opts) for c in chains]


def render_chains(chains: list[list[dict]], seed: int, opts: FormatOptions, workers: int = 1) -> list[dict]:
    """Render chains, in order, in ``workers`` processes; the result does not depend on ``workers``."""
    if workers <= 1 or len(chains) < 2:
        return _render_many((chains, seed, opts))
    size = -(-len(chains) // (workers * 4))
    jobs = [(chains[i:i + size], seed, opts) for i in range(0, len(chains), size)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        return [r for part in pool.map(_render_many, jobs) for r in part]


# ---- the stage ----------------------------------------------------------------------------------------------------


def format_documents(records: list[dict], seed: int = 0, *, options: FormatOptions | None = None,
                     general: list[dict] | None = None, general_ratio: float = 1.0, general_max_passes: int = 1,
                     count_tokens: Callable[[list[str]], list[int]] | None = None,
                     workers: int = 1) -> tuple[dict[str, list[dict]], dict]:
    """Build the four text sets from synthesis records (``{"id", "split", "text", "pairs", ["prev_id"]}``).

    ``general``: general-instruction texts (``{"id", "text"}``, see :mod:`data_prep.instructions`) mixed into
    ``train_ipt`` at ``general_ratio`` general tokens per augmented-domain token (needs ``count_tokens``, a
    function from a list of texts to their token counts in the training tokenizer). Returns ``(outputs, counts)``.
    """
    opts = options or FormatOptions()
    outputs: dict[str, list[dict]] = {"train_raw": [], "train_ipt": [], "heldout_raw": [], "heldout_pairs": []}
    train = [r for r in records if r["split"] != "heldout"]
    heldout = [r for r in records if r["split"] == "heldout"]
    outputs["train_raw"] = [{"id": r["id"], "text": r["text"]} for r in train]
    outputs["heldout_raw"] = [{"id": r["id"], "text": r["text"]} for r in heldout]

    rendered = render_chains(build_chains(train, opts.group_consecutive), seed, opts, workers)
    modes, families, dropped, pairs_hist, chain_len = Counter(), Counter(), Counter(), Counter(), Counter()
    replay = []
    docs_by_id = {r["id"]: r for r in train}
    for ch in rendered:
        outputs["train_ipt"].append({"id": ch["id"], "text": ch["text"]})
        chain_len[len(ch["pairs"])] += 1
        families.update(ch["families"])
        dropped.update(ch["dropped"])
        pairs_hist.update(ch["pairs"])
        if ch["augmented"]:
            modes[ch["mode"] + ("+inverted" if ch["inverted"] else "")] += 1
            first = ch["id"].split("+")[0]
            if opts.raw_replay > 0 and random.Random(f"{seed}:replay:{first}").random() < opts.raw_replay:
                replay += [{"id": f"replay:{i}", "text": docs_by_id[i]["text"]} for i in _chain_ids(ch, docs_by_id)]
        else:
            modes["plain"] += 1
    outputs["train_ipt"] += replay

    for r in heldout:
        text, drop = render_heldout_pairs(r, seed, opts)
        dropped.update({f"heldout_{k}": v for k, v in drop.items()})
        if text:
            outputs["heldout_pairs"].append({"id": r["id"], "text": text})

    counts: dict = {
        "seed": seed, **{f"{k}_documents": len(v) for k, v in outputs.items()},
        "chains": len(rendered), "chain_lengths": _sorted(chain_len),
        "augmented_chains": sum(1 for c in rendered if c["augmented"]),
        "plain_chains_without_pairs": sum(1 for c in rendered if not c["augmented"]),
        "modes": _sorted(modes), "families": _sorted(families), "pairs_per_document": _sorted(pairs_hist),
        "dropped": _sorted(dropped), "raw_replay_texts": len(replay), "options": asdict(opts),
    }
    counts["augmented_documents"] = counts["augmented_chains"]  # the pipeline's log line reads this name
    if count_tokens is not None:
        tok = {name: sum(count_tokens([r["text"] for r in recs])) for name, recs in outputs.items()}
        tok["train_ipt_replay"] = sum(count_tokens([r["text"] for r in replay])) if replay else 0
        tok["train_ipt_domain"] = tok["train_ipt"]
        counts["tokens"] = tok
    if general:
        if count_tokens is None:
            raise DataPrepError("mixing general instructions needs a tokenizer to count tokens")
        gen_tokens = count_tokens([g["text"] for g in general])
        chosen, mix = select_general(general, gen_tokens, counts["tokens"]["train_ipt_domain"], general_ratio, seed,
                                     general_max_passes)
        outputs["train_ipt"] += chosen
        outputs["train_general"] = list(chosen)  # the same texts alone, for arms that blend them with raw text
        counts["tokens"]["train_ipt_general"] = mix["general_tokens"]
        counts["tokens"]["train_ipt"] += mix["general_tokens"]
        counts["tokens"]["train_general"] = mix["general_tokens"]
        counts["train_general_documents"] = len(chosen)
        counts["train_ipt_documents"] = len(outputs["train_ipt"])
        counts["mixing"] = mix
    return outputs, counts


def _chain_ids(ch: dict, docs_by_id: dict) -> list[str]:
    ids = ch["id"].split("+")
    return ids if all(i in docs_by_id for i in ids) else [ch["id"]]


def _sorted(c: Counter) -> dict:
    return {str(k): v for k, v in sorted(c.items(), key=lambda kv: str(kv[0]))}


def summary_lines(counts: dict) -> list[str]:
    """The stage's CLI summary: the same numbers as the manifest's counts, one topic per line."""
    def fmt(d: dict) -> str:
        return ", ".join(f"{k} {v:,}" for k, v in d.items()) or "none"

    lines = [f"format: seed {counts['seed']}; {counts['chains']:,} training chains ({counts['augmented_chains']:,} augmented, "
             f"{counts['plain_chains_without_pairs']:,} plain), chain lengths: {fmt(counts['chain_lengths'])}",
             f"format: modes: {fmt(counts['modes'])}", f"format: pair families: {fmt(counts['families'])}",
             f"format: pairs per document: {fmt(counts['pairs_per_document'])}",
             f"format: dropped: {fmt(counts['dropped'])}; raw replay texts {counts['raw_replay_texts']:,}"]
    if "tokens" in counts:
        lines.append(f"format: tokens: {fmt(counts['tokens'])}")
    if "mixing" in counts:
        m = counts["mixing"]
        lines.append(f"format: general instructions: {m['general_texts']:,} texts, {m['general_tokens']:,} tokens, "
                     f"ratio {m['achieved_ratio']:.4f} (target {m['target_ratio']}, passes {m['general_passes']}"
                     f"{'' if m['target_reached'] else ', pool exhausted before the target'})")
    return lines
