"""Synthesizer prompts: the released synthesizer's exact format, and a few-shot format for small models.

Formats (``SynthesisConfig.prompt_format``):

- ``lmops``: ``<s> <CON> {text} </CON>\\n\\n``, byte for byte the prompt of the released
  instruction-synthesizer (LMOps ``instruction_pretrain``); the literal ``<s>`` is the BOS, so it is
  tokenized with ``add_special_tokens=False`` (default special tokens would give a double BOS).
- ``fewshot``: for instruct models not tuned on the format (SmolLM2): short demonstrations in the tag
  format, then ``<CON> {text} </CON>\\n\\n<QUE>``; the trailing ``<QUE>`` is prefilled, so the parser must
  see ``prefill + output``; tokenized with the tokenizer's default special tokens (a BOS for
  Llama/Mistral tokenizers, nothing for SmolLM2). Raw continuation works better than chat turns for SmolLM2-135M:
  with chat prompts it writes one question and ends its turn, or drifts into unrelated code (0 usable pairs of
  8 documents tried); with two demonstrations and ``<QUE>`` prefilled, greedy, it writes about one pair per
  document, most of them grounded in the text.
- ``chat``: any instruct model through its own chat template: an instruction (system message), the
  demonstrations as user/assistant turns, the document as the last user turn, then ``<QUE>`` prefilled
  after the assistant header; tokenized with ``add_special_tokens=False`` (the template has them).

Documents are cut to ``max_context_tokens`` tokens of the synthesizer's tokenizer before they go into a
prompt (the reference does not cut; long texts overflow its 4096-token context; ``synthesize`` splits long
documents into chunks first, see ``data_prep.chunking``).

Multi-round (M-shot) synthesis prompts a text after the chain of earlier rounds' entries (``history``: a
list of ``(text, pairs)``, oldest first). In the ``lmops`` format each entry is rendered exactly as the
reference does (LMOps ``instruction_pretrain/utils/read_compre.py``, ``get_dataset``):
``<s> <CON> {text} </CON>\n\n`` + pairs + ``</s>``, the entries concatenated, then the new
``<s> <CON> {text} </CON>\n\n``. In ``fewshot`` the entries follow the demonstrations in the same
``<CON> text </CON>\n\n`` + pairs + ``\n\n`` form; in ``chat`` they are more user/assistant turns.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from data_prep.parse import ANS, CON, CON_CLOSE, END, QUE, Pair

PromptFormat = Literal["lmops", "fewshot", "chat"]

CHAT_INSTRUCTION = (
    "Read the text and write question-answer pairs about it. Write each pair as "
    "<QUE> question <ANS> answer </END>, separate pairs with a blank line, and answer only from the text."
)


def lmops_prompt(text: str) -> str:
    """The released synthesizer's prompt for one raw text: ``<s> <CON> {text} </CON>\\n\\n``."""
    return f"<s> <CON> {text} </CON>\n\n"


def render_pairs(pairs: Iterable[Pair]) -> str:
    """Pairs in the synthesizer's output format: ``<QUE> q <ANS> a </END>`` joined by ``\\n\\n``."""
    return "\n\n".join(f"{QUE} {p.question} {ANS} {p.answer} {END}" for p in pairs)


# Few-shot demonstrations: short technical-documentation texts (hard-wrapped, quoted names, like
# pydoc topics), two pairs each whose short answers reuse the text's wording. Tuned on SmolLM2-135M and
# 16 pydoc topics: these gave about 0.75 grounded pairs per document; longer one-sentence answers made
# it loop more, chat-style prompts gave none.
FEWSHOT_DEMONSTRATIONS: tuple[tuple[str, tuple[Pair, ...]], ...] = (
    (
        'The "while" statement\n*********************\n\nThe "while" statement is used for repeated execution as long as an\n'
        'expression is true.  If the expression is false, the suite of the\n"else" clause, if present, is executed and the '
        "loop terminates.",
        (
            Pair('What is the "while" statement used for?', "Repeated execution as long as an expression is true."),
            Pair('When does a "while" loop run its "else" clause?', "When the expression is false; then the loop terminates."),
        ),
    ),
    (
        "Sets\n****\n\nA set object is an unordered collection of distinct hashable objects.\nCommon uses include membership "
        "testing and removing duplicates from a\nsequence.  Sets do not record element position, so sets do not\nsupport "
        "indexing or slicing.",
        (
            Pair("What is a set object?", "An unordered collection of distinct hashable objects."),
            Pair("Why do sets not support slicing?", "Because sets do not record element position."),
        ),
    ),
    (
        "The tar command\n***************\n\nThe tar command stores many files in one archive file.  The option\n"
        '"-x" extracts files from an archive, and "-z" compresses the archive\nwith gzip.',
        (
            Pair("Which tar option extracts files?", 'The option "-x" extracts files from an archive.'),
            Pair('What does the option "-z" do?', "It compresses the archive with gzip."),
        ),
    ),
)


def fewshot_prefix() -> str:
    """The demonstrations, each as ``<CON> text </CON>\\n\\n`` + its rendered pairs + ``\\n\\n``."""
    return "".join(f"{CON} {text} {CON_CLOSE}\n\n{render_pairs(pairs)}\n\n" for text, pairs in FEWSHOT_DEMONSTRATIONS)



def lmops_chain(history: Iterable[tuple[str, Iterable[Pair]]]) -> str:
    """Earlier rounds' entries as the reference chains them: each ``<s> <CON> text </CON>\\n\\n`` + pairs + ``</s>``."""
    return "".join(f"{lmops_prompt(text)}{render_pairs(pairs)}</s>" for text, pairs in history)


def fewshot_prompt(text: str, history: Iterable[tuple[str, Iterable[Pair]]] = ()) -> str:
    """Demonstrations, then the chain ``history`` rendered like them, then ``<CON> {text} </CON>\\n\\n<QUE>``
    (the ``<QUE>`` is prefilled)."""
    chain = "".join(f"{CON} {t.strip()} {CON_CLOSE}\n\n{render_pairs(pairs)}\n\n" for t, pairs in history)
    return f"{fewshot_prefix()}{chain}{CON} {text.strip()} {CON_CLOSE}\n\n{QUE}"


def chat_prompt(
    text: str,
    tokenizer,
    instruction: str = CHAT_INSTRUCTION,
    demonstrations: Iterable[tuple[str, Iterable[Pair]]] = FEWSHOT_DEMONSTRATIONS,
    history: Iterable[tuple[str, Iterable[Pair]]] = (),
) -> str:
    """A chat-template prompt for any instruct model, answered in the ``<QUE> q <ANS> a </END>`` format.

    Turns: ``instruction`` as the system message; each demonstration as a user turn
    ``<CON> text </CON>`` and an assistant turn with its rendered pairs; then the chain ``history`` as
    more such turns; then the document as the last user turn. Rendered with
    ``tokenizer.apply_chat_template(..., add_generation_prompt=True)`` and
    followed by ``<QUE>`` (prefilled), so the result already holds the template's special tokens:
    tokenize it with ``add_special_tokens=False``. Raises ValueError when the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt format 'chat' needs a tokenizer with a chat template (use 'lmops' or 'fewshot')")
    messages = [{"role": "system", "content": instruction}]
    for demo_text, pairs in (*demonstrations, *history):
        messages.append({"role": "user", "content": f"{CON} {demo_text} {CON_CLOSE}"})
        messages.append({"role": "assistant", "content": render_pairs(pairs)})
    messages.append({"role": "user", "content": f"{CON} {text.strip()} {CON_CLOSE}"})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{rendered}{QUE}"


@dataclass(frozen=True)
class Prompt:
    """One synthesizer prompt.

    ``text``: the prompt string; ``prefill``: the start of the expected output already in the prompt
    (prepend it to the generated text before parsing); ``add_special_tokens``: how to tokenize ``text``.
    """

    text: str
    prefill: str
    add_special_tokens: bool


def truncate_to_tokens(text: str, tokenizer, max_tokens: int) -> str:
    """The longest prefix of ``text`` that is at most ``max_tokens`` tokens of ``tokenizer``.

    Cuts at a token boundary (tokens counted without special tokens) and decodes back; a text that
    fits is returned unchanged. A character split by the cut (a lone replacement character) is removed.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens]).rstrip("\ufffd")


def build_prompt(
    text: str,
    prompt_format: PromptFormat,
    tokenizer,
    max_context_tokens: int,
    instruction: str = CHAT_INSTRUCTION,
    history: Iterable[tuple[str, Iterable[Pair]]] = (),
) -> Prompt:
    """The prompt for one document in ``prompt_format``, the document cut to ``max_context_tokens``.

    ``instruction``: the system message of the ``chat`` format (ignored by the others). ``history``: the
    chain of earlier rounds' ``(text, pairs)`` entries to prompt the document after, oldest first (texts
    are used as given, not cut).

    Raises ValueError for an unknown format.
    """
    context = truncate_to_tokens(text, tokenizer, max_context_tokens)
    if prompt_format == "lmops":
        return Prompt(lmops_chain(history) + lmops_prompt(context), prefill="", add_special_tokens=False)
    if prompt_format == "fewshot":
        return Prompt(fewshot_prompt(context, history), prefill=QUE, add_special_tokens=True)
    if prompt_format == "chat":
        text = chat_prompt(context, tokenizer, instruction, history=history)
        return Prompt(text, prefill=QUE, add_special_tokens=False)
    raise ValueError(f"prompt format must be 'lmops', 'fewshot' or 'chat', not {prompt_format!r}")
