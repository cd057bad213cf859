"""End to end: a trimmed quickstart with the real SmolLM2 synthesizer and real megatron-core training on CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"corpus": "corpus", "synthesis": "synthesize", "formatted": "format", "tokenized": "tokenize", "train": "train"}
TRIM = [
    # seed 1 holds out a document SmolLM2 writes a pair for (3 of these 10 get one), so the RC evaluation has one
    "corpus.max_documents=10", "corpus.heldout_fraction=0.2", "corpus.seed=1",
    "synthesis.max_new_tokens=48", "synthesis.max_context_tokens=192", "synthesis.batch_size=5",
    "model.seq_length=64", "train.train_iters=30", "train.micro_batch_size=2", "train.global_batch_size=4",
    "train.lr_warmup_iters=3", "train.log_interval=5",
]


def run_ipt(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "megatron_ipt.cli", "run", "examples/quickstart.yaml", "--set", f"run_dir={run_dir}"]
    for item in TRIM + list(extra):
        args += ["--set", item]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def trimmed_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    result = run_ipt(run_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result


@pytest.mark.e2e
def test_every_stage_leaves_a_manifest_with_the_resolved_config(trimmed_run):
    run_dir, _ = trimmed_run
    for folder, stage in STAGES.items():
        manifest = json.loads((run_dir / folder / "manifest.json").read_text())
        assert manifest["stage"] == stage
        assert manifest["config"]["train"]["train_iters"] == 30
        assert "megatron-core" in manifest["versions"]


@pytest.mark.e2e
def test_synthesis_reports_kept_and_dropped_pairs(trimmed_run):
    run_dir, _ = trimmed_run
    counts = json.loads((run_dir / "synthesis" / "manifest.json").read_text())["counts"]
    assert counts["documents"] == 10
    assert counts["pairs_kept"] + sum(counts["pairs_dropped"].values()) > 0
    lines = [json.loads(x) for x in (run_dir / "synthesis" / "pairs.jsonl").read_text().splitlines()]
    assert len(lines) == 10
    assert sum(len(x["pairs"]) for x in lines) == counts["pairs_kept"]


@pytest.mark.e2e
def test_indexed_datasets_match_the_formatted_texts(trimmed_run):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    run_dir, _ = trimmed_run
    manifest = json.loads((run_dir / "tokenized" / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 49152
    for name in ("train_raw", "train_ipt", "heldout_raw"):
        texts = (run_dir / "formatted" / f"{name}.jsonl").read_text().splitlines()
        ds = IndexedDataset(str(run_dir / "tokenized" / name))
        assert len(ds) == len(texts) == manifest["counts"][name]["documents"]
        assert all(int(ds[i][-1]) == manifest["tokenizer"]["eod_id"] for i in range(len(ds)))


@pytest.mark.e2e
def test_training_loss_decreases_and_checkpoint_is_saved(trimmed_run):
    run_dir, _ = trimmed_run
    metrics = [json.loads(x) for x in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0]
    manifest = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert manifest["counts"]["iterations"] == 30
    raw = manifest["losses"]["heldout_raw"]
    assert raw["after"] < raw["before"]
    assert (run_dir / "train" / "checkpoints" / "latest").is_file()


@pytest.mark.e2e
def test_summary_table_is_printed(trimmed_run):
    _, result = trimmed_run
    assert "megatron-ipt run summary" in result.stdout
    assert "pairs kept" in result.stdout


@pytest.mark.e2e
def test_rerun_reuses_every_finished_stage(trimmed_run):
    run_dir, _ = trimmed_run
    result = run_ipt(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in STAGES.values():
        assert f"{stage}: up to date" in result.stderr


@pytest.mark.e2e
def test_reading_comprehension_improves_over_the_untrained_model(trimmed_run, tmp_path):
    from megatron_ipt.config import load_config
    from megatron_ipt.errors import IptError
    from megatron_ipt.evaluate.cli import evaluate_experiment

    run_dir, result = trimmed_run
    assert "held-out RC answer NLL" in result.stdout  # the run's summary scores before and after training
    cfg = load_config(run_dir / "config.yaml")
    trained, _ = evaluate_experiment(cfg, output=tmp_path / "trained.json")
    init, _ = evaluate_experiment(cfg, init=True, output=tmp_path / "init.json")
    assert trained["n"] == init["n"] >= 1 and trained["model"]["iteration"] == 30
    assert trained["metrics"]["answer_nll"] < init["metrics"]["answer_nll"] - 1.0
    assert json.loads((tmp_path / "trained.json").read_text())["settings"]["template"]["question"]
    assert "| rc_heldout_0shot | answer_nll |" in (tmp_path / "trained.md").read_text()
    # a checkpoint that does not fit the model config is a one-line error naming it
    wrong = load_config(run_dir / "config.yaml", ["model.num_layers=3"])
    with pytest.raises(IptError, match="does not match the model config"):
        evaluate_experiment(wrong, output=tmp_path / "wrong.json")
