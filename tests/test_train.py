"""The train stage on CPU with real megatron-core: loss goes down, resume is exact, parallel layouts train."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ipt.manifest import read_manifest
from megatron_ipt.training.train import train_stage

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import make_tokenized_dir, tiny_config  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-path tests")


@pytest.fixture(scope="module")
def tokenized_dir(tmp_path_factory):
    return make_tokenized_dir(tmp_path_factory.mktemp("tokenized"))


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def losses_by_iteration(out_dir: Path) -> dict[int, float]:
    return {m["iteration"]: m["loss"] for m in metrics(out_dir) if "iteration" in m}


@pytest.fixture(scope="module")
def twenty_iterations(tokenized_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("train20")
    return out, train_stage(tiny_config(train_iters=20), tokenized_dir, out, "fp-20")


def test_training_loss_decreases_over_twenty_iterations(twenty_iterations):
    out, summary = twenty_iterations
    losses = losses_by_iteration(out)
    assert sorted(losses) == list(range(1, 21))
    assert losses[20] < losses[1] - 0.5
    assert summary["losses"]["heldout_raw"]["after"] < summary["losses"]["heldout_raw"]["before"]


def test_the_manifest_records_losses_counts_and_layout(twenty_iterations):
    out, summary = twenty_iterations
    manifest = read_manifest(out, "train")
    assert manifest["fingerprint"] == "fp-20"
    assert manifest["counts"]["iterations"] == 20 and manifest["counts"]["consumed_samples"] == 80
    assert manifest["counts"]["parameters"] == summary["parameters"] > 0
    assert set(manifest["losses"]) == {"heldout_raw", "heldout_pairs"}
    assert manifest["parallel"]["data_parallel_size"] == 1
    assert manifest["train"]["tokens_per_s"] > 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "20"
    assert manifest["memory_plan"]["parameters"] == summary["parameters"]  # ipt plan's estimate of this run
    assert manifest["memory_plan"]["total_gb"] > 0


def test_cpu_backend_is_off_after_training(twenty_iterations):
    from megatron_ipt.training import cpu_backend

    assert not cpu_backend.is_active() and not torch.distributed.is_initialized()
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tokenized_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_stage(tiny_config(train_iters=6, save_checkpoint=False), tokenized_dir, straight, "fp")
    first = train_stage(tiny_config(train_iters=6), tokenized_dir, resumed, "fp", exit_after_iterations=3)
    assert not first["completed"] and not (resumed / "manifest.json").exists()
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "3"
    second = train_stage(tiny_config(train_iters=6), tokenized_dir, resumed, "fp")
    assert second["resumed_from_iteration"] == 3 and second["consumed_samples"] == 24
    expected, got = losses_by_iteration(straight), losses_by_iteration(resumed)
    for it in (4, 5, 6):
        assert got[it] == pytest.approx(expected[it], rel=1e-6, abs=1e-6), it
    assert second["losses"]["heldout_raw"]["before"] == pytest.approx(
        json.loads((straight / "manifest.json").read_text())["losses"]["heldout_raw"]["before"])


def run_two_processes(tokenized_dir: Path, out: Path, *flags: str) -> dict:
    worker = Path(__file__).parent / "dist_train_worker.py"
    result = subprocess.run([sys.executable, str(worker), str(tokenized_dir), str(out), "--procs", "2", *flags],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "summary.json").read_text())


def test_save_interval_leaves_intermediate_checkpoints_and_points_latest_at_the_last(tokenized_dir, tmp_path):
    train_stage(tiny_config(train_iters=6, save_interval=2, eval_iters=1), tokenized_dir, tmp_path, "fp-save")
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("iter_"))
    assert saved == ["iter_0000002", "iter_0000004", "iter_0000006"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "6"


def test_a_held_out_set_shorter_than_a_sequence_is_evaluated_as_one_shorter_sequence(tmp_path):
    import numpy as np
    from train_fixtures import write_indexed

    tokenized = make_tokenized_dir(tmp_path / "tokenized", train_docs=40, heldout_docs=4)
    write_indexed(tokenized / "heldout_pairs", [np.arange(1, 31, dtype=np.int32)])  # 30 tokens < seq 64
    summary = train_stage(tiny_config(train_iters=2), tokenized, tmp_path / "out", "fp-short")
    assert summary["losses"]["heldout_pairs"]["sequence_length"] == 29
    assert summary["losses"]["heldout_raw"]["sequence_length"] == 64


@pytest.mark.dist
@pytest.mark.parametrize("flags, layout", [
    (("--tp", "2"), {"tensor_model_parallel_size": 2, "data_parallel_size": 1}),
    (("--pp", "2"), {"pipeline_model_parallel_size": 2, "data_parallel_size": 1}),
], ids=["tp2", "pp2"])
def test_two_gloo_processes_train(tokenized_dir, tmp_path, flags, layout):
    summary = run_two_processes(tokenized_dir, tmp_path / "out", *flags)
    assert summary["completed"] and summary["iterations"] == 4
    assert {k: summary["parallel"][k] for k in layout} == layout
    losses = losses_by_iteration(tmp_path / "out")
    assert losses[4] < losses[1]
    assert (tmp_path / "out" / "checkpoints" / "latest").is_file()


@pytest.mark.dist
def test_data_parallel_with_distributed_optimizer_trains_and_resumes_exactly(tokenized_dir, tmp_path):
    straight = run_two_processes(tokenized_dir, tmp_path / "straight", "--distopt")
    assert straight["completed"] and straight["parallel"]["data_parallel_size"] == 2
    expected = losses_by_iteration(tmp_path / "straight")
    assert expected[4] < expected[1]
    first = run_two_processes(tokenized_dir, tmp_path / "resumed", "--distopt", "--stop-at", "2")
    assert not first["completed"]
    second = run_two_processes(tokenized_dir, tmp_path / "resumed", "--distopt")
    assert second["resumed_from_iteration"] == 2
    got = losses_by_iteration(tmp_path / "resumed")
    # The first step after reload uses exactly the saved parameters; the next one the restored Adam state,
    # including its step count (megatron-core's dp_reshardable load leaves it at 1; checkpoint.py restores it).
    assert got[3] == pytest.approx(expected[3], rel=1e-6, abs=1e-6)
    assert got[4] == pytest.approx(expected[4], rel=1e-6, abs=1e-6)


# Virtual pipeline stages (interleaved 1F1B). Seeds differ per pipeline rank, so a layout comparison starts every
# run from the same weights (train.init_from a world-size-1 checkpoint of a 4-layer model) and then compares curves.
@pytest.fixture(scope="module")
def four_layer_start(tokenized_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("start4")
    train_stage(tiny_config(train_iters=1, eval_iters=1, model__num_layers=4), tokenized_dir, out, "fp-start")
    return out / "checkpoints"


@pytest.fixture(scope="module")
def four_layer_reference(tokenized_dir, four_layer_start, tmp_path_factory):
    """The world-size-1 curve from ``four_layer_start``: 4 iterations, the dist worker's settings."""
    out = tmp_path_factory.mktemp("reference4")
    cfg = tiny_config(train_iters=4, eval_iters=2, model__num_layers=4, init_from=str(four_layer_start))
    return out, train_stage(cfg, tokenized_dir, out, "fp-ref")


VPP_FLAGS = ("--pp", "2", "--vpp", "2", "--layers", "4")


@pytest.mark.dist
def test_virtual_pipeline_stages_match_the_world_size_1_curve(tokenized_dir, four_layer_start, four_layer_reference,
                                                              tmp_path):
    reference_out, reference = four_layer_reference
    out = tmp_path / "vpp"
    summary = run_two_processes(tokenized_dir, out, *VPP_FLAGS, "--init-from", str(four_layer_start))
    assert summary["completed"] and summary["parallel"]["virtual_pipeline_model_parallel_size"] == 2
    assert summary["parameters"] == reference["parameters"]
    expected, got = losses_by_iteration(reference_out), losses_by_iteration(out)
    assert sorted(got) == [1, 2, 3, 4]
    for it in got:  # same weights and data; only the pipeline split of the work differs
        assert got[it] == pytest.approx(expected[it], rel=1e-4), it
    for name, loss in summary["losses"].items():
        assert loss["after"] == pytest.approx(reference["losses"][name]["after"], rel=1e-4), name
    layout = json.loads((out / "checkpoints" / "iter_0000004" / "layout.json").read_text())
    assert layout == {"pipeline": 2, "tensor": 1, "data": 1, "model_chunks": 2}


@pytest.mark.dist
def test_a_virtual_pipeline_checkpoint_resumed_at_pp1_continues_the_curve(tokenized_dir, four_layer_start,
                                                                           four_layer_reference, tmp_path):
    reference_out, _ = four_layer_reference
    out = tmp_path / "resharded"
    first = run_two_processes(tokenized_dir, out, *VPP_FLAGS, "--init-from", str(four_layer_start), "--stop-at", "2")
    assert not first["completed"]
    # the PP=2 x VPP=2 checkpoint (model0, model1 per rank) loaded into one PP=1 model at world size 1
    cfg = tiny_config(train_iters=4, eval_iters=2, model__num_layers=4, init_from=str(four_layer_start))
    second = train_stage(cfg, tokenized_dir, out, "fp-resharded")
    assert second["resumed_from_iteration"] == 2 and second["parallel"]["pipeline_model_parallel_size"] == 1
    expected, got = losses_by_iteration(reference_out), losses_by_iteration(out)
    for it in (1, 2, 3, 4):
        assert got[it] == pytest.approx(expected[it], rel=1e-4), it
