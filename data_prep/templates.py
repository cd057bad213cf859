"""The project's own template bank for instruction-augmented texts (Instruction Pre-Training, arXiv 2406.14491).

Written for megatron-ipt (the reference's bank derives from FLAN v2; nothing here is copied from it). The
bank is data: lists of parts that :mod:`data_prep.format` draws from, once per chain, with a seeded RNG.
A rendered pair is ``{q_prefix}{question}{delimiter}{a_prefix}{answer}``; the families add an options block
(options questions), a reasoning trigger and a final-answer lead (chain of thought), or both.

Every string is a plain Python string with no ``{placeholder}``: the formatter concatenates parts, so no
template can leave a placeholder behind.
"""

from __future__ import annotations

from itertools import product

# ---- around the document --------------------------------------------------------------------------------

# Read wrappers (prefix, suffix) around the text; the plain text is used half of the time (see format.py).
READ_WRAPPERS: list[tuple[str, str]] = [
    ("Article:\n", ""), ("Text:\n", ""), ("Passage:\n", ""), ("Document:\n", ""), ("Read the following text.\n\n", ""),
    ("Read this passage carefully:\n\n", ""), ("Here is a document.\n\n", ""), ("Context:\n", ""),
    ("Background reading:\n", ""), ("Source text:\n", ""), ("Reference material:\n", ""),
    ("Consider the following excerpt.\n\n", ""), ("Excerpt:\n", ""), ("The following is a piece of documentation.\n\n", ""),
    ("Study the text below.\n\n", ""), ("Reading:\n", ""), ("Please read:\n", ""), ("Material:\n", ""),
    ("Given the text:\n", ""), ("Here is some information.\n\n", ""), ("--- Text ---\n", "\n--- End of text ---"),
    ("[Document]\n", "\n[End of document]"), ("<<\n", "\n>>"), ("Begin text.\n", "\nEnd text."),
    ("Read the article below and answer the questions after it.\n\n", ""), ("Notes:\n", ""),
    ("An extract for study:\n\n", ""), ("Input text:\n", ""), ("Content:\n", ""), ("Read and understand:\n", ""),
]

# Separators between the document and its questions (classic mode) and between pairs.
TEXT_PAIR_SEPARATORS: list[str] = ["\n\n", "\n\n\n", "\n", "\n\n---\n\n", "\n\n* * *\n\n"]
PAIR_SEPARATORS: list[str] = ["\n\n", "\n", "\n\n\n"]

# Separators between the documents of one chain: one drawn per chain.
CHAIN_SEPARATORS: list[str] = ["\n\n", "\n\n\n", "\n\n----\n\n", "\n\n-----------\n\n", "\n\n===\n\n", "\n\n* * *\n\n",
                               "\n\n#####\n\n", "\n\n~~~\n\n", "\n\n\n\n"]

# Lead-in lines before the questions (none half of the time).
LEAD_INS: list[str] = [
    "Answer questions based on the text above.", "Now answer the following questions about the text.",
    "Questions about the passage:", "Test your understanding of the text above.", "Use the document to answer these questions.",
    "Answer using the passage.", "Based on the article, respond to the following.", "Questions:",
    "Some questions about what you just read:", "Check your comprehension:", "Reply to each question using the text.",
    "Quiz on the text above:", "Here are a few questions on the material.", "Respond to the prompts below.",
    "Please answer the questions that follow.", "What did the text say? Answer below.", "Exercises:",
    "Work through these questions.", "Answer based on the reading.", "Review questions:",
    "Let us check what the document says.", "Try these questions.", "Using only the text, answer:",
    "Questions and answers about the document:", "Comprehension questions:",
]

# Lead-ins for pairs placed before the text (inversion).
INVERTED_LEAD_INS: list[str] = [
    "Answer these questions, then read the text they are based on.", "Questions first; the source text follows.",
    "The answers below come from the text after them.", "Here are some questions and answers; the passage comes next.",
    "Q&A, followed by the document:", "Questions about the text below:",
]

# ---- pair patterns per family ---------------------------------------------------------------------------

# (question prefix, answer prefix) label pairs; combined with DELIMITERS into the plain QA patterns.
QA_LABELS: list[tuple[str, str]] = [
    ("Q: ", "A: "), ("Question: ", "Answer: "), ("", ""), ("Instruction: ", "Response: "), ("Input: ", "Output: "),
    ("User: ", "Assistant: "), ("Query: ", "Reply: "), ("Problem: ", "Solution: "), ("Prompt: ", "Completion: "),
    ("Ask: ", "Answer: "), ("Q. ", "A. "), ("QUESTION: ", "ANSWER: "), ("Question - ", "Answer - "),
    ("Task: ", "Result: "), ("Request: ", "Response: "), ("", "Answer: "), ("", "A: "), ("Q: ", ""),
    ("Question: ", ""), ("Quiz: ", "Key: "), ("Inquiry: ", "Response: "), ("Student: ", "Teacher: "),
    ("Exercise: ", "Solution: "), ("[Q] ", "[A] "), ("Q) ", "A) "), ("-> ", "<- "), ("Question:\n", "Answer:\n"),
    ("Instruction:\n", "Response:\n"),
]
DELIMITERS: list[str] = ["\n", " ", "\n\n"]

# Options blocks: a header line before the options (may be empty) and marker styles; order is shuffled per pair.
OPTION_HEADERS: list[str] = ["Options:", "Choices:", "Pick one:", "Select from:", "Possible answers:", "Choose one:",
                             "Candidates:", "Select one of the following:", "Available options:", ""]
# Marker styles: a function of the option's 0-based position, written as tuples of per-position markers.
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
OPTION_MARKERS: list[tuple[str, ...]] = [
    tuple(f"{c}. " for c in _LETTERS), tuple(f"({c}) " for c in _LETTERS), tuple(f"{c.lower()}) " for c in _LETTERS),
    tuple(f"{i}. " for i in range(1, 27)), tuple(f"({i}) " for i in range(1, 27)), tuple("- " for _ in _LETTERS),
    tuple("* " for _ in _LETTERS), tuple(f"[{c}] " for c in _LETTERS), tuple(f"{c}) " for c in _LETTERS),
    tuple(f"({c.lower()}) " for c in _LETTERS), tuple(f"Option {c}: " for c in _LETTERS),
    tuple(f"{i}) " for i in range(1, 27)),
]
OPTION_JOINERS: list[str] = ["\n", " "]  # one option per line, or all on one line
# How the chosen option appears in the answer: the marker and text, the text only, or the marker only.
OPTION_ANSWER_STYLES: list[str] = ["marker_text", "text", "marker"]

# Chain of thought: a trigger after the question (may be empty) and a lead before the final answer.
COT_TRIGGERS: list[str] = [
    " Let's think step by step.", "\nLet's think step by step.", " Think it through before answering.",
    "\nExplain your reasoning, then give the answer.", " Reason step by step.", "\nWork it out step by step.",
    " Show your reasoning.", "\nGive the reasoning first, then the answer.", " Think carefully.",
    "\nExplain, then answer.", " Let's work through it.", "",
]
COT_FINAL_LEADS: list[str] = [
    "\nTherefore, the answer is ", "\nSo the answer is ", "\nThe answer is ", "\nFinal answer: ", "\nThus: ",
    " Therefore, the answer is ", " So the answer is ", "\nHence the answer: ", "\nIn short: ", "\nAnswer: ",
    "\nConclusion: ", " That gives ",
]

FAMILIES = ("plain", "options", "cot", "options_cot")

# ---- modes ------------------------------------------------------------------------------------------------

# Dialog: role names for the two speakers (the document comes first, as in classic mode).
DIALOG_ROLES: list[tuple[str, str]] = [
    ("User", "Assistant"), ("Human", "AI"), ("Student", "Teacher"), ("Person A", "Person B"), ("Customer", "Agent"),
    ("Learner", "Tutor"), ("Q", "A"), ("Reader", "Expert"), ("Me", "You"), ("Visitor", "Guide"), ("Interviewer", "Interviewee"),
    ("Speaker 1", "Speaker 2"),
]
DIALOG_TURN_JOINERS: list[str] = ["\n", "\n\n"]

# Numbered questions: a heading before the questions and one before the answers; number styles.
NUMBERED_HEADINGS: list[tuple[str, str]] = [
    ("Questions:", "Answers:"), ("Answer the following questions.", "Answers:"), ("Exercises", "Solutions"),
    ("Quiz", "Answer key"), ("Questions", "Responses"), ("Review questions:", "Answers to the review questions:"),
    ("Problems:", "Solutions:"), ("Test yourself:", "Check your answers:"), ("Tasks:", "Results:"),
    ("Questions about the text:", "Suggested answers:"),
]
NUMBER_STYLES: list[tuple[str, str]] = [("", ". "), ("", ") "), ("(", ") "), ("Q", ": "), ("#", " "), ("", ": "), ("[", "] ")]

# Inline few-shot: demonstrations introduced by a header, then the last pair as the "real" question.
FEWSHOT_HEADERS: list[str] = [
    "Here are some examples.", "Examples:", "Some worked examples follow.", "Study these examples.",
    "Example questions and answers:", "Look at these examples first.", "Demonstrations:", "A few solved questions:",
]
FEWSHOT_EXAMPLE_LABELS: list[str] = ["Example {n}:", "Demo {n}.", "Sample {n}:", "({n})", "Case {n}:", "Exercise {n}:"]
FEWSHOT_FINAL_LEADS: list[str] = [
    "Now your turn.", "Now answer this one.", "Now the question:", "Answer the next question in the same way.",
    "Your question:", "Next:", "Following the examples:", "Now try this.",
]

# Next-turn dialog: the document is inside the first user turn, followed by the first question.
NEXT_TURN_OPENERS: list[str] = [
    "", "Read this:\n", "Here is a text.\n", "Take a look at this document.\n", "I have a passage for you.\n",
    "Can you help me with this text?\n", "Context:\n", "Please read the following.\n",
]
NEXT_TURN_BRIDGES: list[str] = ["\n\n", "\n\nMy question: ", "\n\nQuestion: ", "\n\nNow, ", "\n\n"]

MODES = ("classic", "dialog", "numbered", "fewshot", "next_turn")


def qa_patterns() -> list[tuple[str, str, str]]:
    """Plain QA patterns: (question prefix, delimiter, answer prefix)."""
    return [(qp, d, ap) for (qp, ap), d in product(QA_LABELS, DELIMITERS)]


def variant_counts() -> dict[str, int]:
    """How many distinct renderings each family and mode can draw (products of its independent parts)."""
    qa = len(qa_patterns())
    opts = len(OPTION_HEADERS) * len(OPTION_MARKERS) * len(OPTION_JOINERS) * len(OPTION_ANSWER_STYLES)
    cot = len(COT_TRIGGERS) * len(COT_FINAL_LEADS)
    return {
        "family.plain": qa, "family.options": qa * opts, "family.cot": qa * cot, "family.options_cot": qa * opts * cot,
        "mode.classic": len(READ_WRAPPERS) + 1, "mode.dialog": len(DIALOG_ROLES) * len(DIALOG_TURN_JOINERS),
        "mode.numbered": len(NUMBERED_HEADINGS) * len(NUMBER_STYLES), "mode.fewshot":
        len(FEWSHOT_HEADERS) * len(FEWSHOT_EXAMPLE_LABELS) * len(FEWSHOT_FINAL_LEADS),
        "mode.next_turn": len(NEXT_TURN_OPENERS) * len(NEXT_TURN_BRIDGES) * len(DIALOG_ROLES),
        "lead_ins": len(LEAD_INS), "read_wrappers": len(READ_WRAPPERS), "chain_separators": len(CHAIN_SEPARATORS),
    }
