"""Parse the synthesizer's output into instruction-response pairs (paper section 2.1; LMOps reference).

The output format is ``<QUE> {question} <ANS> {answer} </END>`` per pair, pairs separated by ``\\n\\n``.

Two modes:

- ``strict``: the reference parser exactly (LMOps ``instruction_pretrain``): split on ``</END>``; if the
  output does not end with ``</END>`` drop the last piece; keep a piece only if it has exactly one
  ``<ANS>``, its question starts with ``<QUE>`` and its answer is non-empty; drop duplicate questions
  (case-insensitive). Question and answer are stripped, ``<QUE>`` is removed from the question.
- ``lenient``: for small models that rarely write ``</END>`` (SmolLM2-135M): a pair also ends at a blank
  line or where the next ``<QUE>`` starts; answers are cut where they start repeating a sentence or trail
  off (:func:`trim_repeated_sentences`), and an answer that still ends mid-sentence (:func:`is_unfinished`,
  e.g. a trailing pair cut by ``max_new_tokens``) is dropped as ``unfinished``; an output that ends in a loop of
  repeated pieces loses that tail as one ``looping_tail`` drop (:func:`looping_tail_start`);
  parsing stops at the first ``<CON>`` or ``</CON>`` (the model started writing a document of its own;
  pairs after it are dropped as ``after_new_context``); empty questions are dropped.

Every dropped piece is counted under a named reason (see ``DROP_REASONS``); whitespace-only pieces are
not pairs and are not counted. In lenient mode a blank line right after ``<ANS>`` does not end the pair (the
answer after it is kept). :func:`grounding` and :func:`filter_grounded` implement the project's grounding
filter (not in the reference): the share of the answer's content words that are not in the question found in
the document; an answer that only restates the question is dropped as ``circular``.
:func:`repetition` and :func:`filter_repetitive` drop answers that loop on one phrase (small greedy models
do this until they run out of tokens); also not in the reference.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

QUE, ANS, END, CON, CON_CLOSE = "<QUE>", "<ANS>", "</END>", "<CON>", "</CON>"

ParseMode = Literal["strict", "lenient"]

DROP_REASONS = {
    "no_end_tag": "strict: the trailing piece was not closed by </END>",
    "no_answer_tag": "the piece has no <ANS>",
    "multiple_answer_tags": "the piece has more than one <ANS>",
    "no_question_tag": "the question does not start with <QUE>",
    "empty_answer": "nothing after <ANS>",
    "empty_question": "lenient: nothing between <QUE> and <ANS>",
    "unfinished": "lenient: the answer ends mid-sentence (cut by max_new_tokens, or a blank line after 'is', "
                  "'the', ',')",
    "duplicate_question": "the same question (case-insensitive) was already kept",
    "looping_tail": "lenient: the output ends in a loop (from the first piece that repeats an earlier one, with the "
                    "unpaired pieces of the loop's first round): the whole tail counts as one drop",
    "after_new_context": "lenient: a pair written after the model wrote <CON> or </CON> (a document of its own)",
    "ungrounded": "the grounding in the document of the answer's words that are not in the question is below "
                  "min_grounding",
    "circular": "the answer has content words but none beyond the question's: it only restates the question",
    "repetitive": "the answer repeats itself: its share of repeated word trigrams is above max_repetition",
    "duplicate_answer": "the same answer (case, spacing and final punctuation aside) was kept for another document; "
                        "dropped from every document that has it (answers without content words, e.g. 'No.', exempt)",
}


@dataclass(frozen=True)
class Pair:
    """One instruction-response pair: the question (instruction) and its answer (response), stripped."""

    question: str
    answer: str

    def to_dict(self) -> dict[str, str]:
        return {"question": self.question, "answer": self.answer}

    # Structure of the pair under the released synthesizer's conventions (LMOps instruction_pretrain; Cheng et
    # al., arXiv 2406.14491): multiple-choice questions carry "\nOptions:\n- o1\n- o2"; chain-of-thought
    # questions end with "Let's think step by step." and their answers end "Therefore, the answer is {final}".
    # data_prep.format.parse_item sorts pairs into the same families when formatting; these properties expose
    # it at parse time.

    @property
    def cot(self) -> bool:
        """True when the question asks for chain-of-thought (ends with ``Let's think step by step.``)."""
        return self.question.rstrip().endswith(COT_TRIGGER)

    @property
    def stem(self) -> str:
        """The question without its CoT trigger and options block."""
        q = self.question.strip()
        if self.cot:
            q = q[: -len(COT_TRIGGER)].rstrip()
        m = _OPTIONS_RE.search(q)
        return q[: m.start()].rstrip() if m else q

    @property
    def options(self) -> list[str] | None:
        """The ``- option`` lines after ``Options:`` in the question, or None for an open question."""
        q = self.question.strip()
        if self.cot:
            q = q[: -len(COT_TRIGGER)].rstrip()
        m = _OPTIONS_RE.search(q)
        if not m:
            return None
        lines = [ln.strip() for ln in q[m.end():].splitlines() if ln.strip()]
        return [ln[1:].strip() for ln in lines if ln.startswith("-")] or None

    @property
    def final_answer(self) -> str | None:
        """The answer after the last ``Therefore, the answer is`` for a CoT pair (None when it is missing or
        empty), else the whole answer."""
        if not self.cot:
            return self.answer.strip()
        cut = self.answer.rfind(COT_FINAL)
        final = self.answer[cut + len(COT_FINAL):].strip() if cut >= 0 else ""
        return final or None

    @property
    def structure_issue(self) -> str | None:
        """Why the formatter would drop this pair (``cot_without_final_answer``,
        ``options_answer_matches_no_option``; the names data_prep.format counts), or None."""
        final = self.final_answer
        if final is None:
            return "cot_without_final_answer"
        options = self.options
        if options and _norm_option(final) not in {_norm_option(o) for o in options}:
            return "options_answer_matches_no_option"
        return None

    def to_structured_dict(self) -> dict:
        """``to_dict`` plus ``options`` (list or None), ``cot`` (bool) and ``final_answer``."""
        return {**self.to_dict(), "options": self.options, "cot": self.cot, "final_answer": self.final_answer}


COT_TRIGGER = "Let's think step by step."
COT_FINAL = "Therefore, the answer is"
_OPTIONS_RE = re.compile(r"\n\s*Options:\s*\n")


def _norm_option(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().strip(".").strip()).lower()


def structure_counts(pairs) -> Counter[str]:
    """Counts of pair families (``plain``, ``options``, ``cot``, ``options_cot``) and of structure issues
    (``issue:<name>``) over ``pairs``, for synthesis statistics."""
    counts: Counter[str] = Counter()
    for p in pairs:
        family = ("options_" if p.options else "") + ("cot" if p.cot else "")
        counts[family.rstrip("_") or "plain"] += 1
        if p.structure_issue:
            counts[f"issue:{p.structure_issue}"] += 1
    return counts


@dataclass
class ParseResult:
    """Pairs kept, in output order, and the count of dropped pieces per reason (keys of DROP_REASONS)."""

    pairs: list[Pair]
    dropped: Counter[str] = field(default_factory=Counter)


_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_BEFORE_QUE = re.compile(r"(?=<QUE>)")
_ANS_THEN_SPACE = re.compile(re.escape(ANS) + r"\s+")


def parse_pairs(output: str, mode: ParseMode = "strict") -> ParseResult:
    """Parse one synthesizer output (including any prefilled ``<QUE>``) into pairs.

    ``mode`` is ``"strict"`` (the reference rules) or ``"lenient"`` (see the module docstring).
    Raises ValueError for another mode.
    """
    if mode not in ("strict", "lenient"):
        raise ValueError(f"parse mode must be 'strict' or 'lenient', not {mode!r}")
    dropped: Counter[str] = Counter()
    if mode == "strict":
        pieces = output.split(END)
        if not output.endswith(END):
            last = pieces.pop()
            if last.strip():
                dropped["no_end_tag"] += 1
    else:
        cut = min((i for i in (output.find(CON), output.find(CON_CLOSE)) if i >= 0), default=len(output))
        head, tail = output[:cut], output[cut:]
        if tail.count(QUE):
            dropped["after_new_context"] += tail.count(QUE)
        head = _ANS_THEN_SPACE.sub(ANS + " ", head)  # "<ANS>\n\nanswer": the blank line does not end the pair
        pieces = [
            sub
            for closed in head.split(END)
            for para in _BLANK_LINE.split(closed)
            for sub in _BEFORE_QUE.split(para)
        ]
    pieces = [piece for piece in pieces if piece.strip()]  # whitespace is not a pair and not a drop
    if mode == "lenient":
        start = looping_tail_start(pieces)
        if start < len(pieces):
            pieces = pieces[:start]
            dropped["looping_tail"] += 1
    pairs: list[Pair] = []
    seen: set[str] = set()
    for piece in pieces:
        reason, pair = _check_piece(piece, mode)
        if pair is not None and pair.question.lower() in seen:
            reason, pair = "duplicate_question", None
        if pair is None:
            dropped[reason] += 1
            continue
        seen.add(pair.question.lower())
        pairs.append(pair)
    return ParseResult(pairs, dropped)


def looping_tail_start(pieces: list[str]) -> int:
    """Index of the first piece of the looping tail of ``pieces`` (non-empty pieces of one output, in order), or
    ``len(pieces)`` when the output does not loop.

    The tail starts at the first piece that repeats an earlier piece (case- and whitespace-insensitive); the
    pieces just before it that belong to the loop's first round and are not pairs (no ``<ANS>`` or no
    ``<QUE>``: the repeated line's first occurrence) start it instead, so a line written 8 times is one drop.
    Pairs of the first round stay outside the tail and are parsed as usual. Small greedy models loop like this
    until ``max_new_tokens``; not in the reference, whose synthesizer ends its output with ``</END>``.
    """
    first: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        key = " ".join(piece.lower().split())
        if key in first:
            start = i
            while start > first[key] and _check_piece(pieces[start - 1], "lenient")[0] in ("no_answer_tag",
                                                                                          "no_question_tag"):
                start -= 1
            return start
        first[key] = i
    return len(pieces)


def _check_piece(piece: str, mode: ParseMode) -> tuple[str, Pair | None]:
    """Apply the reference's per-piece checks; return (drop reason, None) or ("", pair)."""
    parts = piece.split(ANS)
    if len(parts) == 1:
        return "no_answer_tag", None
    if len(parts) > 2:
        return "multiple_answer_tags", None
    question, answer = parts[0].strip(), parts[1].strip()
    if not question.startswith(QUE):
        return "no_question_tag", None
    if not answer:
        return "empty_answer", None
    question = question.replace(QUE, "").strip()
    if mode == "lenient":
        if not question:
            return "empty_question", None
        answer = trim_repeated_sentences(answer)
        pair = Pair(question, answer)
        if not (pair.options or pair.cot) and is_unfinished(answer):  # the formatter checks those families
            return "unfinished", None
        return "", pair
    return "", Pair(question, answer)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def trim_repeated_sentences(answer: str) -> str:
    """Lenient mode: cut an answer where it starts repeating itself or trails off unfinished.

    Sentences (split after ``.``, ``!`` or ``?``) are kept up to the first one that repeats an earlier
    sentence (case- and whitespace-insensitive); an unfinished last sentence (no final punctuation, as
    when generation hit ``max_new_tokens``) is cut when a finished one precedes it, unless it holds a chain of
    thought's final answer (``Therefore, the answer is ...``, often written without a full stop). Small greedy models
    loop ("X is a Y. X is a Y. X is a") until they run out of tokens; this keeps the first statement.
    Returns the answer unchanged when it is one sentence.
    """
    sentences = _SENTENCE_END.split(answer.strip())
    kept: list[str] = []
    seen: set[str] = set()
    for sentence in sentences:
        key = " ".join(sentence.lower().split())
        if key in seen:
            break
        seen.add(key)
        kept.append(sentence)
    if len(kept) > 1 and not kept[-1].rstrip().endswith((".", "!", "?")) and COT_FINAL not in kept[-1]:
        kept.pop()  # a chain of thought's final line ("Therefore, the answer is 3") is the answer, not a trail-off
    return " ".join(kept) if len(kept) < len(sentences) else answer.strip()


# Words a finished sentence does not end on: articles, prepositions, conjunctions, auxiliaries.
_DANGLING = frozenset(
    """
    a an the of to in on at by for from with as into onto than which whose whom where when while if and or but nor
    because is are was were be been being has have had do does did will would can could shall should may might must
    its their his her our your my these those such not very more most also i.e e.g like via per both either each every
    """.split()
)
_FINAL = re.compile(r"""[.!?]['"`)\]}]*$|[^\s(\[{'"`]['"`)\]}]+$""")  # "end." / "end.)" / 'is "x"' / "(see x)"
_MAX_UNPUNCTUATED_WORDS = 4


def is_unfinished(answer: str) -> bool:
    """True when ``answer`` ends mid-sentence: it does not end with ``.``, ``!`` or ``?`` (closing quotes or
    brackets may follow) or with a closing quote or bracket, and it ends on a dangling word (``is``, ``the``,
    ``of``... :data:`_DANGLING`; a one-word answer like "a" is an answer), on ``,``, ``;``, ``:``, ``-`` or an
    opening quote or bracket, or is longer than 4 words. Short unpunctuated answers ("Yes", "Repeated
    execution") count as finished. Not in the reference (its synthesizer closes every answer with ``</END>``).
    """
    text = answer.strip()
    if not text or _FINAL.search(text):
        return False
    words = text.split()
    last = words[-1].lower().strip("'\"`")
    return (not last or text[-1] in ",;:-([{'\"`" or (len(words) > 1 and last in _DANGLING)
            or len(words) > _MAX_UNPUNCTUATED_WORDS)


# A small English stopword list: function words that say nothing about grounding.
STOPWORDS = frozenset(
    """
    the and for are but not you all any can had her was one our out has him his how its may new now old
    see two who did get let say she too use that with have this will your from they know want been good
    much some time very when come here just like long make many more most only over such take than them
    well were what which while would there their then these those into also each other about after again
    being both could does doing down during further few itself just more once same should through under
    until where why yes because before between above below off own same so very can will shall might must
    """.split()
)

_WORD = re.compile(r"[a-z0-9]+")


def content_words(text: str) -> set[str]:
    """Lowercase alphanumeric words of length >= 3 that are not in STOPWORDS."""
    return {w for w in _WORD.findall(text.lower()) if len(w) >= 3 and w not in STOPWORDS}


def new_content_words(answer: str, question: str = "") -> set[str]:
    """The answer's content words that are not content words of the question's stem (the question without
    its options block and CoT trigger, see :attr:`Pair.stem`): what the answer adds to the question."""
    stem = Pair(question, "").stem if question else ""
    return content_words(answer) - content_words(stem)


def grounding(answer: str, document: str, question: str = "") -> float:
    """Share (0..1) of the answer's distinct content words that are not in ``question`` and occur as words in
    the document.

    Words the answer copies from the question are not counted: an invented answer that restates the question
    ("The assert statement is a fantasy") would otherwise pass on the question's words. A multiple-choice
    answer is measured against the document, not the options it picks from. An answer with no such words
    ("No", "42", or one that only restates the question) scores 1.0: nothing in it is ungrounded
    (:func:`filter_grounded` drops the restating kind as ``circular``).
    """
    words = new_content_words(answer, question)
    if not words:
        return 1.0
    doc_words = set(_WORD.findall(document.lower()))
    return sum(w in doc_words for w in words) / len(words)


def is_circular(pair: Pair) -> bool:
    """True when the answer has content words and every one of them is in the question's stem: it restates
    the question and says nothing new (``What is the "global" statement?`` / ``The "global" statement is a
    statement.``)."""
    return bool(content_words(pair.answer)) and not new_content_words(pair.answer, pair.question)


def filter_grounded(result: ParseResult, document: str, min_grounding: float) -> ParseResult:
    """Drop pairs whose answer restates the question (``circular``) or whose :func:`grounding` in
    ``document``, measured on the answer's words that are not in the question, is below ``min_grounding``
    (``ungrounded``). ``min_grounding`` <= 0 disables both.

    Returns a new ParseResult; each removed pair adds one drop under its reason. Not in the reference
    (LMOps keeps every parsed pair); a filter for small synthesizers that invent.
    """
    if min_grounding <= 0:
        return ParseResult(list(result.pairs), Counter(result.dropped))
    kept: list[Pair] = []
    dropped = Counter(result.dropped)
    for p in result.pairs:
        if is_circular(p):
            dropped["circular"] += 1
        elif grounding(p.answer, document, p.question) < min_grounding:
            dropped["ungrounded"] += 1
        else:
            kept.append(p)
    return ParseResult(kept, dropped)


def repetition(answer: str, n: int = 3) -> float:
    """Share (0..1) of the answer's word n-grams that repeat an earlier n-gram of the same answer.

    0.0 for an answer with no repeated n-gram (or fewer than ``n`` words); approaches 1.0 for a loop.
    """
    words = _WORD.findall(answer.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def filter_repetitive(result: ParseResult, max_repetition: float) -> ParseResult:
    """Drop pairs whose answer :func:`repetition` is above ``max_repetition`` (1.0 disables).

    Returns a new ParseResult; each removed pair adds one ``repetitive`` drop.
    """
    if max_repetition >= 1.0:
        return ParseResult(list(result.pairs), Counter(result.dropped))
    kept = [p for p in result.pairs if repetition(p.answer) <= max_repetition]
    dropped = Counter(result.dropped)
    if len(kept) < len(result.pairs):
        dropped["repetitive"] += len(result.pairs) - len(kept)
    return ParseResult(kept, dropped)


def answer_key(answer: str) -> str:
    """The answer compared across documents: lowercase, whitespace collapsed, final punctuation stripped."""
    return " ".join(answer.lower().split()).rstrip(".!?;:, ")


def drop_shared_answers(results: list[ParseResult]) -> list[ParseResult]:
    """Drop every pair whose answer (:func:`answer_key`) was kept for more than one of ``results`` (one
    ParseResult per document, in any order), from all of them.

    An answer given for two different documents (the quickstart's ``pydoc:if`` and ``pydoc:else`` got the
    same pair) says nothing specific about either. Answers without content words ("No.", "42") may recur and
    are kept; one document repeating its own answer is not touched. Returns new ParseResults; each removed
    pair adds one ``duplicate_answer`` drop. Not in the reference (LMOps dedups questions within one output).
    """
    owners: dict[str, set[int]] = {}
    for i, result in enumerate(results):
        for p in result.pairs:
            if content_words(p.answer):
                owners.setdefault(answer_key(p.answer), set()).add(i)
    shared = {key for key, docs in owners.items() if len(docs) > 1}
    out = []
    for result in results:
        kept = [p for p in result.pairs if answer_key(p.answer) not in shared]
        dropped = Counter(result.dropped)
        if len(kept) < len(result.pairs):
            dropped["duplicate_answer"] += len(result.pairs) - len(kept)
        out.append(ParseResult(kept, dropped))
    return out
