"""``ipt sweep``: grid expansion and per-point config overrides (fast), the report (CSV, Markdown, PNG) from
rows, and a real 2-point sweep on a tiny setup: data stages once (real corpus, format and tokenize with a
tiny BPE tokenizer; pairs written by hand instead of an LLM), two training runs through NeMo-Run's
LocalExecutor, evaluation per point, and a rerun that skips the finished points."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_ipt.config import ConfigError, load_config
from megatron_ipt.launch.sweep import (Point, SweepGrid, data_config, expand_grid, link_data_stages, load_sweep, point_config,
                                write_report)

ROOT = Path(__file__).resolve().parents[1]


def _write_sweep(tmp_path: Path, base: dict, sweep: dict) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", "sweep_dir": str(tmp_path / "sweep"), **sweep}))
    return path


def test_grid_expands_every_combination_with_the_share_varying_fastest():
    grid = SweepGrid.model_validate({"instruction_share": [0.25, 0.75], "train.lr": [1e-3, 3e-3],
                                     "train.train_iters": [10]})
    points = expand_grid(grid)
    assert [p.id for p in points] == ["share0.25-lr0.001-iters10", "share0.75-lr0.001-iters10",
                                      "share0.25-lr0.003-iters10", "share0.75-lr0.003-iters10"]
    assert [p.id for p in expand_grid(SweepGrid(instruction_share=[0, 0.5, 1]))] == ["share0", "share0.5", "share1"]


def test_instruction_share_splits_the_raw_plus_instruct_weight_and_lr_scales_min_lr(tmp_path):
    path = _write_sweep(tmp_path, {"blend": {"raw_weight": 2.0, "instruct_weight": 2.0,
                                             "extra": [{"prefix": "g", "weight": 1.0, "name": "general"}]},
                                   "train": {"lr": 1e-3, "min_lr": 1e-4}},
                        {"name": "s", "set": ["train.train_iters=7"],
                         "grid": {"instruction_share": [0.25], "train.lr": [2e-3]}})
    sweep, base = load_sweep(path)
    (point,) = expand_grid(sweep.grid)
    cfg = point_config(sweep, base, point)
    assert (cfg.blend.instruct_weight, cfg.blend.raw_weight) == (1.0, 3.0)  # 25% of 4.0; extra keeps its 1.0
    assert cfg.blend.extra[0].weight == 1.0
    assert cfg.train.lr == 2e-3 and cfg.train.min_lr == pytest.approx(2e-4) and cfg.train.train_iters == 7
    assert cfg.run_path == tmp_path / "sweep" / "points" / "share0.25-lr0.002" and cfg.name == "s-share0.25-lr0.002"
    data = data_config(sweep, base)
    assert data.run_path == tmp_path / "sweep" / "data"
    for section in ("corpus", "synthesis", "format", "tokenize"):  # what the data-stage fingerprints hash
        assert getattr(data, section) == getattr(cfg, section)


@pytest.mark.parametrize("sweep, message", [
    ({"grid": {"instruction_share": [1.5]}}, r"grid.instruction_share = \[1.5\]: .*\[0, 1\]"),
    ({"grid": {"instruction_share": []}}, "grid.instruction_share"),
    ({"grid": {}}, "grid.instruction_share"),
    ({"grid": {"instruction_share": [0.5], "train.lr": [-1]}}, "learning rates must be positive"),
    ({"grid": {"instruction_share": [0.5], "train.warmup": [1]}}, "unknown key 'grid.train.warmup'"),
    ({"grid": {"instruction_share": [0.5]}, "base": "missing.yaml"}, "base experiment 'missing.yaml' not found"),
])
def test_bad_sweep_files_name_the_file_and_key(tmp_path, sweep, message):
    path = _write_sweep(tmp_path, {}, sweep)
    with pytest.raises(ConfigError, match=message) as e:
        load_sweep(path)
    assert str(path) in str(e.value)


def test_plan_lists_the_points_and_validates_their_configs(tmp_path, capsys):
    from megatron_ipt.cli import main

    path = _write_sweep(tmp_path, {}, {"grid": {"instruction_share": [0.0, 1.0]}})
    assert main(["sweep", str(path), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "share0: blend.instruct_weight=0.0 blend.raw_weight=1.0" in out
    assert "share1: blend.instruct_weight=1.0 blend.raw_weight=0.0" in out
    assert main(["sweep", str(path), "--plan", "--set", "train.min_lr=1.0"]) == 2  # min_lr above lr, every point
    assert "train.min_lr 1.0 is larger than train.lr" in capsys.readouterr().err


def test_plan_shows_the_sweeps_own_set_overrides_on_every_point(tmp_path, capsys):
    from megatron_ipt.cli import main

    path = _write_sweep(tmp_path, {}, {"set": ["train.train_iters=7"], "grid": {"instruction_share": [0.0, 1.0]}})
    assert main(["sweep", str(path), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "share0: train.train_iters=7 blend.instruct_weight=0.0 blend.raw_weight=1.0" in out
    assert "share1: train.train_iters=7 blend.instruct_weight=1.0" in out
    assert f"data stages: run once in {tmp_path / 'sweep' / 'data'}" in out


def test_the_shipped_example_plans_three_points_over_the_quickstart(capsys):
    from megatron_ipt.cli import main

    assert main(["sweep", str(ROOT / "examples" / "sweep.yaml"), "--plan"]) == 0
    assert capsys.readouterr().out.count("blend.instruct_weight=") == 3


def test_data_stage_links_are_relative_and_idempotent(tmp_path):
    data, point = tmp_path / "data", tmp_path / "points" / "p"
    for folder in ("corpus", "synthesis", "formatted", "tokenized"):
        (data / folder).mkdir(parents=True)
    link_data_stages(data, point)
    link_data_stages(data, point)
    assert os.readlink(point / "tokenized") == "../../data/tokenized"
    assert (point / "synthesis").resolve() == (data / "synthesis").resolve()


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_report_writes_csv_markdown_and_decodable_pngs(tmp_path):
    pytest.importorskip("matplotlib", reason="the launch extra (matplotlib) is installed in CI's first leg")
    import matplotlib.image

    rows = [{"point": f"share{s:g}", "instruction_share": s, "lr": 1e-3, "train_iters": 5, "status": "done",
             "heldout_raw_after": 3.0 + s, "heldout_pairs_after": 4.0 - s, "rc_answer_nll": 5.0 - s,
             "rc_mc_accuracy": s / 2, "log": "x.log"} for s in (0.0, 0.5, 1.0)]
    rows.append({"point": "share0.75", "instruction_share": 0.75, "lr": 1e-3, "train_iters": 5, "status": "failed",
                 "log": "y.log"})
    paths = write_report(rows, tmp_path, "t")
    assert [p.name for p in paths] == ["results.csv", "results.md", "validation_loss.png", "reading_comprehension.png"]
    got = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["point"] for r in got] == ["share0", "share0.5", "share1", "share0.75"]
    assert got[3]["status"] == "failed" and got[3]["heldout_raw_after"] == ""
    md = (tmp_path / "results.md").read_text()
    assert "| point | instruction share | lr | iters | raw loss | pairs loss | RC answer NLL | RC accuracy | status |" in md
    assert "| share0.5 | 0.5 | 0.001 | 5 | 3.5 | 3.5 | 4.5 | 0.25 | done |" in md
    for png in paths[2:]:
        w, h = _png_size(png)
        assert w > 100 and h > 100
        assert matplotlib.image.imread(png).shape[:2] == (h, w)


# ---------------------------------------------------------------------------------------------- end to end


def _fake_synthesis(cfg) -> None:
    """The synthesize stage's output written by hand (no LLM): two pairs per document, one multiple-choice,
    under the fingerprint the real stage would compute, so later stages and the sweep take it as finished."""
    from megatron_ipt.manifest import atomic_dir, write_manifest
    from megatron_ipt.pipeline import stage_path, synthesis_fingerprint

    fp = synthesis_fingerprint(cfg)
    docs = [json.loads(x) for x in (stage_path(cfg, "corpus") / "documents.jsonl").read_text().splitlines()]
    with atomic_dir(stage_path(cfg, "synthesize")) as out:
        with open(out / "pairs.jsonl", "w") as f:
            for d in docs:
                first = d["text"].split()[0]
                pairs = [{"question": "Which word opens the text?", "answer": first},
                         {"question": "Which word opens the text?", "answer": first,
                          "options": [first, "banana", "zebra"]}]
                f.write(json.dumps({**d, "pairs": pairs, "raw_output": "", "dropped": {}}) + "\n")
        write_manifest(out, stage="synthesize", fingerprint=fp, config={}, outputs=["pairs.jsonl"],
                       counts={"documents": len(docs), "documents_with_pairs": len(docs), "pairs_kept": 2 * len(docs),
                               "pairs_dropped": {}})


def tiny_sweep(tmp_path: Path, tokenizer: Path, shares=(0.0, 1.0), data_from: Path | None = None, **launch) -> Path:
    """A sweep file (2 points by default) over a tiny experiment whose data stages are already in SWEEP_DIR/data
    (or, with ``data_from``, in that run folder, with its config.yaml, and named by the sweep's data_from)."""
    from megatron_ipt.pipeline import run_corpus, run_format, run_tokenize, save_resolved_config

    base = {"name": "tiny", "corpus": {"source": "pydoc_topics", "max_documents": 16, "heldout_fraction": 0.25},
            "tokenize": {"tokenizer": str(tokenizer), "workers": 1},
            "model": {"preset": "llama-test", "seq_length": 64},
            "train": {"device": "cpu", "micro_batch_size": 2, "global_batch_size": 4, "lr_warmup_iters": 1,
                      "log_interval": 1, "eval_iters": 2}}
    extra = {"data_from": str(data_from)} if data_from else {}
    path = _write_sweep(tmp_path, base, {"name": "tiny", "set": ["train.train_iters=4"],
                                         "grid": {"instruction_share": list(shares)}, "launch": launch, **extra})
    sweep, base_path = load_sweep(path)
    cfg = data_config(sweep, base_path)
    if data_from:
        save_resolved_config(cfg)
    run_corpus(cfg)
    _fake_synthesis(cfg)
    run_format(cfg)
    run_tokenize(cfg)
    return path


def _ipt(*args, cwd, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_ipt.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def check_sweep_outputs(sweep_dir: Path) -> list[dict]:
    """Both points trained and evaluated: CSV rows, Markdown rows, two decodable PNGs; returns the CSV rows."""
    import matplotlib.image

    rows = list(csv.DictReader((sweep_dir / "results.csv").open()))
    assert [r["point"] for r in rows] == ["share0", "share1"]
    assert [float(r["instruction_share"]) for r in rows] == [0.0, 1.0]
    assert [float(r["raw_weight"]) for r in rows] == [1.0, 0.0]
    for r in rows:
        assert r["status"] == "done" and r["train_iters"] == "4"
        for key in ("heldout_raw_before", "heldout_raw_after", "heldout_pairs_after", "rc_answer_nll"):
            assert float(r[key]) > 0, key
        assert 0.0 <= float(r["rc_mc_accuracy"]) <= 1.0 and int(r["rc_examples"]) % 2 == 0 and int(r["rc_examples"]) > 0
        assert float(r["heldout_raw_after"]) < float(r["heldout_raw_before"])
    # different blends (raw only vs augmented only, same seed): different training data, different losses
    assert rows[0]["heldout_pairs_after"] != rows[1]["heldout_pairs_after"]
    md = (sweep_dir / "results.md").read_text()
    assert md.count("| share") == 2 and "RC answer NLL" in md
    for name in ("validation_loss.png", "reading_comprehension.png"):
        png = sweep_dir / name
        assert png.stat().st_size > 0
        w, h = _png_size(png)
        assert matplotlib.image.imread(png).shape[:2] == (h, w) and w > 100
    for p in ("share0", "share1"):  # data stages shared through links; each point has its own training
        assert os.path.islink(sweep_dir / "points" / p / "tokenized")
        assert (sweep_dir / "points" / p / "train" / "manifest.json").is_file()
    return rows


@pytest.mark.e2e
def test_two_point_sweep_through_the_local_executor_then_a_rerun_skips_both(tmp_path, tiny_tokenizer_dir):
    pytest.importorskip("nemo_run")
    path = tiny_sweep(tmp_path, tiny_tokenizer_dir)
    r = _ipt("sweep", str(path), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    sweep_dir = tmp_path / "sweep"
    rows = check_sweep_outputs(sweep_dir)
    experiments = sorted(p.name for p in (sweep_dir / "nemorun" / "experiments").iterdir())
    assert experiments == ["tiny-data", "tiny-share0", "tiny-share1"]  # data once, one training run per point

    started = time.time()
    r = _ipt("sweep", str(path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("already trained and evaluated") == 2
    assert time.time() - started < 60
    assert list(csv.DictReader((sweep_dir / "results.csv").open())) == rows
    assert len(list((sweep_dir / "nemorun" / "experiments" / "tiny-share0").iterdir())) == 1  # not launched again


@pytest.mark.e2e
def test_a_sweep_with_data_from_trains_on_that_runs_data_and_runs_no_data_stage(tmp_path, tiny_tokenizer_dir, capsys):
    from megatron_ipt.cli import main

    pytest.importorskip("nemo_run")
    prepared = tmp_path / "prepared"
    path = tiny_sweep(tmp_path, tiny_tokenizer_dir, shares=(1.0,), data_from=prepared)
    assert main(["sweep", str(path), "--plan"]) == 0
    assert f"data stages: reused from {prepared} (data_from)" in capsys.readouterr().out
    # a data section that differs from the prepared run's config is named before anything runs
    assert main(["sweep", str(path), "--plan", "--set", "format.seed=7"]) == 2
    assert "format.seed is 0 there but 7 in this sweep" in capsys.readouterr().err
    r = _ipt("sweep", str(path), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    sweep_dir = tmp_path / "sweep"
    assert not (sweep_dir / "data").exists()
    assert sorted(p.name for p in (sweep_dir / "nemorun" / "experiments").iterdir()) == ["tiny-share1"]
    link = sweep_dir / "points" / "share1" / "tokenized"
    assert link.is_symlink() and link.resolve() == (prepared / "tokenized").resolve()
    assert (sweep_dir / "points" / "share1" / "train" / "manifest.json").is_file()


@pytest.mark.e2e
def test_a_point_failing_inside_its_job_is_reported_and_retried_on_the_next_run(tmp_path, tiny_tokenizer_dir):
    pytest.importorskip("nemo_run")
    path = tiny_sweep(tmp_path, tiny_tokenizer_dir, shares=(0.5,))
    # one process cannot hold tensor_model_parallel_size 2: every config loads, the training job fails inside
    r = _ipt("sweep", str(path), "--set", "parallel.tensor_model_parallel_size=2", cwd=tmp_path)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    error = [x for x in r.stderr.splitlines() if x.startswith("ipt sweep: error:")][0]
    assert "1 of 1 points failed" in error and "share0.5" in error and "ended FAILED" in error
    (row,) = list(csv.DictReader((tmp_path / "sweep" / "results.csv").open()))
    assert row["status"] == "failed" and "not divisible" in Path(row["log"]).read_text()
    assert not (tmp_path / "sweep" / "points" / "share0.5" / "point.json").exists()
    r = _ipt("sweep", str(path), cwd=tmp_path)  # the point is retried (its config differs now: it trains)
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = list(csv.DictReader((tmp_path / "sweep" / "results.csv").open()))
    assert row["status"] == "done" and float(row["heldout_raw_after"]) > 0

@pytest.mark.e2e
@pytest.mark.slurm
def test_two_point_sweep_through_nemo_runs_slurm_executor_on_a_real_cluster(slurm_cluster, tmp_path,
                                                                             tiny_tokenizer_dir):
    """The same sweep submitted with sbatch by NeMo-Run's SlurmExecutor (LocalTunnel) to the local cluster."""
    pytest.importorskip("nemo_run")
    path = tiny_sweep(tmp_path, tiny_tokenizer_dir)
    env = {**slurm_cluster.env, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "megatron_ipt.cli", "sweep", str(path), "--executor", "slurm",
                        "--account", slurm_cluster.account, "--partition", slurm_cluster.partition,
                        "--time", "00:10:00"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    sweep_dir = tmp_path / "sweep"
    rows = check_sweep_outputs(sweep_dir)
    for row in rows:  # each point's training ran as a Slurm job; its log is NeMo-Run's sbatch output
        log = Path(row["log"])
        assert log.name.startswith(f"log-{slurm_cluster.account}") and log.suffix == ".out", log
        assert "iteration 4/4" in log.read_text()
    jobs = slurm_cluster.run("sacct", "-n", "-X", "-P", "-o", "JobName,State", "-S", "now-1hour").stdout
    assert "COMPLETED" in jobs


def test_a_sweep_refuses_the_ssh_tunnel(tmp_path):
    from megatron_ipt.errors import IptError
    from megatron_ipt.launch.sweep import run_sweep

    path = _write_sweep(tmp_path, {}, {"grid": {"instruction_share": [0.5]},
                                       "launch": {"executor": "slurm", "slurm": {"account": "a", "tunnel": "ssh",
                                                                                 "host": "h", "user": "u",
                                                                                 "job_dir": "/j"}}})
    with pytest.raises(IptError, match="--tunnel ssh is for ipt launch"):
        run_sweep(*load_sweep(path))
    assert not (tmp_path / "sweep" / "points").exists()
