"""lm-evaluation-harness on a tiny Hugging Face Llama export and on a Megatron checkpoint (exported to a temporary
Hugging Face folder): a local multiple-choice task over a JSONL file the test writes (no hub access), through
`ipt eval CONFIG --hf FOLDER | --checkpoint DIR --harness TASK --include-path DIR`."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from fixtures_eval import tiny_export

from megatron_ipt.cli import main
from megatron_ipt.evaluate import harness

pytest.importorskip("lm_eval")

# The experiment's model config for tiny_export's architecture (llama-test with smaller sizes).
TINY_MODEL = {"preset": "llama-test", "num_layers": 1, "hidden_size": 32, "ffn_hidden_size": 64,
              "num_attention_heads": 2, "num_query_groups": 1}
ROWS = [{"question": f"What follows {i}?", "choices": [str(i + 1), str(i + 2), "none"], "label": i % 3}
        for i in range(7)]


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def write_task(folder):
    folder.mkdir()
    data = folder / "ipt_local_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "ipt_local_mc.yaml").write_text(yaml.safe_dump({
        "task": "ipt_local_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}", "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }))
    return folder


def test_metric_names_from_lm_eval_keys():
    assert harness.metric_name("acc,none") == "acc" and harness.metric_name("exact_match,strict-match") == \
        "exact_match/strict-match"
    results = {"results": {"g": {"alias": "g", "acc,none": 0.5}, "t1": {"acc,none": 1, "acc_stderr,none": "N/A"}},
               "n-samples": {"t1": {"original": 9, "effective": 4}, "t2": {"original": 9, "effective": 5}},
               "group_subtasks": {"g": ["t1", "t2"]}}
    assert harness.records(results)[0][1:3] == ({"acc": 0.5}, 9)  # a group counts its tasks' documents
    assert harness.records(results)[1][1:3] == ({"acc": 1.0}, 4)  # "N/A" stderr dropped


def test_harness_runs_a_local_task_on_a_tiny_hf_export(tmp_path, tiny_tokenizer_dir, offline, capsys):
    hf = tiny_export(tmp_path / "hf", tiny_tokenizer_dir)
    tasks = write_task(tmp_path / "tasks")
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"name": "h", "run_dir": str(tmp_path / "run")}))
    assert main(["eval", str(config), "--hf", str(hf), "--harness", "ipt_local_mc", "--include-path", str(tasks),
                 "--num-fewshot", "1", "--name", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "| ipt_local_mc | acc |" in out
    record = json.loads((tmp_path / "run" / "eval" / "harness-ipt_local_mc-tiny.json").read_text())
    assert record["task"] == "ipt_local_mc" and record["n"] == len(ROWS)
    assert 0.0 <= record["metrics"]["acc"] <= 1.0 and "acc_stderr" in record["metrics"]
    assert record["settings"]["num_fewshot"] == 1 and record["settings"]["harness"].startswith("lm-eval ")
    assert record["model"]["kind"] == "hf" and record["model"]["fingerprint"]["hf_config_sha256"]
    assert (tmp_path / "run" / "eval" / "harness-ipt_local_mc-tiny.md").is_file()
    # --limit caps the documents per task
    assert main(["eval", str(config), "--hf", str(hf), "--harness", "ipt_local_mc", "--include-path", str(tasks),
                 "--limit", "3", "--output", str(tmp_path / "limited")]) == 0
    assert json.loads((tmp_path / "limited" / "harness-ipt_local_mc-hf.json").read_text())["n"] == 3


def test_harness_errors_are_one_line(tmp_path, offline, capsys):
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"name": "h", "run_dir": str(tmp_path / "run")}))
    assert main(["eval", str(config), "--hf", str(tmp_path), "--harness", "x"]) == 2
    assert f"{tmp_path}: not a Hugging Face model folder" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    tasks = write_task(tmp_path / "tasks")
    assert main(["eval", str(config), "--hf", str(tmp_path), "--harness", "no_such_task_xyz",
                 "--include-path", str(tasks)]) == 2
    assert "unknown lm-eval task(s) ['no_such_task_xyz']" in capsys.readouterr().err



@pytest.mark.e2e
def test_harness_runs_on_a_megatron_checkpoint_through_a_temporary_export(tmp_path, tiny_tokenizer_dir, offline,
                                                                          capsys):
    """A converted checkpoint (its hf/ folder next to it gives config and tokenizer) scores what its Hugging Face
    original scores; the record names the checkpoint and iteration; the temporary export is gone."""
    from megatron_ipt.hf import convert

    hf = tiny_export(tmp_path / "hf", tiny_tokenizer_dir)
    convert.hf_to_megatron(hf, tmp_path / "mg")
    tasks = write_task(tmp_path / "tasks")
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"name": "h", "run_dir": str(tmp_path / "run")}))
    common = ["--harness", "ipt_local_mc", "--include-path", str(tasks), "--limit", "4"]
    assert main(["eval", str(config), "--hf", str(hf), *common, "--name", "orig"]) == 0
    assert main(["eval", str(config), "--checkpoint", str(tmp_path / "mg"), *common, "--name", "mg"]) == 0
    eval_dir = tmp_path / "run" / "eval"
    orig = json.loads((eval_dir / "harness-ipt_local_mc-orig.json").read_text())
    record = json.loads((eval_dir / "harness-ipt_local_mc-mg.json").read_text())
    assert record["metrics"] == orig["metrics"] and record["n"] == 4
    assert record["model"]["kind"] == "megatron" and record["model"]["path"] == str(tmp_path / "mg")
    assert record["model"]["iteration"] == 0
    assert record["model"]["fingerprint"]["checkpoint"] == str(tmp_path / "mg" / "iter_0000000")
    assert record["model"]["fingerprint"]["export_hf_config"] == str(tmp_path / "mg" / "hf")
    assert record["settings"]["export"]["dtype"] == "float32"
    assert sorted(p.name for p in eval_dir.iterdir()) == ["harness-ipt_local_mc-mg.json", "harness-ipt_local_mc-mg.md",
                                                         "harness-ipt_local_mc-orig.json",
                                                         "harness-ipt_local_mc-orig.md"]  # no export left
    # a checkpoint with no Hugging Face folder anywhere: the config is written from the experiment's model
    # config and tokenizer; with the wrong model config, a one-line error saying so
    shutil.copytree(tmp_path / "mg" / "iter_0000000", tmp_path / "bare" / "iter_0000000")
    bare = ["eval", str(config), "--checkpoint", str(tmp_path / "bare" / "iter_0000000"), *common]
    capsys.readouterr()
    assert main(bare) == 2
    assert "no Hugging Face config to export it with: pass --hf-config-from" in capsys.readouterr().err
    config.write_text(yaml.safe_dump({"name": "h", "run_dir": str(tmp_path / "run"), "model": TINY_MODEL,
                                      "tokenize": {"tokenizer": str(tiny_tokenizer_dir)}}))
    assert main([*bare, "--name", "derived"]) == 0
    derived = json.loads((eval_dir / "harness-ipt_local_mc-derived.json").read_text())
    assert derived["metrics"] == orig["metrics"] and derived["model"]["fingerprint"]["export_hf_config"] == "model config"
    capsys.readouterr()
    assert main([*bare, "--set", "model.hidden_size=64"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the model described by the experiment's model config" in err
    assert "(pass --hf-config-from for the model's own)" in err and len(err.splitlines()) == 1
    assert not [p for p in eval_dir.iterdir() if p.name.startswith(".hf-export-")]
    # an error inside lm-eval (the task's data file is gone) also removes the export
    (tasks / "ipt_local_mc.jsonl").unlink()
    assert main(["eval", str(config), "--checkpoint", str(tmp_path / "mg"), *common, "--output",
                 str(tmp_path / "out")]) == 2
    assert "ipt_local_mc" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


def test_harness_on_a_checkpoint_errors_are_one_line(tmp_path, offline, capsys):
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"name": "h", "run_dir": str(tmp_path / "run")}))
    assert main(["eval", str(config), "--harness", "x"]) == 2
    assert f"{tmp_path / 'run' / 'train' / 'checkpoints'}: no checkpoint to evaluate" in capsys.readouterr().err
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert main(["eval", str(config), "--checkpoint", str(ckpt), "--harness", "x", "--hf-config-from",
                 str(tmp_path)]) == 2
    assert f"{tmp_path}: no config.json (--hf-config-from must be" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    tasks = write_task(tmp_path / "tasks")
    assert main(["eval", str(config), "--checkpoint", str(ckpt), "--harness", "no_such_task_xyz",
                 "--include-path", str(tasks), "--hf-config-from", str(tmp_path)]) == 2
    assert "unknown lm-eval task(s) ['no_such_task_xyz']" in capsys.readouterr().err
    assert main(["eval", str(config), "--checkpoint", str(ckpt), "--harness", "ipt_local_mc",
                 "--include-path", str(tasks), "--hf-config-from", str(tmp_path)]) == 2
    assert f"{ckpt}: not a torch_dist checkpoint" in capsys.readouterr().err
    assert main(["eval", str(config), "--init", "--harness", "x"]) == 2
    assert "--harness runs on a trained model" in capsys.readouterr().err
    assert main(["eval", str(config), "--hf", str(tmp_path), "--harness", "x", "--hf-config-from", str(tmp_path)]) == 2
    assert "--hf-config-from is for --harness on a checkpoint" in capsys.readouterr().err
