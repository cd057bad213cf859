"""``ipt eval``: reading-comprehension scoring on held-out documents; ``ipt eval compare`` for tables."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Score a model on reading comprehension of held-out documents: each held-out document with one of its
synthesized questions, the reference answer scored by mean token log-likelihood (answer_nll, nats/token,
lower is better) and, for multiple-choice pairs, option accuracy (lowest mean NLL). Demonstrations (--shots)
are pairs of other held-out documents. Writes a results JSON and a Markdown table.

examples:
  ipt eval examples/quickstart.yaml                           # the run's latest checkpoint, 0-shot
  ipt eval examples/quickstart.yaml --init --name init        # the untrained initialisation (same seed)
  ipt eval examples/quickstart.yaml --hf runs/x/hf --shots 1  # a Hugging Face folder (same tokenizer)
  ipt eval compare runs/quickstart/eval/*.json                # side-by-side Markdown table
"""


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="Reading-comprehension scoring of a checkpoint on held-out documents; "
                       "'ipt eval compare' tabulates results.", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="+", metavar="CONFIG | compare RESULTS...",
                   help="the experiment YAML; or 'compare' followed by results JSON files")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="torch_dist checkpoint (default: the run's train/checkpoints)")
    src.add_argument("--init", action="store_true", help="score the untrained initialisation (the run's seed)")
    src.add_argument("--hf", help="score a Hugging Face folder instead (it must use the experiment's tokenizer)")
    p.add_argument("--data", help="synthesis pairs.jsonl (held-out records) or a task JSONL with text/question/answer "
                   "(default: the run's synthesis/pairs.jsonl)")
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default: model.seq_length)")
    p.add_argument("--name", help="model name in tables (default: from the source)")
    p.add_argument("--output", help="results JSON (default: RUN_DIR/eval/rc-NAME-Kshot.json)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from pathlib import Path

    from megatron_ipt.errors import IptError
    from megatron_ipt.evaluate import rc
    from megatron_ipt.evaluate.run import markdown

    if args.target[0] == "compare":
        import json

        if len(args.target) < 2:
            raise IptError("ipt eval compare needs results JSON files")
        records = []
        for f in args.target[1:]:
            try:
                records.append(json.loads(Path(f).read_text()))
            except (OSError, json.JSONDecodeError) as e:
                raise IptError(f"{f}: not a results file ({e})") from None
            if not {"model", "task", "metrics"} <= set(records[-1]):
                raise IptError(f"{f}: not a results file (needs model, task, metrics)")
        print(markdown(records), end="")
        return 0
    if len(args.target) != 1:
        raise IptError("ipt eval takes one experiment file (or 'compare' and results files)")
    from megatron_ipt.config import load_config

    cfg = load_config(args.target[0], args.overrides)
    result, out = evaluate_experiment(cfg, checkpoint=args.checkpoint, init=args.init, hf=args.hf, data=args.data,
                                      shots=args.shots, max_length=args.max_length, name=args.name, output=args.output)
    print(markdown([result]), end="")
    print(f"results: {out}")
    return 0


def evaluate_experiment(cfg, *, checkpoint=None, init=False, hf=None, data=None, shots=0, max_length=None, name=None,
                        output=None):
    """Score one model of an experiment on its held-out reading-comprehension examples; returns (record, path)."""
    from pathlib import Path

    from data_prep.encoders import load_encoder
    from megatron_ipt.errors import IptError
    from megatron_ipt.evaluate import rc
    from megatron_ipt.evaluate.run import evaluate_rc, write_results
    from megatron_ipt.evaluate.scorers import HFScorer, MegatronScorer
    from megatron_ipt.manifest import read_manifest
    from megatron_ipt.pipeline import stage_path

    tok_manifest = read_manifest(stage_path(cfg, "tokenize"), "tokenize")
    tok = tok_manifest["tokenizer"]
    encoder = load_encoder(tok["path"])
    docs = rc.load_heldout_pairs(data or stage_path(cfg, "synthesize") / "pairs.jsonl")
    max_length = max_length or cfg.model.seq_length
    if hf:
        scorer, model = HFScorer(hf, "cuda" if cfg.train.device == "cuda" else "cpu"), {"kind": "hf", "path": str(hf)}
    elif init:
        scorer, model = MegatronScorer(cfg, tok["vocab_size"], None), {"kind": "megatron-init", "seed": cfg.train.seed}
    else:
        ckpt = Path(checkpoint) if checkpoint else stage_path(cfg, "train") / "checkpoints"
        if not ckpt.exists():
            raise IptError(f"{ckpt}: no checkpoint to evaluate (train first, or pass --checkpoint / --init / --hf)")
        scorer, model = MegatronScorer(cfg, tok["vocab_size"], ckpt), {"kind": "megatron", "path": str(ckpt)}
    model["name"] = name or ("init" if init else Path(hf).name if hf else cfg.name)
    with scorer:
        result = evaluate_rc(scorer, encoder, docs, shots, max_length)
        if scorer.iteration is not None:
            model["iteration"] = scorer.iteration
    model["fingerprint"] = {"preset": cfg.model.preset, "hf_config": cfg.model.hf_config,
                            "tokenizer": tok.get("fingerprint") or tok.get("path")}
    out = Path(output) if output else cfg.run_path / "eval" / f"rc-{model['name']}-{shots}shot.json"
    return write_results(out, model, f"rc_heldout_{shots}shot", result, rc.settings(shots, max_length)), out
