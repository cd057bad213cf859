"""Cross-version checkpoints: one written with this leg's megatron-core resumes on the other leg's, and back.

Needs both interpreters: ``IPT_OTHER_PYTHON`` names the other leg's python (a venv with megatron-ipt
installed; ``.ci/run`` sets it for the Python 3.12 leg to the 3.11 leg's venv). Without it the test is
skipped with that reason. Every training run is a subprocess (``dist_train_worker.py``) of the
interpreter under test: for each direction, the writer trains 6 iterations but stops after 3 (checkpoint
at iteration 3), the reader resumes it and trains iterations 4-6; its losses must equal an uninterrupted
6-iteration run's (which is the same on both versions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import make_tokenized_dir  # noqa: E402

OTHER = os.environ.get("IPT_OTHER_PYTHON", "")
WORKER = Path(__file__).parent / "dist_train_worker.py"

pytestmark = [
    pytest.mark.crossversion,
    pytest.mark.skipif(not OTHER, reason="IPT_OTHER_PYTHON (the other CI leg's python) is not set"),
]


def _run(python: str, tokenized: Path, out: Path, *flags: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run([python, str(WORKER), str(tokenized), str(out), "--iters", "6", *flags],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, f"{python} {flags}:\n{result.stderr[-4000:]}"
    return json.loads((out / "summary.json").read_text())


def _losses(out: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["iteration"]: m["loss"] for m in lines if "iteration" in m}


def _version(python: str) -> str:
    code = "from megatron_ipt.training import mcore; print(mcore.version())"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    return make_tokenized_dir(tmp_path_factory.mktemp("tokenized"), train_docs=120, heldout_docs=8)


@pytest.fixture(scope="module")
def pythons():
    this, other = sys.executable, OTHER
    versions = (_version(this), _version(other))
    assert versions[0] != versions[1], f"both interpreters have megatron-core {versions[0]}"
    return {versions[0]: this, versions[1]: other}


@pytest.fixture(scope="module")
def straight(tokenized, pythons, tmp_path_factory):
    """Uninterrupted 6-iteration runs, one per version; their losses agree."""
    losses = {}
    for version, python in pythons.items():
        out = tmp_path_factory.mktemp(f"straight-{version}")
        _run(python, tokenized, out)
        losses[version] = _losses(out)
    first, second = losses.values()
    for it in range(1, 7):
        assert first[it] == pytest.approx(second[it], rel=1e-5), it
    return losses


@pytest.mark.parametrize("direction", ["this-to-other", "other-to-this"])
def test_a_checkpoint_written_on_one_version_resumes_on_the_other(direction, tokenized, pythons, straight, tmp_path):
    (v_this, py_this), (v_other, py_other) = list(pythons.items())
    if direction == "other-to-this":
        (v_this, py_this), (v_other, py_other) = (v_other, py_other), (v_this, py_this)
    writer, reader = (v_this, py_this), (v_other, py_other)
    out = tmp_path / "run"
    first = _run(writer[1], tokenized, out, "--stop-at", "3")
    assert not first["completed"] and (out / "checkpoints" / "latest").read_text().strip() == "3"
    assert (out / "checkpoints" / "iter_0000003" / "common.pt").is_file()  # what 0.16.1's loader needs
    second = _run(reader[1], tokenized, out)
    assert second["completed"] and second["resumed_from_iteration"] == 3 and second["consumed_samples"] == 24
    got = _losses(out)
    expected = straight[reader[0]]
    print(f"{writer[0]} -> {reader[0]}: resumed losses {[got[i] for i in (4, 5, 6)]}, "
          f"uninterrupted {[expected[i] for i in (4, 5, 6)]}")
    for it in (4, 5, 6):
        assert got[it] == pytest.approx(expected[it], rel=1e-5, abs=1e-6), (writer[0], reader[0], it)
