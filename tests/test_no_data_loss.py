"""A stage never deletes a folder it did not write (issue 16, item 1): only a folder holding its own finished
manifest is replaced; ``name`` is one safe path component. Each test runs the real ``ipt`` command."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_ipt.manifest import ManifestError, atomic_dir, write_manifest

ROOT = Path(__file__).resolve().parents[1]


def ipt(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "megatron_ipt.cli", *args], cwd=cwd, capture_output=True, text=True)


def _user_corpus(folder: Path) -> dict[str, str]:
    """The user's own ``corpus/`` folder: raw JSONL and notes, no manifest."""
    folder.mkdir(parents=True)
    text = "A document long enough to be kept by the corpus stage. " * 20
    files = {"raw.jsonl": "".join(json.dumps({"id": f"d{i}", "text": text}) + "\n" for i in range(6)),
             "notes.txt": "where this corpus came from\n"}
    for name, content in files.items():
        (folder / name).write_text(content)
    return files


def test_run_dir_dot_never_replaces_the_users_own_corpus_folder(tmp_path):
    files = _user_corpus(tmp_path / "corpus")
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(
        {"name": "mine", "run_dir": ".", "corpus": {"source": "jsonl", "paths": ["corpus/raw.jsonl"], "min_chars": 10}}))
    r = ipt("run", "exp.yaml", "--until", "corpus", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "corpus: exists and is not a finished 'corpus' stage folder" in r.stderr
    assert "refusing to replace it" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2  # the stage banner and the one-line error
    assert {p.name: p.read_text() for p in (tmp_path / "corpus").iterdir()} == files
    r = ipt("run", "exp.yaml", "--until", "corpus", "--force", cwd=tmp_path)  # --force does not change that
    assert r.returncode == 2 and {p.name for p in (tmp_path / "corpus").iterdir()} == set(files)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".corpus.")]  # no temporary folder left


def test_a_finished_stage_folder_of_its_own_is_still_redone(tmp_path):
    run = tmp_path / "run"
    assert ipt("corpus", "examples/quickstart.yaml", "--set", f"run_dir={run}").returncode == 0
    r = ipt("corpus", "examples/quickstart.yaml", "--set", f"run_dir={run}", "--set", "corpus.seed=7")
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "corpus" / "manifest.json").read_text())["config"]["corpus"]["seed"] == 7


def test_atomic_dir_refuses_another_stages_folder_a_file_and_a_link(tmp_path):
    other = tmp_path / "formatted"
    other.mkdir()
    write_manifest(other, stage="format", fingerprint="x", config={})
    (tmp_path / "file").write_text("mine")
    (tmp_path / "link").symlink_to(other)
    for final, stage, why in ((other, "tokenize", "is a 'format' manifest"), (tmp_path / "file", None, "a file"),
                              (tmp_path / "link", "format", "a link")):
        with pytest.raises(ManifestError, match=why):
            with atomic_dir(final, stage) as out:
                (out / "x").write_text("new")
    assert json.loads((other / "manifest.json").read_text())["stage"] == "format"
    assert (tmp_path / "file").read_text() == "mine" and (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "formatted", "link"]


def test_a_folder_that_appears_while_the_stage_runs_is_not_replaced(tmp_path):
    final = tmp_path / "corpus"
    with pytest.raises(ManifestError, match="holds no readable manifest.json"):
        with atomic_dir(final, "corpus") as out:
            (out / "documents.jsonl").write_text("{}\n")
            final.mkdir()
            (final / "user.txt").write_text("mine")
    assert [p.name for p in final.iterdir()] == ["user.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../up", ".hidden", "-rf", "my run", ""])
def test_name_must_be_one_safe_path_component(name):
    r = ipt("config", "examples/quickstart.yaml", "--set", f"name={name}")
    assert r.returncode == 2 and "name = " in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("override, message", [("parallel.tensor_model_parallel_size=3", "invalid parallel layout"),
                                                ("train.init_from=/nonexistent/ckpt", "train.init_from")])
def test_a_config_error_never_moves_the_earlier_train_folder_aside(tmp_path, override, message):
    """Issue 16, item 19: validate first, move nothing until the new run is known to start."""
    from train_fixtures import make_tokenized_dir

    run = tmp_path / "run"
    make_tokenized_dir(run / "tokenized", train_docs=20, heldout_docs=4)
    (run / "train").mkdir()
    (run / "train" / "fingerprint").write_text("an earlier run\n")
    (run / "train" / "metrics.jsonl").write_text('{"iteration": 1}\n')
    r = ipt("train", "--set", f"run_dir={run}", "--set", "train.device=cpu", "--set", "model.preset=llama-test",
            "--set", override)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in run.iterdir()) == ["tokenized", "train"]
    assert (run / "train" / "fingerprint").read_text() == "an earlier run\n"


def test_preflight_passes_a_valid_run_and_names_the_layout_for_the_world_size(tmp_path):
    from megatron_ipt.training.parallel import ParallelLayoutError
    from megatron_ipt.training.train import preflight
    from train_fixtures import make_tokenized_dir, tiny_config

    tokenized = make_tokenized_dir(tmp_path / "tokenized", train_docs=20, heldout_docs=4)
    preflight(tiny_config(), tokenized, world_size=1)
    preflight(tiny_config(parallel__nproc_per_node=2), tokenized, world_size=2)  # the launcher, not torchrun
    with pytest.raises(ParallelLayoutError, match="global"):
        preflight(tiny_config(global_batch_size=3), tokenized, world_size=2)


def test_the_corpus_stage_sees_an_added_or_edited_input_file(tmp_path):
    """Issue 16, item 17: the corpus fingerprint covers its input files (paths, sizes, modification times)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    text = "A document long enough to be kept by the corpus stage, number {n}. " * 5
    (raw / "a.jsonl").write_text(json.dumps({"id": "a", "text": text.format(n=1)}) + "\n")
    sets = ["--set", f"run_dir={tmp_path / 'run'}", "--set", "corpus.source=jsonl", "--set", f"corpus.paths=[{raw}]",
            "--set", "corpus.min_chars=10", "--set", "corpus.heldout_fraction=0"]
    docs = lambda: [json.loads(x)["id"] for x in (tmp_path / "run" / "corpus" / "documents.jsonl").read_text().splitlines()]  # noqa: E731
    assert ipt("corpus", *sets).returncode == 0 and docs() == ["a"]
    (raw / "b.jsonl").write_text(json.dumps({"id": "b", "text": text.format(n=2)}) + "\n")
    r = ipt("corpus", *sets)
    assert r.returncode == 0 and "reusing" not in r.stderr and docs() == ["a", "b"]
    (raw / "b.jsonl").write_text(json.dumps({"id": "b2", "text": text.format(n=3)}) + "\n")  # edited in place
    r = ipt("corpus", *sets)
    assert r.returncode == 0 and "reusing" not in r.stderr and docs() == ["a", "b2"]
    assert "reusing" in ipt("corpus", *sets).stderr  # unchanged: reused
    for f in raw.iterdir():  # inputs deleted after the stage finished: the corpus is kept and reused
        f.unlink()
    raw.rmdir()
    r = ipt("corpus", *sets)
    assert r.returncode == 0 and "reusing the finished corpus" in " ".join(r.stderr.split()) and docs() == ["a", "b2"]
