"""``ipt eval``: reading comprehension (default), held-out perplexity or lm-evaluation-harness tasks on one
model of an experiment; ``ipt eval compare`` tabulates results files."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Evaluate one model of an experiment; each evaluation writes a results JSON and a Markdown table.

--task rc (default): reading comprehension of held-out documents: each held-out document with one of its
  synthesized questions, the reference answer scored by mean token log-likelihood (answer_nll, nats/token,
  lower is better) and, for multiple-choice pairs, option accuracy (lowest mean NLL). Demonstrations (--shots)
  are pairs of other held-out documents. --generate adds free-form answers: greedy generation scored by exact
  match and token F1 (SQuAD normalisation). --batch-size sequences go through the model at once (default 8:
  right-padded for scoring, left-padded into one KV cache for generation; batch 1's results up to float
  rounding).
--task perplexity: mean NLL/token and perplexity on each held-out component (raw, pairs, blend.extra
  valid_prefix), windows of model.seq_length over the concatenated documents, --batch-size windows per forward
  (default 8).
--harness TASKS: lm-evaluation-harness tasks (comma-separated) on a Hugging Face folder (--hf) or a checkpoint
  (default: the run's latest), exported first to a temporary Hugging Face folder (removed afterwards) with the
  config and tokenizer of --hf-config-from (default: model.hf_config, or the hf/ folder of a converted checkpoint,
  else a config written from the experiment's model config and its Hugging Face tokenizer).

examples:
  ipt eval examples/quickstart.yaml                           # the run's latest checkpoint, 0-shot
  ipt eval examples/quickstart.yaml --init --name init        # the untrained initialisation (same seed)
  ipt eval examples/quickstart.yaml --hf runs/x/hf --shots 1  # a Hugging Face folder (same tokenizer)
  ipt eval examples/quickstart.yaml --generate --max-new-tokens 24
  ipt eval examples/quickstart.yaml --task perplexity
  ipt eval examples/quickstart.yaml --hf runs/x/hf --harness arc_easy,my_task --include-path tasks/ --limit 100
  ipt eval med.yaml --harness arc_easy --hf-config-from ckpt/llama3-8b/hf     # the run's latest checkpoint
  ipt eval compare runs/quickstart/eval/*.json                # side-by-side Markdown table
"""


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="Evaluate a checkpoint or Hugging Face folder (reading comprehension, held-out "
                       "perplexity, lm-evaluation-harness); 'ipt eval compare' tabulates results.",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="+", metavar="CONFIG | compare RESULTS...",
                   help="the experiment YAML (its run folder's resolved config.yaml is used when there is one, "
                   "--set on top) or a run folder; or 'compare' followed by results JSON files")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="torch_dist checkpoint (default: the run's train/checkpoints)")
    src.add_argument("--init", action="store_true", help="score the untrained initialisation (the run's seed)")
    src.add_argument("--hf", help="score a Hugging Face folder instead (it must use the experiment's tokenizer)")
    p.add_argument("--task", choices=("rc", "perplexity"), default="rc",
                   help="rc: held-out reading comprehension (default); perplexity: held-out components")
    p.add_argument("--data", help="rc: synthesis pairs.jsonl (held-out records) or a task JSONL with "
                   "text/question/answer (default: the run's synthesis/pairs.jsonl); perplexity: a tokenized "
                   "folder with heldout_raw / heldout_pairs (default: the run's tokenized/)")
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--max-length", type=int, default=None, help="rc: tokens per example (default: model.seq_length)")
    p.add_argument("--generate", action="store_true", help="rc: also greedy free-form answers (exact_match, f1)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="rc --generate: answer length cap (default 16)")
    p.add_argument("--harness", metavar="TASKS", help="lm-eval tasks, comma-separated, on --hf or a checkpoint")
    p.add_argument("--hf-config-from", metavar="FOLDER", help="--harness on a checkpoint: Hugging Face folder with "
                   "the model's config.json and tokenizer for the export (default: model.hf_config, the hf/ "
                   "folder next to a converted checkpoint, else written from the model config and tokenizer)")
    p.add_argument("--include-path", help="--harness: a folder of extra lm-eval task YAMLs")
    p.add_argument("--num-fewshot", type=int, default=None, help="--harness: few-shot examples (default: the task's)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rc: sequences per forward, scoring and --generate alike; perplexity: windows per forward "
                   "(default 8; same metrics as 1, up to float rounding; lower it when memory is short); --harness: lm-eval batch size (default 1)")
    p.add_argument("--limit", type=int, default=None,
                   help="the first N held-out documents (rc), windows per component (perplexity) or documents "
                   "per task (harness)")
    p.add_argument("--trust-checkpoint", action="store_true", help="load the torch_dist checkpoint without scanning "
                   "its pickles for non-data classes (train.trust_checkpoint: true); only for checkpoints you trust")
    p.add_argument("--name", help="model name in tables (default: from the source)")
    p.add_argument("--output", help="results JSON (default: RUN_DIR/eval/TASK-NAME.json); --harness: a folder "
                   "(default RUN_DIR/eval), one file per task")
    p.set_defaults(handler=run)


def run(args) -> int:
    from megatron_ipt.errors import IptError
    from megatron_ipt.evaluate.run import markdown
    from megatron_ipt.evaluate.schema import read_results

    if args.target[0] == "compare":
        if len(args.target) < 2:
            raise IptError("ipt eval compare needs results JSON files")
        print(markdown([read_results(f) for f in args.target[1:]]), end="")
        return 0
    if len(args.target) != 1:
        raise IptError("ipt eval takes one experiment file (or 'compare' and results files)")
    if args.limit is not None and args.limit < 1:
        raise IptError(f"--limit must be at least 1 (got {args.limit})")
    if args.generate and args.max_new_tokens < 1:
        raise IptError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    if args.batch_size is not None and args.batch_size < 1:
        raise IptError(f"--batch-size must be at least 1 (got {args.batch_size})")
    from pathlib import Path

    from megatron_ipt.run_config import load_for_run, prefer_run_config

    cfg = load_for_run(args.target[0], args.overrides, "eval")
    if not Path(args.target[0]).is_dir():  # the run trained with its own --set overrides: evaluate what it trained
        cfg = prefer_run_config(cfg, args.overrides, "eval")
    if args.trust_checkpoint:
        cfg.train.trust_checkpoint = True
    source = dict(checkpoint=args.checkpoint, init=args.init, hf=args.hf, name=args.name)
    if args.hf_config_from and not (args.harness and not args.hf):
        raise IptError("--hf-config-from is for --harness on a checkpoint (not with --hf)")
    if args.harness:
        if args.init:
            raise IptError("--harness runs on a trained model: pass --checkpoint or --hf (not --init)")
        tasks = [t.strip() for t in args.harness.split(",") if t.strip()]
        done = evaluate_harness(cfg, args.hf, tasks, checkpoint=args.checkpoint, hf_config_from=args.hf_config_from,
                                include_path=args.include_path, limit=args.limit, num_fewshot=args.num_fewshot,
                                batch_size=args.batch_size or 1, name=args.name, output_dir=args.output)
    elif args.task == "perplexity":
        done = [evaluate_perplexity_experiment(cfg, **source, data=args.data, limit=args.limit, output=args.output,
                                               batch_size=args.batch_size or 8)]
    else:
        done = [evaluate_experiment(cfg, **source, data=args.data, shots=args.shots, max_length=args.max_length,
                                    output=args.output, max_new_tokens=args.max_new_tokens if args.generate else None,
                                    limit=args.limit, batch_size=args.batch_size or 8)]
    print(markdown([record for record, _ in done]), end="")
    for _, out in done:
        print(f"results: {out}")
    return 0


def _scorer(cfg, vocab_size: int, *, checkpoint=None, init=False, hf=None, name=None):
    """``(scorer, model info)`` for the source the user named: a Hugging Face folder, the untrained
    initialisation, or a checkpoint (default: the run's train/checkpoints)."""
    from pathlib import Path

    from megatron_ipt.errors import IptError
    from megatron_ipt.evaluate.scorers import HFScorer, MegatronScorer
    from megatron_ipt.pipeline import stage_path

    if hf:
        device = "cuda" if cfg.train.device == "cuda" else "cpu"
        scorer, model = HFScorer(hf, device, vocab_size), {"kind": "hf", "path": str(hf)}
    elif init:
        scorer, model = MegatronScorer(cfg, vocab_size, None), {"kind": "megatron-init", "seed": cfg.train.seed}
    else:
        ckpt = Path(checkpoint) if checkpoint else stage_path(cfg, "train") / "checkpoints"
        if not ckpt.exists():
            raise IptError(f"{ckpt}: no checkpoint to evaluate (train first, or pass --checkpoint / --init / --hf)")
        scorer, model = MegatronScorer(cfg, vocab_size, ckpt), {"kind": "megatron", "path": str(ckpt)}
    model["name"] = name or ("init" if init else Path(hf).name if hf else cfg.name)
    return scorer, model


def _fingerprint(cfg, tok: dict, hf=None) -> dict:
    """What identifies the model: preset / hf_config / tokenizer; for a Hugging Face folder also the SHA-256 of
    its config.json and the sizes of its weight files (hashing the weights themselves would take minutes)."""
    import hashlib
    from pathlib import Path

    fp = {"preset": cfg.model.preset, "hf_config": cfg.model.hf_config,
          "tokenizer": tok.get("fingerprint") or tok.get("path")}
    if hf:
        folder = Path(hf)
        fp["hf_config_sha256"] = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
        fp["hf_weights"] = {p.name: p.stat().st_size for p in sorted(folder.glob("*.safetensors"))}
    return fp


def _vocab_size(tokenizer) -> int | None:
    """The vocabulary size of the tokenizer at ``tokenizer`` (None when there is none to load)."""
    if not tokenizer:
        return None
    from data_prep.encoders import load_encoder

    try:
        return load_encoder(tokenizer).vocab_size
    except Exception:  # noqa: BLE001 - the export names the tokenizer when it cannot use it
        return None


def _tokenizer(cfg) -> dict:
    from megatron_ipt.manifest import read_manifest
    from megatron_ipt.pipeline import stage_path

    return read_manifest(stage_path(cfg, "tokenize"), "tokenize")["tokenizer"]


def _run_scorer(scorer, model: dict, fn):
    with scorer:
        result = fn(scorer)
        if scorer.iteration is not None:
            model["iteration"] = scorer.iteration
    return result


def evaluate_experiment(cfg, *, checkpoint=None, init=False, hf=None, data=None, shots=0, max_length=None, name=None,
                        output=None, max_new_tokens=None, limit=None, batch_size=8):
    """Score one model of an experiment on its held-out reading-comprehension examples (``max_new_tokens``: also
    free-form answers by greedy generation, exact match and F1; ``limit``: the first N documents' examples;
    ``batch_size``: sequences per forward); returns (record, path)."""
    from pathlib import Path

    from data_prep.encoders import load_encoder
    from megatron_ipt.evaluate import rc
    from megatron_ipt.evaluate.run import evaluate_rc, write_results
    from megatron_ipt.pipeline import stage_path

    tok = _tokenizer(cfg)
    encoder = load_encoder(tok["path"])
    docs = rc.load_heldout_pairs(data or stage_path(cfg, "synthesize") / "pairs.jsonl")[:limit]
    max_length = max_length or cfg.model.seq_length
    scorer, model = _scorer(cfg, tok["vocab_size"], checkpoint=checkpoint, init=init, hf=hf, name=name)
    result = _run_scorer(scorer, model, lambda s: evaluate_rc(s, encoder, docs, shots, max_length, max_new_tokens,
                                                              batch_size))
    model["fingerprint"] = _fingerprint(cfg, tok, hf)
    settings = {**rc.settings(shots, max_length), "batch_size": batch_size}
    if max_new_tokens:
        settings["generate"] = {"max_new_tokens": max_new_tokens, "decoding": "greedy",
                                "answer": "first line of the generation, stripped",
                                "normalisation": "SQuAD: lower case, no punctuation, no articles a/an/the, single spaces"}
    if limit:
        settings["limit_documents"] = limit
    out = Path(output) if output else cfg.run_path / "eval" / f"rc-{model['name']}-{shots}shot.json"
    return write_results(out, model, f"rc_heldout_{shots}shot", result, settings), out


def evaluate_perplexity_experiment(cfg, *, checkpoint=None, init=False, hf=None, data=None, name=None, output=None,
                                   limit=None, batch_size=8):
    """Held-out perplexity per component (:mod:`megatron_ipt.evaluate.perplexity`) of one model; ``data``: a
    tokenized folder (default: the run's); ``limit``: windows per component; ``batch_size``: windows per
    forward. Returns (record, path)."""
    from pathlib import Path

    from megatron_ipt.evaluate import perplexity
    from megatron_ipt.evaluate.run import write_results
    from megatron_ipt.manifest import read_manifest
    from megatron_ipt.pipeline import stage_path

    folder = Path(data) if data else stage_path(cfg, "tokenize")
    tok = read_manifest(folder, "tokenize")["tokenizer"]
    prefixes = perplexity.components(folder, cfg.blend.extra, cfg.blend.per_split)
    seq = cfg.model.seq_length
    scorer, model = _scorer(cfg, tok["vocab_size"], checkpoint=checkpoint, init=init, hf=hf, name=name)
    result = _run_scorer(scorer, model, lambda s: perplexity.evaluate_perplexity(s, prefixes, seq, limit, batch_size))
    model["fingerprint"] = _fingerprint(cfg, tok, hf)
    out = Path(output) if output else cfg.run_path / "eval" / f"perplexity-{model['name']}.json"
    return write_results(out, model, "heldout_perplexity", result, perplexity.settings(seq, limit, batch_size)), out


def evaluate_harness(cfg, hf, tasks: list[str], *, checkpoint=None, hf_config_from=None, include_path=None,
                     limit=None, num_fewshot=None, batch_size=1, name=None,
                     output_dir=None) -> list[tuple[dict, "Path"]]:
    """lm-evaluation-harness ``tasks`` on the Hugging Face folder ``hf``, or (``hf`` None) on ``checkpoint``
    (default: the run's train/checkpoints) exported to a temporary Hugging Face folder under the output folder
    (:mod:`megatron_ipt.evaluate.hf_export`; float32 on CPU; removed afterwards, also on error), its reference
    config and tokenizer from ``hf_config_from`` / ``model.hf_config`` / the converted checkpoint's ``hf/``, else
    written from the experiment's model config and Hugging Face tokenizer (``hf_export.preset_reference``). One
    results file per task (and group) under ``output_dir`` (default RUN_DIR/eval), ``harness-TASK-NAME.json``;
    for a checkpoint the record's model is the checkpoint (path, iteration, fingerprint), not the temporary
    folder. Returns [(record, path)]."""
    import importlib.metadata
    from pathlib import Path

    from megatron_ipt.errors import IptError
    from megatron_ipt.evaluate import harness, hf_export
    from megatron_ipt.evaluate.run import write_results
    from megatron_ipt.pipeline import stage_path

    if not tasks:
        raise IptError("--harness needs at least one task name")
    device = "cuda" if cfg.train.device == "cuda" else "cpu"
    folder = Path(output_dir) if output_dir else cfg.run_path / "eval"
    try:
        tok = _tokenizer(cfg)
    except IptError:  # a harness run needs no tokenized data; the folder carries its own tokenizer
        tok = None
    run = dict(tasks=tasks, include_path=include_path, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
               device=device)
    export = None
    if hf:
        results = harness.run_harness(hf, **run)
        model = {"kind": "hf", "path": str(hf), "name": name or Path(hf).name,
                 "fingerprint": _fingerprint(cfg, tok or {"path": str(hf)}, hf)}
    else:
        ckpt = Path(checkpoint) if checkpoint else stage_path(cfg, "train") / "checkpoints"
        if not ckpt.exists():
            raise IptError(f"{ckpt}: no checkpoint to evaluate (train first, or pass --checkpoint / --hf)")
        from megatron_ipt.training.presets import resolve_preset

        # None: written from the experiment's model config and tokenizer, as every other `ipt eval` reads it
        reference = hf_export.reference_folder(ckpt, hf_config_from, cfg.model.hf_config, required=False)
        manager = harness.task_manager(tasks, include_path)  # unknown tasks fail before the export
        tokenizer_dir = (tok or {}).get("path") or cfg.tokenize.tokenizer
        vocab_size = (tok or {}).get("vocab_size") or (_vocab_size(tokenizer_dir) if reference is None else None)
        with hf_export.exported(ckpt, reference=reference, work_dir=folder, tokenizer_dir=tokenizer_dir,
                                dtype="float32" if device == "cpu" else None, preset=resolve_preset(cfg.model),
                                vocab_size=vocab_size, trust=cfg.train.trust_checkpoint) as export:
            results = harness.run_harness(export.folder, **run, manager=manager)
        model = {"kind": "megatron", "path": str(ckpt), "name": name or cfg.name,
                 "fingerprint": {**_fingerprint(cfg, tok or {"path": str(tokenizer_dir or reference)}),
                                 "checkpoint": str(export.checkpoint),
                                 "export_hf_config": str(reference) if reference else "model config",
                                 "export_hf_config_sha256": export.reference_config_sha256}}
        if export.iteration is not None:
            model["iteration"] = export.iteration
    common = {"harness": f"lm-eval {importlib.metadata.version('lm-eval')}", "tasks": tasks, "limit": limit,
              "num_fewshot": num_fewshot, "batch_size": batch_size, "device": device,
              "include_path": str(include_path) if include_path else None}
    if export is not None:
        common["export"] = {"tool": "megatron_ipt.hf.convert.megatron_to_hf", "dtype": export.dtype,
                            "hf_config_from": str(export.reference) if export.reference else
                            "the experiment's model config and tokenizer"}
    done = []
    for task, metrics, n, settings in harness.records(results):
        out = folder / f"harness-{task.replace('/', '_')}-{model['name']}.json"
        done.append((write_results(out, model, task, {"metrics": metrics, "n": n}, {**common, **settings}), out))
    if not done:
        raise harness.HarnessError(f"lm-eval returned no results for {tasks}")
    return done
