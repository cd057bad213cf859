"""A run folder keeps its resolved config (megatron_ipt.run_config): commands on an existing run default to it, say
so, and the --set overrides it was made with need not be repeated; a config.yaml the tool did not write is never
replaced."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from megatron_ipt.config import load_config
from megatron_ipt.run_config import MARKER, find, run_holding, save

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import make_tokenized_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def ipt(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "megatron_ipt.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_run_dir_dot_never_replaces_the_users_own_config_yaml(tmp_path):
    mine = "# my experiment\nname: mine\ncorpus: {max_documents: 3}\n"
    (tmp_path / "config.yaml").write_text(mine)
    r = ipt("run", "config.yaml", "--until", "corpus", "--set", "run_dir=.", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "config.yaml").read_text() == mine  # untouched
    resolved = tmp_path / "config.resolved.yaml"
    assert resolved.read_text().startswith(MARKER) and find(tmp_path) == resolved
    assert yaml.safe_load(resolved.read_text())["corpus"]["max_documents"] == 3
    r = ipt("corpus", "config.yaml", "--set", "run_dir=.", "--set", "corpus.max_documents=4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "config.yaml").read_text() == mine
    assert load_config(resolved).corpus.max_documents == 4  # the latest command's config, in the tool's own file


def test_a_run_folder_given_as_config_is_read_with_its_overrides(tmp_path):
    run = tmp_path / "run"
    r = ipt("corpus", "--set", f"run_dir={run}", "--set", "corpus.max_documents=3", "--set", "corpus.seed=7")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "config.yaml").read_text().startswith(MARKER)
    r = ipt("config", str(run))
    assert f"ipt config: using {run}/config.yaml (the run's resolved config)" in r.stderr
    got = yaml.safe_load(r.stdout)
    assert (got["corpus"]["max_documents"], got["corpus"]["seed"], got["run_dir"]) == (3, 7, str(run))
    r = ipt("corpus", str(run))  # the same run, no --set repeated: reused, not redone
    assert r.returncode == 0 and "reusing" in r.stderr
    r = ipt("config", str(tmp_path))
    assert r.returncode == 2 and "a folder without a resolved config" in r.stderr


def test_eval_on_an_existing_run_defaults_to_its_resolved_config(tmp_path):
    """The issue's case: a run made with --set overrides, then ``ipt eval EXP`` without them evaluates the model the
    run has (here its model.preset and seq_length), saying so."""
    run = tmp_path / "run"
    make_tokenized_dir(run / "tokenized", train_docs=20, heldout_docs=4)
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"run_dir": str(run), "train": {"device": "cpu"}}))
    save(load_config(exp, ["model.preset=llama-test", "model.seq_length=64"]))  # what `ipt train EXP --set ...` wrote
    r = ipt("eval", str(exp), "--task", "perplexity", "--init")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"ipt eval: using {run}/config.yaml (the run's resolved config)" in r.stderr
    result = json.loads((run / "eval" / "perplexity-init.json").read_text())
    assert result["model"]["fingerprint"]["preset"] == "llama-test"


def test_the_run_holding_a_checkpoint_is_found(tmp_path):
    run = tmp_path / "run"
    ckpt = run / "train" / "checkpoints" / "iter_0000002"
    ckpt.mkdir(parents=True)
    assert run_holding(ckpt) is None
    save(load_config(None, [f"run_dir={run}"]))
    assert run_holding(ckpt) == run and run_holding(run / "train" / "checkpoints") == run


def test_convert_of_a_runs_checkpoints_takes_the_runs_hf_config(tmp_path):
    """A run trained from ``model.hf_config`` (``--set``): its checkpoints hold no hf/ folder; ``ipt convert
    megatron-to-hf RUN/train/checkpoints OUT`` takes the Hugging Face folder from the run's resolved config."""
    import shutil

    import torch
    import transformers

    from megatron_ipt.hf import convert

    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).save_pretrained(tmp_path / "hf")
    convert.hf_to_megatron(tmp_path / "hf", tmp_path / "mg")
    run = tmp_path / "run"
    checkpoints = run / "train" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copytree(tmp_path / "mg" / "iter_0000000", checkpoints / "iter_0000000")
    shutil.copy(tmp_path / "mg" / "latest", checkpoints / "latest")
    assert convert.hf_files_next_to(checkpoints) is None
    save(load_config(None, [f"run_dir={run}", f"model.hf_config={tmp_path / 'hf'}"]))
    r = ipt("convert", "megatron-to-hf", str(checkpoints), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"ipt convert: using {run}/config.yaml (the run's resolved config)" in r.stderr
    assert (tmp_path / "out" / "config.json").is_file()
