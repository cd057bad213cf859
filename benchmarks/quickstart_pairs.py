"""The quickstart's pairs, measured: how many a training document keeps, and how varied and correct they are.

Reads a synthesis stage output (``RUN/synthesis/pairs.jsonl`` of ``ipt run examples/quickstart.yaml --until
synthesize``) and reports, for the training documents: pairs kept per document, the share of documents with at
least one pair, distinct question openings (first two words, lowercased) and the drops by reason. With
``--reparse`` the saved ``raw_output`` of every record is parsed and filtered again by this checkout's code
(``data_prep.parse``: ``parse_pairs``, ``filter_grounded``, ``filter_repetitive``, ``drop_shared_answers``, in the
order ``data_prep.synthesize`` applies them) with the run's synthesis settings, so parser changes are compared on
the same generations without generating again. ``--sample N`` adds N kept pairs drawn with ``--seed`` (to judge by
hand: the judgments are written into the result file's ``judged`` entries by the person who reads them).

Results are merged into ``--out`` (default ``benchmarks/results/quickstart_pairs.json``) under ``--label``.

    python benchmarks/quickstart_pairs.py RUN/synthesis/pairs.jsonl --label before --sample 20
    python benchmarks/quickstart_pairs.py RUN/synthesis/pairs.jsonl --label after --reparse --sample 20
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from collections import Counter
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def opening(question: str) -> str:
    """The first two words of a question, lowercased: ``what is``, ``how does``..."""
    return " ".join(question.lower().split()[:2])


def load_parser(path: Path | None):
    """The parse module to re-parse with: this checkout's ``data_prep.parse``, or the file ``path`` (e.g. an
    older version, ``git show main:data_prep/parse.py > old_parse.py``)."""
    if path is None:
        import data_prep.parse as parse

        return parse
    spec = importlib.util.spec_from_file_location("parse_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def records_from_journal(journal: Path, corpus: Path, prefill: str) -> list[dict]:
    """Records (``id``, ``split``, ``text``, ``raw_output``) for the prompts a synthesis journal
    (``RUN/synthesis.shards/<fp>/.shard-*.partial.jsonl``) has finished, in corpus order; ``prefill`` is the
    prompt's prefilled start of the output (``<QUE>`` for fewshot/chat). Lets an unfinished run be measured."""
    done = {}
    for line in journal.read_text(encoding="utf-8").splitlines():
        for res in json.loads(line)["results"]:
            done[res["id"]] = prefill + res["text"]
    docs = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [dict(d, raw_output=done[d["id"]], pairs=[], dropped={}) for d in docs if d["id"] in done]


def reparse(records: list[dict], synthesis: dict, parse) -> list[dict]:
    """``records`` with ``pairs`` and ``dropped`` recomputed from ``raw_output`` by the ``parse`` module's parser
    and filters (:func:`load_parser`), with the settings of ``synthesis`` (the run's ``synthesis`` config
    section). A parser without ``drop_shared_answers`` (before issue 23) skips that step."""
    ParseResult, filter_grounded, parse_pairs = parse.ParseResult, parse.filter_grounded, parse.parse_pairs
    filter_repetitive = parse.filter_repetitive
    results = []
    for r in records:
        raws = r["raw_output"] if isinstance(r["raw_output"], list) else [r["raw_output"]]
        pairs, dropped, seen = [], Counter(), set()
        for raw in raws:
            parsed = parse_pairs(raw, synthesis.get("parse_mode", "lenient"))
            parsed = filter_grounded(parsed, r["text"], synthesis.get("min_grounding", 0.0))
            parsed = filter_repetitive(parsed, synthesis.get("max_repetition", 1.0))
            for p in parsed.pairs:
                if p.question.lower() in seen:
                    dropped["duplicate_question"] += 1
                else:
                    seen.add(p.question.lower())
                    pairs.append(p)
            dropped.update(parsed.dropped)
        results.append(ParseResult(pairs, dropped))
    if hasattr(parse, "drop_shared_answers"):
        results = parse.drop_shared_answers(results)
    return [dict(r, pairs=[p.to_dict() for p in res.pairs], dropped=dict(res.dropped))
            for r, res in zip(records, results)]


def measure(records: list[dict], sample: int, seed: int) -> dict:
    """Counts over the training documents of ``records`` and a seeded sample of their kept pairs."""
    train = [r for r in records if r["split"] == "train"]
    kept = [(r["id"], p) for r in train for p in r["pairs"]]
    openings = Counter(opening(p["question"]) for _, p in kept)
    dropped: Counter[str] = Counter()
    for r in train:
        dropped.update(r["dropped"])
    drawn = random.Random(seed).sample(kept, min(sample, len(kept)))
    return {
        "train_documents": len(train),
        "pairs_kept": len(kept),
        "pairs_per_train_document": round(len(kept) / max(len(train), 1), 3),
        "share_of_train_documents_with_pairs": round(sum(bool(r["pairs"]) for r in train) / max(len(train), 1), 3),
        "distinct_question_openings": len(openings),
        "question_openings": dict(openings.most_common()),
        "pairs_dropped": dict(sorted(dropped.items())),
        "sample": [{"id": doc_id, "question": p["question"], "answer": p["answer"], "judged": None}
                   for doc_id, p in drawn],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pairs", type=Path, help="a synthesis stage's pairs.jsonl, or with --corpus a synthesis journal")
    ap.add_argument("--corpus", type=Path, help="the run's corpus/documents.jsonl: read PAIRS as a journal "
                    "(implies --reparse)")
    ap.add_argument("--parser", type=Path, help="re-parse with this parse.py instead of data_prep/parse.py")
    ap.add_argument("--label", required=True, help="the name of this measurement in the result file")
    ap.add_argument("--reparse", action="store_true", help="parse and filter raw_output again with this code")
    ap.add_argument("--config", type=Path, help="the run's config.yaml (default: beside the synthesis folder)")
    ap.add_argument("--sample", type=int, default=20, help="kept pairs to draw for judging by hand")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "quickstart_pairs.json")
    args = ap.parse_args(argv)
    config = args.config or args.pairs.parent.parent / "config.yaml"
    synthesis = yaml.safe_load(config.read_text(encoding="utf-8")).get("synthesis", {})
    if args.corpus:
        prefill = "" if synthesis.get("prompt_format") == "lmops" else "<QUE>"
        records, args.reparse = records_from_journal(args.pairs, args.corpus, prefill), True
    else:
        records = [json.loads(line) for line in args.pairs.read_text(encoding="utf-8").splitlines() if line.strip()]
    if args.reparse:
        records = reparse(records, synthesis, load_parser(args.parser))
    result = {"pairs_file": args.pairs.name, "reparsed": args.reparse,
              "parser": args.parser.name if args.parser else "data_prep/parse.py",
              "settings": {k: synthesis.get(k) for k in ("model", "prompt_format", "parse_mode", "min_grounding",
                                                         "max_repetition", "max_new_tokens", "max_context_tokens")},
              **measure(records, args.sample, args.seed)}
    data = json.loads(args.out.read_text(encoding="utf-8")) if args.out.is_file() else {}
    data[args.label] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k not in ("sample", "question_openings")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
