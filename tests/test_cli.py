import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def ipt(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "megatron_ipt.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_help_lists_every_stage():
    r = ipt("--help")
    assert r.returncode == 0
    for stage in ("run", "corpus", "synthesize", "format", "tokenize", "train"):
        assert stage in r.stdout


def test_stage_help_explains_overrides():
    r = ipt("train", "--help")
    assert r.returncode == 0 and "--set" in r.stdout and "train.train_iters" in r.stdout


def test_config_prints_resolved_yaml_with_overrides():
    r = ipt("config", "examples/quickstart.yaml", "--set", "train.train_iters=9")
    assert r.returncode == 0
    assert yaml.safe_load(r.stdout)["train"]["train_iters"] == 9


def test_unknown_key_is_one_line_error_with_status_2():
    r = ipt("config", "examples/quickstart.yaml", "--set", "train.itres=9")
    assert r.returncode == 2
    assert "unknown key 'train.itres'" in r.stderr
    assert "Traceback" not in r.stderr


def test_an_unknown_key_suggests_the_nearest_valid_one():
    r = ipt("config", "examples/quickstart.yaml", "--set", "tokenize.tokenizr=x", "--set", "trian.lr=1")
    assert r.returncode == 2
    assert "unknown key 'tokenize.tokenizr' (did you mean 'tokenize.tokenizer'?)" in r.stderr
    assert "unknown key 'trian' (did you mean 'train'?)" in r.stderr
    r = ipt("config", "--set", "blend.extra=[{prefix: a, weight: 1, name: x, prefx: b}]")
    assert "unknown key 'blend.extra.0.prefx' (did you mean 'blend.extra.0.prefix'?)" in r.stderr


def test_stage_without_its_input_names_the_missing_manifest(tmp_path):
    r = ipt("format", "examples/quickstart.yaml", "--set", f"run_dir={tmp_path}/run")
    assert r.returncode == 2
    assert f"{tmp_path}/run/synthesis/manifest.json: missing" in r.stderr
    assert "Traceback" not in r.stderr


def test_corpus_stage_writes_documents_and_manifest_and_is_reused(tmp_path):
    run = tmp_path / "run"
    r = ipt("corpus", "examples/quickstart.yaml", "--set", f"run_dir={run}")
    assert r.returncode == 0, r.stderr
    assert (run / "corpus" / "documents.jsonl").is_file() and (run / "corpus" / "manifest.json").is_file()
    r2 = ipt("corpus", "examples/quickstart.yaml", "--set", f"run_dir={run}")
    assert r2.returncode == 0 and "reusing" in r2.stderr


def test_parallel_layout_that_does_not_divide_is_a_one_line_error(tmp_path):
    from train_fixtures import make_tokenized_dir

    make_tokenized_dir(tmp_path / "run" / "tokenized", train_docs=20, heldout_docs=4)
    r = ipt("train", "--set", f"run_dir={tmp_path}/run", "--set", "train.device=cpu",
            "--set", "model.preset=llama-test", "--set", "parallel.tensor_model_parallel_size=3")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "tensor" in r.stderr.lower() and "3" in r.stderr
    assert "Traceback" not in r.stderr


def test_train_takes_prepare_data_and_plan_is_a_command():
    from megatron_ipt.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "x.yaml", "--prepare-data"]).prepare_data
    assert not parser.parse_args(["train", "x.yaml"]).prepare_data
    args = parser.parse_args(["plan", "x.yaml", "--world-size", "64", "--gpu-memory-gb", "141"])
    assert (args.world_size, args.gpu_memory_gb) == (64, 141.0)
