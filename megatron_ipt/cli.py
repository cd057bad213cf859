"""The ``ipt`` command: every stage of Instruction Pre-Training, alone or all together.

    ipt run examples/quickstart.yaml                 # corpus -> synthesize -> format -> tokenize -> train
    ipt synthesize examples/quickstart.yaml --set synthesis.max_new_tokens=64
    ipt train examples/quickstart.yaml --set train.train_iters=50 --force
    ipt sft examples/paper/quickstart-sft.yaml       # instruction tuning (sft section)
    ipt config examples/quickstart.yaml              # print the resolved config

Imports of torch, transformers and megatron-core happen inside the stages, so ``--help`` is instant.
Errors the user can fix (config, missing inputs, bad data) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

STAGE_HELP = {
    "corpus": "Read the raw corpus (corpus section) and hold out a share of documents for evaluation.",
    "synthesize": "Generate instruction-response pairs per document with an LLM (synthesis section).",
    "format": "Render instruction-augmented texts: chains of documents, each followed by its pairs under the template "
              "bank (modes, pair families, inversion), plus general instructions mixed in at a token ratio (format section).",
    "tokenize": "Tokenize raw and augmented texts into Megatron indexed datasets, PREFIX.bin/.idx, one EOD per document.",
    "train": "Train with Megatron-Core on the raw : instruction-augmented blend; evaluates held-out loss before and after.",
    "sft": "Instruction-tune with Megatron-Core on JSONL conversations (sft section), loss on assistant tokens only, "
           "usually from sft.init_from (a continually pre-trained checkpoint); not part of ipt run.",
}

# Modules that register a file-level tool as a subcommand (light imports only at module level).
TOOL_MODULES = ("megatron_ipt.hf.residual_cli", "megatron_ipt.hf.convert_cli", "megatron_ipt.evaluate.cli",
                "megatron_ipt.launch.nemo", "megatron_ipt.launch.sweep", "megatron_ipt.training.plan")

EPILOG = """\
Every stage reads the previous stage's folder under the run folder (run_dir, default runs/<name>) and writes
its own with a manifest.json. Finished stages are reused on rerun; --force redoes the named stage.
Override any config key with --set section.key=value (repeatable), e.g. --set train.train_iters=50.
"""


STAGE_EPILOG = {
    "tokenize": """
Standalone (no experiment file): give --input, --tokenizer and --output-prefix instead of CONFIG, e.g.
  ipt tokenize --input 'corpus/*.jsonl.zst' --tokenizer Meta-Llama-3-8B --output-prefix data/corpus --workers 16
  ipt tokenize --input 'corpus/part-07.jsonl.zst' ... --no-merge    # one Slurm array task per file
  ipt tokenize --input 'corpus/*.jsonl.zst' ... --merge-only        # then merge the finished shards
""",
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="experiment YAML (e.g. examples/quickstart.yaml), or a run folder (its "
                   "resolved config.yaml, written by every stage command); defaults when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.train_iters=50 (repeatable)")
    p.add_argument("--force", action="store_true", help="redo the stage(s) even if a finished output exists")


def _add_resource_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-resource-check", dest="resource_check", action="store_false",
                   help="start training even when parallel.nproc_per_node exceeds this machine's CPU cores or the "
                   "CPU memory estimate (ipt plan) exceeds the memory available (checked before any stage starts)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipt",
        description="megatron-ipt: Instruction Pre-Training with Megatron-Core. Turn raw text into instruction-augmented "
        "pre-training data and continually pre-train on it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="Run every stage in order, reusing finished ones, and print a summary.",
                       description="Run corpus, synthesize, format, tokenize and train in order. " + EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p)
    _add_resource_check(p)
    p.add_argument("--until", choices=["corpus", "synthesize", "format", "tokenize", "train"], default="train",
                   help="stop after this stage")
    for name, text in STAGE_HELP.items():
        p = sub.add_parser(name, help=text, description=text + "\n\n" + EPILOG + STAGE_EPILOG.get(name, ""),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_common(p)
        if name == "tokenize":
            from data_prep.tokenize import add_arguments

            add_arguments(p, required=False)
        if name == "synthesize":
            _add_shard_arguments(p)
        if name in ("train", "sft"):
            _add_resource_check(p)
        if name == "train":
            p.add_argument("--prepare-data", action="store_true",
                           help="only build the blend's index caches (one process, then exit), as Megatron-LM's "
                           "tools/prepare_cache.py: run it once before a multi-node job, whose ranks then only read them")
    p = sub.add_parser("config", help="Print the resolved config (defaults, file and --set overrides) as YAML.",
                       description="Print the resolved config (defaults, file and --set overrides) as YAML, or, with "
                       "--reference, write the configuration reference (every key, its type, default and description).")
    _add_common(p)
    p.add_argument("--reference", nargs="?", const="docs/configuration.md", default=None, metavar="PATH",
                   help="write the Markdown configuration reference generated from the config models to PATH "
                   "(default: docs/configuration.md; '-': print it) instead of printing a config")
    # Tools that work on files rather than on an experiment's stages: each module adds its own subcommand
    # with ``add_parser(sub)`` and sets ``handler`` (args -> exit status) through ``set_defaults``.
    for module in TOOL_MODULES:
        importlib.import_module(module).add_parser(sub)
    return parser


def _add_shard_arguments(p) -> None:
    """``ipt synthesize`` options for sharded runs (data_prep/shards.py)."""
    env = os.environ
    p.add_argument("--num-shards", type=int, default=int(env["SLURM_ARRAY_TASK_COUNT"]) if "SLURM_ARRAY_TASK_COUNT" in env else None,
                   help="split the documents into N shards by a stable hash of their id (default: $SLURM_ARRAY_TASK_COUNT)")
    p.add_argument("--shard-index", type=int, default=int(env["SLURM_ARRAY_TASK_ID"]) if "SLURM_ARRAY_TASK_ID" in env else None,
                   help="synthesize only shard I (0-based; default: $SLURM_ARRAY_TASK_ID); a finished shard is skipped")
    p.add_argument("--merge", action="store_true",
                   help="validate all --num-shards shards against their manifests and write synthesis/pairs.jsonl")


def _shard_options(args) -> tuple[int, int | None]:
    from megatron_ipt.errors import IptError

    if not args.num_shards:
        raise IptError("ipt synthesize --merge needs --num-shards N")
    if args.shard_index is None and not args.merge:
        raise IptError("ipt synthesize --num-shards needs --shard-index I (or --merge)")
    return args.num_shards, args.shard_index


def _write_reference(path: str) -> int:
    """``ipt config --reference PATH``: write docs/configuration.md (generated from the config models'
    field descriptions, :mod:`megatron_ipt.config_reference`) to PATH, or print it when PATH is '-'.

    Raises IptError (exit 2) when PATH's folder does not exist (e.g. run outside the repository root)."""
    from pathlib import Path

    from megatron_ipt.config_reference import reference_markdown

    text = reference_markdown()
    if path == "-":
        print(text, end="")
        return 0
    if not Path(path).parent.is_dir():
        from megatron_ipt.errors import IptError

        raise IptError(f"--reference: no folder {Path(path).parent}/ here (run it in the repository root, or give a PATH)")
    Path(path).write_text(text)
    print(f"ipt config: wrote {path}")
    return 0


def _reading_comprehension(cfg) -> dict | None:
    """Held-out reading comprehension (0-shot answer NLL) of the untrained and the trained model, for the
    summary; None (with a note) when the run has no held-out pairs. Results go to RUN_DIR/eval/."""
    from megatron_ipt.errors import IptError
    from megatron_ipt.evaluate.cli import evaluate_experiment

    try:
        before, _ = evaluate_experiment(cfg, init=True)
        after, _ = evaluate_experiment(cfg)
    except IptError as e:
        print(f"ipt run: reading-comprehension scoring skipped: {e}", file=sys.stderr)
        return None
    return {"before": before["metrics"]["answer_nll"], "after": after["metrics"]["answer_nll"], "n": after["n"]}


def summary_table(results, rc: dict | None = None) -> "Table":
    """A rich table of what the run produced, read from the stage manifests (plus the reading-comprehension
    score before and after training when given)."""
    from rich.table import Table

    table = Table(title="megatron-ipt run summary", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("value", justify="right")

    def row(k, v):
        table.add_row(k, v if isinstance(v, str) else f"{v:,}" if isinstance(v, int) else f"{v:.4g}")

    if "corpus" in results:
        c = results["corpus"].manifest["counts"]
        row("documents (train / held-out)", f"{c['train_documents']} / {c['heldout_documents']}")
    if "synthesize" in results:
        c = results["synthesize"].manifest["counts"]
        row("pairs kept", c["pairs_kept"])
        row("pairs dropped", sum(c["pairs_dropped"].values()))
        for reason, n in sorted(c["pairs_dropped"].items()):
            row(f"  dropped: {reason}", n)
        row("documents with pairs", f"{c['documents_with_pairs']} / {c['documents']}")
    if "tokenize" in results:
        for name, c in results["tokenize"].manifest["counts"].items():
            row(f"tokens {name}", c["tokens"])
    if "train" in results:
        m = results["train"].manifest
        t = m.get("train", {})
        for label, key in (("iterations", "iterations"), ("tokens trained", "tokens_trained"),
                           ("tokens/s", "tokens_per_s"), ("ms/iteration", "ms_per_iteration"),
                           ("final train loss", "final_train_loss"), ("parameters", "parameters")):
            if t.get(key) is not None:
                row(label, t[key])
        for name, loss in m.get("losses", {}).items():
            if loss.get("before") is not None and loss.get("after") is not None:
                row(f"held-out loss {name}", f"{loss['before']:.3f} -> {loss['after']:.3f}")
    if rc is not None:
        row(f"held-out RC answer NLL ({rc['n']} pairs)", f"{rc['before']:.3f} -> {rc['after']:.3f}")
    return table


def _quiet_known_warnings() -> None:
    """Silence megatron-core's import-time notices about optional GPU packages (TE, apex) and a config notice."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed")
    warnings.filterwarnings("ignore", message=r"full scope is deprecated")


def _preflight(args, cfg) -> None:
    """Check the inputs, device and resources of the stages this command runs before the first one starts
    (:mod:`megatron_ipt.preflight`); not in the processes torchrun started (their launcher checked)."""
    from megatron_ipt import pipeline, preflight

    if "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ:
        return
    if args.command == "run":
        stages = list(pipeline.STAGES[: pipeline.STAGES.index(args.until) + 1])
    else:
        stages = [args.command]
    resources = getattr(args, "resource_check", True) and not getattr(args, "prepare_data", False)
    preflight.check(cfg, stages, force=args.force, resources=resources)


def _run_stages(args, cfg) -> None:
    """Run the command's stage(s); then (also when training stopped early with a checkpoint) rank 0 writes the run's
    resolved config, which later commands on the run read (:mod:`megatron_ipt.run_config`). Not after a failure: a
    second run refused by a stage lock must not replace the running one's config."""
    from megatron_ipt import pipeline
    from megatron_ipt.errors import TrainingStopped

    try:
        if args.command == "run":
            results = pipeline.run_all(cfg, force=args.force, until=args.until)
            from rich.console import Console

            rc = _reading_comprehension(cfg) if "train" in results else None
            Console().print(summary_table(results, rc))
            Console().print(f"artifacts: {cfg.run_path}/ (each stage folder has a manifest.json)")
        elif args.command == "train" and args.prepare_data:
            pipeline.prepare_train_data(cfg, force=args.force)
        elif args.command == "synthesize" and (args.num_shards or args.merge):
            num_shards, shard_index = _shard_options(args)
            pipeline.run_synthesize_sharded(cfg, num_shards, shard_index, merge=args.merge, force=args.force)
        else:
            pipeline.RUNNERS[args.command](cfg, force=args.force)
    except TrainingStopped:
        if int(os.environ.get("RANK", "0")) == 0:
            pipeline.save_resolved_config(cfg)
        raise
    if int(os.environ.get("RANK", "0")) == 0:
        pipeline.save_resolved_config(cfg)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_known_warnings()
    from megatron_ipt.config import resolved
    from megatron_ipt.run_config import load_for_run
    from megatron_ipt.errors import IptError

    known_errors: tuple[type[BaseException], ...] = (IptError,)
    try:
        from data_prep.errors import DataPrepError

        known_errors += (DataPrepError,)
    except ImportError:  # pragma: no cover - data side not installed
        pass
    try:
        if getattr(args, "handler", None) is not None:
            return args.handler(args)
        if args.command == "tokenize" and (args.input or args.tokenizer or args.output_prefix):
            if args.config or args.overrides:
                raise IptError("ipt tokenize: give either an experiment file (the pipeline stage) or --input/"
                               "--tokenizer/--output-prefix (standalone), not both")
            if not (args.input and args.tokenizer and args.output_prefix):
                raise IptError("standalone ipt tokenize needs --input, --tokenizer and --output-prefix")
            from data_prep.tokenize import run as tokenize_standalone

            return tokenize_standalone(args)
        if args.command == "config" and args.reference is not None:
            return _write_reference(args.reference)
        cfg = load_for_run(args.config, args.overrides, args.command)
        if args.command == "config":
            import yaml

            print(yaml.safe_dump(resolved(cfg), sort_keys=False), end="")
            return 0
        _preflight(args, cfg)
        _run_stages(args, cfg)
        return 0
    except known_errors as e:
        code = getattr(e, "exit_code", 2)
        from megatron_ipt.preflight import PreflightError

        for line in str(e).splitlines() if isinstance(e, PreflightError) else [str(e)]:
            print(f"ipt {args.command}: {'error: ' if code == 2 else ''}{line}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(f"ipt {args.command}: interrupted; finished stages are kept, rerun to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
