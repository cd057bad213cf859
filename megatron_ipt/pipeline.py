"""The stages of an experiment, each reading the previous stage's folder and writing its own.

Run folder layout (``cfg.run_path``)::

    corpus/       documents.jsonl                      {"id", "split", "text"}
    synthesis/    pairs.jsonl                          {"id", "split", "text", "pairs", "raw_output", "dropped"[, "round", "prev_id"]}
    formatted/    train_raw / train_ipt / heldout_raw / heldout_pairs [/ train_general] .jsonl   {"id", "text"}
    tokenized/    the same names as Megatron indexed datasets (.bin/.idx)
    train/        checkpoints/, metrics.jsonl, run.json (what defines the run: megatron_ipt.run_identity)
    sft/          data/ (train, valid: tokens + loss mask, data_prep.sft), checkpoints/, metrics.jsonl   (ipt sft)
    config.yaml   the resolved experiment config (config.resolved.yaml when a config.yaml there is not ipt's)

Each folder ends with a ``manifest.json`` (see :mod:`megatron_ipt.manifest`). A stage whose manifest
fingerprint matches its config and inputs is skipped on rerun; data stages are written to a temporary
folder and renamed when complete, replacing only a folder that holds their own finished manifest. Each stage
holds an exclusive lock (``RUN/.FOLDER.lock``, :func:`stage_lock`) while it runs, so a second run of it on the
same run folder fails at once. Heavy imports (torch, transformers, megatron-core) happen inside the
stage functions, so ``ipt --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


from data_prep.atomic import write_jsonl
from megatron_ipt import run_identity
from megatron_ipt.config import ExperimentConfig, resolved
from megatron_ipt.errors import LaunchError, TrainingStopped
from megatron_ipt.manifest import atomic_dir, check_replaceable, atomic_write_text, fingerprint, is_done, read_manifest, write_manifest

STAGES = ("corpus", "synthesize", "format", "tokenize", "train")
STAGE_DIRS = {"corpus": "corpus", "synthesize": "synthesis", "format": "formatted", "tokenize": "tokenized", "train": "train",
              "sft": "sft"}
DATASETS = ("train_raw", "train_ipt", "heldout_raw", "heldout_pairs")
GENERAL = "train_general"  # written by format (and tokenized) only when general instructions are mixed in


def _datasets(folder: Path) -> tuple[str, ...]:
    """The text sets the format stage wrote in ``folder``: the four always, ``train_general`` when present."""
    return DATASETS + ((GENERAL,) if (folder / f"{GENERAL}.jsonl").is_file() else ())


@dataclass
class StageResult:
    stage: str
    path: Path
    manifest: dict
    skipped: bool


def stage_path(cfg: ExperimentConfig, stage: str) -> Path:
    return cfg.run_path / STAGE_DIRS[stage]


def stage_lock(cfg: ExperimentConfig, stage: str):
    """The exclusive lock of a stage folder (``RUN/.FOLDER.lock``, :func:`data_prep.locks.exclusive_lock`): a
    second run of the same stage on the same run folder fails at once (LockHeld, exit 2) naming the holder."""
    from data_prep.locks import exclusive_lock

    folder = stage_path(cfg, stage)
    return exclusive_lock(folder.with_name(f".{folder.name}.lock"), f"{stage} stage folder {folder}")


def _locked(stage: str):
    """Run the decorated stage function while holding :func:`stage_lock` (the reuse check included)."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(cfg: ExperimentConfig, *args, **kwargs):
            with stage_lock(cfg, stage):
                return fn(cfg, *args, **kwargs)
        return run
    return wrap


def _log(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(msg)  # a log line is never folded (paths stay whole)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _upstream(cfg: ExperimentConfig, stage: str) -> dict:
    return read_manifest(stage_path(cfg, stage), stage)


def _skip(cfg: ExperimentConfig, stage: str, fp: str, force: bool) -> StageResult | None:
    path = stage_path(cfg, stage)
    if not force and is_done(path, fp):
        _log(f"[dim]{stage}: up to date in {path}, reusing it[/dim]")
        return StageResult(stage, path, read_manifest(path, stage), True)
    if stage not in ("train", "sft"):  # training folders are moved aside instead (_claim_training_dir)
        check_replaceable(path, stage)  # refused before any work, naming the folder
    return None


def save_resolved_config(cfg: ExperimentConfig) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` (what a relaunched process and later commands on the run
    read), or to ``run_dir/config.resolved.yaml`` when a ``config.yaml`` there is not ipt's
    (:func:`megatron_ipt.run_config.save`); returns the path."""
    from megatron_ipt import run_config

    return run_config.save(cfg)


# ---------------------------------------------------------------------------------------------- stages


@_locked("corpus")
def run_corpus(cfg: ExperimentConfig, force: bool = False) -> StageResult:
    """Read the raw corpus and split it into train and held-out documents.

    The fingerprint covers the corpus section and the input files' paths, sizes and modification times
    (:func:`data_prep.corpus.inputs_stamp`), so an added or edited input file redoes the stage."""
    from data_prep.corpus import inputs_stamp, read_corpus
    from data_prep.errors import DataPrepError

    path = stage_path(cfg, "corpus")
    try:
        stamp = inputs_stamp(cfg.corpus)
    except DataPrepError as e:  # inputs deleted after the stage finished: keep using what it wrote
        if force or not (path / "manifest.json").is_file():
            raise
        _log(f"[yellow]corpus: {e}; reusing the finished corpus in {path}[/yellow]")
        return StageResult("corpus", path, read_manifest(path, "corpus"), True)
    fp = fingerprint("corpus", cfg.corpus.model_dump(mode="json"), *([stamp] if stamp else []))
    if done := _skip(cfg, "corpus", fp, force):
        return done
    started = time.time()
    documents, counts = read_corpus(cfg.corpus)
    with atomic_dir(stage_path(cfg, "corpus"), "corpus") as out:
        write_jsonl(out / "documents.jsonl", documents)
        manifest = write_manifest(out, stage="corpus", fingerprint=fp, config=resolved(cfg), outputs=["documents.jsonl"],
                                  counts=counts, started=started, inputs_stamp=stamp)
    _log(f"corpus: {counts['train_documents']} train + {counts['heldout_documents']} held-out documents")
    return StageResult("corpus", stage_path(cfg, "corpus"), manifest, False)


def synthesis_fingerprint(cfg: ExperimentConfig) -> str:
    """The synthesize stage's fingerprint: its config section, with ``dtype: auto`` resolved for the transformers
    engine (the same config on a machine that resolves it otherwise synthesizes anew; ``auto`` resolving to
    ``float32`` matches a run that wrote ``float32``), and the corpus stage's fingerprint."""
    section = cfg.synthesis.model_dump(mode="json")
    if section["engine"] == "transformers" and section["dtype"] == "auto":
        from data_prep.engines import resolve_device, resolve_dtype

        section["dtype"] = resolve_dtype("auto", resolve_device(cfg.synthesis.device))
    return fingerprint("synthesize", section, _upstream(cfg, "corpus")["fingerprint"])


def synthesis_shard_dir(cfg: ExperimentConfig, fp: str | None = None) -> Path:
    """``RUN_DIR/synthesis.shards/<fingerprint[:16]>/``: the shards and journals of this synthesis (another config
    or corpus gets another folder)."""
    return cfg.run_path / "synthesis.shards" / (fp or synthesis_fingerprint(cfg))[:16]


def _synthesis_journal(cfg: ExperimentConfig, fp: str, src: Path, shard_index: int, num_shards: int, force: bool):
    """The journal of shard ``shard_index`` of ``num_shards`` (an unsharded run is shard 0 of 1), keyed by the
    stage fingerprint, the SHA-256 of the input documents and the synthesizer folder's file stamp (names, sizes,
    modification times: :func:`data_prep.models.files_stamp`), so that a journal of other inputs, or of weights
    since rewritten in place, is discarded; emptied first when ``force``. Resolves the synthesizer (converting
    the named SmolLM2 on first use, as the stage would)."""
    from data_prep.models import files_stamp, resolve_model
    from data_prep.shards import ShardJournal, journal_path
    from megatron_ipt.manifest import sha256_file

    weights = files_stamp(resolve_model(cfg.synthesis.model))
    journal = ShardJournal(journal_path(synthesis_shard_dir(cfg, fp), shard_index, num_shards),
                           key=f"{fp}:{sha256_file(src)}:{weights}")
    if force:
        journal.remove()
    return journal


def _log_journal(journal, counts: dict, what: str) -> None:
    if journal.discarded:
        _log(f"[yellow]synthesize: discarded a stale journal: {journal.discarded}[/yellow]")
    if counts.get("resumed_prompts"):
        _log(f"synthesize: {what}: {counts['resumed_prompts']} prompts resumed from its journal")


def synthesis_line(counts: dict) -> str:
    """One line of a synthesis result: ``synthesize: 51 pairs kept from 70 documents (50 with pairs); 59 dropped:
    44 no_answer_tag, 9 duplicate_question, ...`` (reasons by count)."""
    dropped = counts.get("pairs_dropped", {})
    line = (f"synthesize: {counts['pairs_kept']} pairs kept from {counts['documents']} documents "
            f"({counts.get('documents_with_pairs', '?')} with pairs)")
    if dropped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0])))
        line += f"; {sum(dropped.values())} dropped: {reasons}"
    return line


@_locked("synthesize")
def run_synthesize(cfg: ExperimentConfig, force: bool = False) -> StageResult:
    """Synthesize instruction-response pairs for every document (train and held-out).

    Finished generation batches are journaled as for shard 0 of 1 (``data_prep.shards.ShardJournal`` under
    ``RUN_DIR/synthesis.shards/<fingerprint>/``), so a rerun after a crash or ``kill -9`` generates only the
    batches not in the journal and writes the same ``pairs.jsonl``; the journal is deleted once the stage folder
    is in place (``force`` deletes it first).
    """
    fp = synthesis_fingerprint(cfg)
    if done := _skip(cfg, "synthesize", fp, force):
        return done
    from data_prep.synthesize import synthesize_documents

    started = time.time()
    src = stage_path(cfg, "corpus") / "documents.jsonl"
    documents = _read_jsonl(src)
    journal = _synthesis_journal(cfg, fp, src, 0, 1, force)
    with atomic_dir(stage_path(cfg, "synthesize"), "synthesize") as out:
        counts = synthesize_documents(cfg.synthesis, documents, out / "pairs.jsonl", journal=journal)
        manifest = write_manifest(out, stage="synthesize", fingerprint=fp, config=resolved(cfg), inputs={"documents": src},
                                  outputs=["pairs.jsonl"], counts=counts, started=started)
    journal.remove()
    for folder in (journal.path.parent, journal.path.parent.parent):  # synthesis.shards/<fp>/ and synthesis.shards/
        try:
            folder.rmdir()  # only when empty: shards of a sharded run stay
        except OSError:
            break
    _log_journal(journal, counts, "unsharded run")
    _log(synthesis_line(counts))
    return StageResult("synthesize", stage_path(cfg, "synthesize"), manifest, False)


def run_synthesize_sharded(cfg: ExperimentConfig, num_shards: int, shard_index: int | None = None,
                           merge: bool = False, force: bool = False) -> StageResult | None:
    """Synthesize one shard (``shard_index`` of ``num_shards``) and/or merge all shards into the stage output.

    Shards live in ``RUN_DIR/synthesis.shards/<fingerprint>/`` (``data_prep.shards``); a finished shard is
    skipped on rerun unless ``force``; an unfinished one resumes after the last batch in its journal. With ``merge``, every shard is validated against its manifest and
    ``synthesis/pairs.jsonl`` + ``manifest.json`` are written as by :func:`run_synthesize`. Raises
    DataPrepError naming a missing or corrupt shard.
    """
    from data_prep.locks import exclusive_lock

    shard_dir = synthesis_shard_dir(cfg)
    with contextlib.ExitStack() as locks:  # a shard task locks its shard; the merge locks the stage folder
        if shard_index is not None:
            locks.enter_context(exclusive_lock(shard_dir / f".shard-{shard_index:05d}-of-{num_shards:05d}.lock",
                                               f"synthesis shard {shard_index} of {num_shards} in {shard_dir}"))
        if merge:
            locks.enter_context(stage_lock(cfg, "synthesize"))
        return _synthesize_sharded(cfg, num_shards, shard_index, merge, force)


def _synthesize_sharded(cfg: ExperimentConfig, num_shards: int, shard_index: int | None, merge: bool,
                        force: bool) -> StageResult | None:
    from data_prep.shards import merge_shards, select_shard, shard_finished, write_shard

    fp = synthesis_fingerprint(cfg)
    if merge and (done := _skip(cfg, "synthesize", fp, force)):
        return done
    src = stage_path(cfg, "corpus") / "documents.jsonl"
    documents = _read_jsonl(src)
    shard_dir = synthesis_shard_dir(cfg, fp)
    if shard_index is not None:
        if not force and shard_finished(shard_dir, shard_index, num_shards):
            _log(f"[dim]synthesize: shard {shard_index} of {num_shards} already finished in {shard_dir}[/dim]")
        else:
            from data_prep.synthesize import synthesize_documents

            docs = select_shard(documents, shard_index, num_shards)
            tmp = shard_dir / f".shard-{shard_index:05d}-of-{num_shards:05d}.work.jsonl"
            journal = _synthesis_journal(cfg, fp, src, shard_index, num_shards, force)  # resume inside the shard
            counts = synthesize_documents(cfg.synthesis, docs, tmp, journal=journal) if docs else {"documents": 0}
            records = _read_jsonl(tmp) if docs else []
            write_shard(shard_dir, shard_index, num_shards, records, counts)
            tmp.unlink(missing_ok=True)
            journal.remove()
            _log_journal(journal, counts, f"shard {shard_index} of {num_shards}")
            _log(f"synthesize: shard {shard_index} of {num_shards} finished ({len(docs)} documents)")
    if not merge:
        return None
    started = time.time()
    with atomic_dir(stage_path(cfg, "synthesize"), "synthesize") as out:
        counts = merge_shards(shard_dir, num_shards, documents, out / "pairs.jsonl")
        recs = _read_jsonl(out / "pairs.jsonl")
        counts["documents_with_pairs"] = sum(bool(r.get("pairs")) for r in recs)
        counts["pairs_kept"] = sum(len(r.get("pairs", [])) for r in recs)
        dropped: dict = {}
        for r in recs:
            for k, v in (r.get("dropped") or {}).items():
                dropped[k] = dropped.get(k, 0) + v
        counts["pairs_dropped"] = dict(sorted(dropped.items()))
        counts["chained_documents"] = sum(r.get("prev_id") is not None for r in recs)
        counts["chunked_documents"] = sum(r.get("chunks", 1) > 1 for r in recs)
        manifest = write_manifest(out, stage="synthesize", fingerprint=fp, config=resolved(cfg), inputs={"documents": src},
                                  outputs=["pairs.jsonl"], counts=counts, started=started)
    _log(f"synthesize: merged {num_shards} shards, {counts['pairs_kept']} pairs from {counts['documents']} documents")
    return StageResult("synthesize", stage_path(cfg, "synthesize"), manifest, False)


@_locked("format")
def run_format(cfg: ExperimentConfig, force: bool = False) -> StageResult:
    """Build instruction-augmented texts and the raw / held-out text sets."""
    from hashlib import sha256

    synth = _upstream(cfg, "synthesize")
    fc = cfg.format
    general = Path(fc.general_instructions) if fc.general_instructions else None
    fp = fingerprint("format", fc.model_dump(mode="json", exclude={"workers"}), synth["fingerprint"],
                     sha256(general.read_bytes()).hexdigest() if general and general.is_file() else None,
                     cfg.tokenize.tokenizer, cfg.synthesis.model, *([GENERAL] if general else []))
    if done := _skip(cfg, "format", fp, force):
        return done
    from data_prep.format import FormatOptions, format_documents, summary_lines
    from data_prep.instructions import InstructionFields, read_instructions
    from data_prep.mixing import token_counter

    started = time.time()
    src = stage_path(cfg, "synthesize") / "pairs.jsonl"
    opts = FormatOptions(mode_weights=dict(fc.mode_weights), dialog_share_few_pairs=fc.dialog_share_few_pairs,
                         inversion=fc.inversion, read_wrapper=fc.read_wrapper, lead_in=fc.lead_in,
                         group_consecutive=fc.group_consecutive, raw_replay=fc.raw_replay)
    outputs, counts = format_documents(
        _read_jsonl(src), seed=fc.seed, options=opts, workers=fc.workers, count_tokens=token_counter(tokenizer_path(cfg)),
        general=read_instructions(general, InstructionFields(**fc.general_fields)) if general else None,
        general_ratio=fc.general_ratio, general_max_passes=fc.general_max_passes)
    inputs = {"pairs": src, **({"general_instructions": general} if general else {})}
    names = DATASETS + ((GENERAL,) if GENERAL in outputs else ())
    with atomic_dir(stage_path(cfg, "format"), "format") as out:
        for name in names:
            write_jsonl(out / f"{name}.jsonl", outputs[name])
        manifest = write_manifest(out, stage="format", fingerprint=fp, config=resolved(cfg), inputs=inputs,
                                  outputs=[f"{n}.jsonl" for n in names], counts=counts, started=started)
    for line in summary_lines(counts):
        _log(line)
    return StageResult("format", stage_path(cfg, "format"), manifest, False)


def tokenizer_path(cfg: ExperimentConfig) -> Path:
    """The tokenizer folder: ``tokenize.tokenizer`` if set, else the synthesizer model's folder."""
    if cfg.tokenize.tokenizer:
        return Path(cfg.tokenize.tokenizer)
    from data_prep.models import resolve_model

    return resolve_model(cfg.synthesis.model)


@_locked("tokenize")
def run_tokenize(cfg: ExperimentConfig, force: bool = False) -> StageResult:
    """Tokenize the four text sets into Megatron indexed datasets, one EOD per document."""
    fmt = _upstream(cfg, "format")
    fp = fingerprint("tokenize", cfg.tokenize.model_dump(mode="json", exclude={"workers"}), cfg.synthesis.model,
                     fmt["fingerprint"])
    if done := _skip(cfg, "tokenize", fp, force):
        return done
    from data_prep.tokenize import TokenizeOptions, tokenize_corpus

    started = time.time()
    tok_path = tokenizer_path(cfg)
    opts = TokenizeOptions(append_eod=cfg.tokenize.append_eod, append_bos=cfg.tokenize.append_bos,
                           bad_input=cfg.tokenize.bad_input, workers=cfg.tokenize.workers,
                           bpe_backend=cfg.tokenize.bpe_backend)
    src_dir = stage_path(cfg, "format")
    names = _datasets(src_dir)
    counts = {}
    with atomic_dir(stage_path(cfg, "tokenize"), "tokenize") as out:
        for name in names:
            m = tokenize_corpus([src_dir / f"{name}.jsonl"], out / name, tok_path, opts, log=lambda _: None)
            counts[name] = {"documents": m["documents"], "tokens": m["tokens"], "skipped": m["skipped"]}
        tok_info = {k: m["tokenizer"][k] for k in ("path", "kind", "vocab_size", "eod_id", "bos_id", "dtype", "fingerprint")}
        tok_info["bpe_backend"] = m["tokenizer"].get("bpe_backend")
        manifest = write_manifest(out, stage="tokenize", fingerprint=fp, config=resolved(cfg),
                                  inputs={n: src_dir / f"{n}.jsonl" for n in names},
                                  outputs=[f"{n}.{ext}" for n in names for ext in ("bin", "idx")],
                                  counts=counts, tokenizer=tok_info, started=started)
    _log("tokenize: " + ", ".join(f"{n} {c['tokens']:,} tokens" for n, c in counts.items()))
    return StageResult("tokenize", stage_path(cfg, "tokenize"), manifest, False)


def train_record(cfg: ExperimentConfig, tokenized: dict) -> dict:
    """The train run's record (:func:`megatron_ipt.run_identity.run_record`): ``model``, ``blend``, ``train`` and
    ``parallel`` less what may change between restarts, the tokenized inputs' fingerprint, ``train.train_iters``."""
    sections = {s: getattr(cfg, s).model_dump(mode="json") for s in ("model", "blend", "train", "parallel")}
    return run_identity.run_record(sections, "train.train_iters", cfg.train.train_iters,
                                   {"tokenized": tokenized["fingerprint"]})


def _legacy_train_fingerprint(cfg: ExperimentConfig) -> str:
    """What a train folder of an earlier version stamped in ``train/fingerprint`` (every key of the four sections):
    a folder stamped with this config's is the same run, adopted instead of moved aside."""
    return fingerprint("train", cfg.model.model_dump(mode="json"), cfg.parallel.model_dump(mode="json"),
                       cfg.train.model_dump(mode="json"), cfg.blend.model_dump(mode="json"),
                       _upstream(cfg, "tokenize")["fingerprint"])


def train_fingerprint(cfg: ExperimentConfig, tokenized: dict) -> str:
    """The fingerprint a finished train folder's manifest holds: the run's identity and ``train.train_iters``."""
    return run_identity.stage_fingerprint(train_record(cfg, tokenized))


def prepare_train_data(cfg: ExperimentConfig, force: bool = False) -> dict[str, int]:
    """``ipt train --prepare-data``: the train folder set up as ``run_train`` sets it up, then the blend's index
    caches built in it by this one process (:func:`megatron_ipt.training.train.prepare_data`); the train job that
    follows reads them. Returns the samples per set."""
    out = stage_path(cfg, "train")
    _claim_training_dir(out, train_record(cfg, _upstream(cfg, "tokenize")), force, 0,
                        legacy=_legacy_train_fingerprint(cfg))
    from megatron_ipt.training.train import prepare_data

    counts = prepare_data(cfg, stage_path(cfg, "tokenize"), out)
    _log(f"train: index caches built in {out / 'blend_cache'}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


def run_train(cfg: ExperimentConfig, force: bool = False) -> StageResult:
    """Train on the blend with Megatron-Core; resumes from the stage folder's latest checkpoint.

    The train folder is not replaced atomically (its checkpoints are what a rerun resumes from); the
    manifest, written last, marks it finished. A rerun that changes only what may change between restarts
    (:mod:`megatron_ipt.run_identity`: logging, intervals, the parallel layout, ...) or grows ``train_iters``
    resumes the run in place; a folder left by another run is moved aside to ``train.replaced-<time>`` rather than
    deleted, naming the keys that changed. Rank 0 holds ``RUN/.train.lock`` throughout (a
    launcher holds it for the torchrun workers it starts); a second run raises LockHeld before moving anything.
    """
    record = train_record(cfg, _upstream(cfg, "tokenize"))
    out = stage_path(cfg, "train")
    rank = int(os.environ.get("RANK", "0"))
    with stage_lock(cfg, "train") if rank == 0 else contextlib.nullcontext() as lock:  # rank 0 holds the lock
        if done := _skip(cfg, "train", run_identity.stage_fingerprint(record), force):
            return done
        return _train(cfg, record, out, rank, lock, force)


def _train(cfg: ExperimentConfig, record: dict, out: Path, rank: int, lock: Path | None, force: bool) -> StageResult:
    def validate() -> None:  # a config error must not move the earlier run aside
        from megatron_ipt.training.train import preflight

        preflight(cfg, stage_path(cfg, "tokenize"), int(os.environ.get("WORLD_SIZE", cfg.parallel.nproc_per_node)))

    _claim_training_dir(out, record, force, rank, validate, legacy=_legacy_train_fingerprint(cfg))
    fp = run_identity.stage_fingerprint(record)

    from megatron_ipt.launch.torchrun import needs_relaunch, torchrun_command

    if needs_relaunch(cfg.parallel.nproc_per_node):
        config_file = save_resolved_config(cfg)
        cmd = torchrun_command(["-m", "megatron_ipt.cli", "train", str(config_file)], cfg.parallel.nproc_per_node)
        _log(f"train: launching {cfg.parallel.nproc_per_node} processes: {' '.join(cmd)}")
        from data_prep.locks import lend_to_children

        with lend_to_children(lock) if lock else contextlib.nullcontext():  # the workers' rank 0 holds it through us
            rc = subprocess.call(cmd)
        _raise_if_stopped(out)
        if rc != 0:
            raise LaunchError(f"training processes exited with status {rc}; see their output above")
    else:
        from megatron_ipt.training.train import train_stage

        summary = train_stage(cfg, stage_path(cfg, "tokenize"), out, fp)
        if summary.get("stopped_by") and os.environ.get("IPT_STOPPED_EXIT") == "0":
            # a job script (slurm/train.sbatch) that reads stopped.json itself: a clean stop is a clean exit,
            # so torchrun and srun report no failure
            if rank == 0:
                _log(f"train: stopped at iteration {summary['iterations']} ({summary['stopped_by']}); checkpoint saved")
            return StageResult("train", out, {"counts": summary}, False)
        if summary.get("stopped_by"):
            raise TrainingStopped(f"training stopped at iteration {summary['iterations']} ({summary['stopped_by']}); "
                                  "a checkpoint was saved: rerun the same command to resume")
        if rank != 0:  # rank 0 writes the manifest
            return StageResult("train", out, {"counts": summary}, False)
    return StageResult("train", out, read_manifest(out, "train"), False)


def _claim_training_dir(out: Path, record: dict, force: bool, rank: int,
                        validate: Callable[[], None] | None = None, legacy: str | None = None) -> None:
    """Rank 0, before any process group exists: a folder holding another run (its ``run.json`` names another
    identity or more iterations, it has none, or ``force``) is moved aside to ``NAME.replaced-<time>``, only
    after ``validate()`` (the new run's checks) passed, so a config error leaves the earlier run in place; the line
    says which keys changed (:mod:`megatron_ipt.run_identity`). A run that continues (restartable keys changed, or
    ``train_iters`` grew) keeps its folder and resumes from its latest checkpoint; a grown finished run loses its
    manifest, which the continued run writes again. A folder of an earlier version (no ``run.json``) whose
    ``fingerprint`` stamp equals ``legacy`` is this run too. The new record is written last."""
    if rank != 0:
        return
    diff = ["--force"] if force else run_identity.changes(run_identity.read_record(out), record)
    if diff == ["no run.json"] and legacy and (out / "fingerprint").is_file():
        diff = None if (out / "fingerprint").read_text().strip() == legacy else diff
    if out.exists() and diff is not None:
        if validate is not None:
            validate()
        aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(out, aside)
        _log(f"[yellow]{out.name}: {run_identity.describe_change(out, diff, aside)}[/yellow]")
    out.mkdir(parents=True, exist_ok=True)
    if diff is None and (out / "manifest.json").is_file() and not is_done(out, run_identity.stage_fingerprint(record)):
        (out / "manifest.json").unlink()  # finished with fewer iterations: not finished until the continued run is
        (key, n), = record["iterations"].items()
        _log(f"{out.name}: {out} holds this run, finished with fewer iterations; {key} = {n}: continuing it")
    atomic_write_text(out / run_identity.RECORD, json.dumps(record, indent=1, sort_keys=True) + "\n")


def _raise_if_stopped(out: Path) -> None:
    """Raise TrainingStopped when the (relaunched) training processes saved and stopped early on request."""
    from megatron_ipt.training.train import STOPPED

    if (out / STOPPED).is_file():
        info = json.loads((out / STOPPED).read_text())
        raise TrainingStopped(f"training stopped at iteration {info['iteration']} ({info['reason']}); a checkpoint "
                              "was saved: rerun the same command to resume")


def sft_data(cfg: ExperimentConfig) -> tuple[Path, dict]:
    """Tokenize ``sft.data`` (and ``sft.valid_data``) into ``run_dir/sft_data/{train,valid}`` (tokens + loss mask,
    ``data_prep.sft``; a rerun with the same inputs, tokenizer and settings reuses them, one after a crash
    tokenizes only the input files not finished yet). Returns the folder and
    the data manifests. Under torchrun only rank 0 writes; the others read what it (or the launcher) wrote."""
    from data_prep.sft import SFTFields, SFTOptions, tokenize_conversations
    from megatron_ipt.config import ConfigError
    from megatron_ipt.training.sft import read_data_manifest

    s = cfg.sft
    if not s.data:
        raise ConfigError("sft.data is empty: give the JSONL files (or globs) of training conversations")
    out = cfg.run_path / "sft_data"
    if int(os.environ.get("RANK", "0")) != 0:
        return out, {name: read_data_manifest(out, name) for name in ("train", "valid")[: 1 + bool(s.valid_data)]}
    tok = Path(s.tokenizer) if s.tokenizer else tokenizer_path(cfg)
    opts = SFTOptions(template=s.template, fields=SFTFields(**s.fields), bad_input=s.bad_input)
    manifests = {"train": tokenize_conversations(s.data, out / "train", tok, opts, log=_log)}
    if s.valid_data:
        manifests["valid"] = tokenize_conversations(s.valid_data, out / "valid", tok, opts, log=_log)
    else:  # no held-out set configured: leave none behind for the trainer to find
        for stale in out.glob("valid*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)  # valid.shards/: data_prep.sft's per-input shards
            else:
                stale.unlink()
    return out, manifests


def run_sft(cfg: ExperimentConfig, force: bool = False) -> StageResult:
    """Instruction tuning (``sft`` section): tokenize the conversations, then train through megatron-core from
    ``sft.init_from``, loss on the assistant tokens only; resumes from the stage folder's latest checkpoint."""
    data_dir, manifests = sft_data(cfg)
    # the same split as train's (train.train_iters plays no part; sft.train_iters may grow)
    sections = {"model": cfg.model.model_dump(mode="json"), "parallel": cfg.parallel.model_dump(mode="json"),
                "train": cfg.train.model_dump(mode="json", exclude={"train_iters"}), "sft": cfg.sft.model_dump(mode="json")}
    record = run_identity.run_record(sections, "sft.train_iters", cfg.sft.train_iters,
                                     {"data": {k: m["settings"] for k, m in manifests.items() if "settings" in m}})
    fp = run_identity.stage_fingerprint(record)
    if done := _skip(cfg, "sft", fp, force):
        return done
    out = stage_path(cfg, "sft")
    rank = int(os.environ.get("RANK", "0"))
    _claim_training_dir(out, record, force, rank)
    from megatron_ipt.launch.torchrun import needs_relaunch, torchrun_command

    if needs_relaunch(cfg.parallel.nproc_per_node):
        config_file = save_resolved_config(cfg)
        cmd = torchrun_command(["-m", "megatron_ipt.cli", "sft", str(config_file)], cfg.parallel.nproc_per_node)
        _log(f"sft: launching {cfg.parallel.nproc_per_node} processes: {' '.join(cmd)}")
        rc = subprocess.call(cmd)
        _raise_if_stopped(out)
        if rc != 0:
            raise LaunchError(f"sft processes exited with status {rc}; see their output above")
        return StageResult("sft", out, read_manifest(out, "sft"), False)
    from megatron_ipt.training.sft import sft_stage

    summary = sft_stage(cfg, data_dir, out, fp)
    if summary.get("stopped_by"):
        raise TrainingStopped(f"sft stopped at iteration {summary['iterations']} ({summary['stopped_by']}); "
                              "a checkpoint was saved: rerun the same command to resume")
    if rank != 0:
        return StageResult("sft", out, {"counts": summary}, False)
    _log(f"sft: {summary['iterations']} iterations, final loss {summary['final_train_loss']:.4f}"
         + "".join(f"; {k} {v['before']:.4f} -> {v['after']:.4f}" for k, v in summary.get("losses", {}).items()))
    return StageResult("sft", out, read_manifest(out, "sft"), False)


RUNNERS = {"corpus": run_corpus, "synthesize": run_synthesize, "format": run_format, "tokenize": run_tokenize, "train": run_train,
           "sft": run_sft}


def run_all(cfg: ExperimentConfig, force: bool = False, until: str = "train") -> dict[str, StageResult]:
    """Run every stage in order (up to and including ``until``), reusing finished ones."""
    save_resolved_config(cfg)
    results = {}
    for stage in STAGES[: STAGES.index(until) + 1]:
        _log(f"[bold cyan]== {stage}[/bold cyan]")
        results[stage] = RUNNERS[stage](cfg, force=force)
    return results

