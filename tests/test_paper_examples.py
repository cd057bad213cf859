"""examples/paper/: the papers' arms resolve with ``ipt config`` and describe the arm they stand for."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megatron_ipt.cli import main
from megatron_ipt.config import load_config

PAPER = Path(__file__).resolve().parents[1] / "examples" / "paper"
FILES = sorted(PAPER.glob("*.yaml"))


def test_every_arm_is_there():
    assert {p.name for p in FILES} >= {"domain-instruct-pt.yaml", "domain-vanilla-pt.yaml", "scratch-instruct-pt.yaml",
                                       "domain-cpt-sft.yaml", "quickstart-sft.yaml"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_ipt_config_resolves_each_file(path, capsys):
    assert main(["config", str(path)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config(path).model_dump(mode="json")
    head = path.read_text().split("\nname:")[0]
    assert "arXiv" in head or path.name.startswith("quickstart"), "say where the paper's numbers come from"
    assert "bring" in head or path.name.startswith("quickstart"), "say what data the user must bring"


def test_the_domain_arms_differ_only_in_what_they_train_on():
    instruct, vanilla = load_config(PAPER / "domain-instruct-pt.yaml"), load_config(PAPER / "domain-vanilla-pt.yaml")
    assert (instruct.blend.raw_weight, instruct.blend.instruct_weight) == (0.0, 1.0)
    assert instruct.format.general_ratio == 1.0 and instruct.synthesis.rounds == 3
    assert (vanilla.blend.raw_weight, vanilla.blend.instruct_weight) == (1.0, 0.0)
    assert vanilla.blend.general_weight == 1.0 and not vanilla.blend.extra  # the Instruct PT arm's train_general
    same = ("train_iters", "global_batch_size", "lr", "init_from")
    assert [getattr(instruct.train, k) for k in same] == [getattr(vanilla.train, k) for k in same]
    assert instruct.model.seq_length == vanilla.model.seq_length


def test_the_sft_arms_start_from_their_cpt_runs():
    for name, cpt in (("domain-cpt-sft.yaml", "domain-instruct-pt.yaml"), ("quickstart-sft.yaml", "../quickstart.yaml")):
        sft, base = load_config(PAPER / name), load_config(PAPER / cpt)
        assert sft.name == base.name and sft.sft.data
        assert sft.sft.init_from == f"{base.run_path}/train/checkpoints"
        assert sft.model.seq_length == base.model.seq_length


def test_the_quickstart_arms_reuse_the_quickstarts_corpus_and_synthesis():
    """quickstart_arms.py copies the quickstart's corpus and synthesis folders: the sections must be the
    quickstart's, or the copies would not be reused (their fingerprints cover these sections)."""
    arms, quick = load_config(PAPER / "quickstart-arms.yaml"), load_config(PAPER / ".." / "quickstart.yaml")
    assert arms.corpus == quick.corpus and arms.synthesis == quick.synthesis
    assert arms.model == quick.model and (arms.blend.raw_weight, arms.blend.instruct_weight) == (0.0, 1.0)
    assert arms.format.general_instructions == arms.sft.data[0] == "runs/quickstart-arms/general-train.jsonl"
