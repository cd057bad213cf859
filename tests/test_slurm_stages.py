"""The data stages on the real local Slurm cluster (tests/slurm_cluster.py): the synthesize array job and the
merge job it submits (which must run under the array's account, partition and time limit, without inherited
GPU/CPU requests), then format and the tokenize stage that fills RUN_DIR/tokenized for train.sbatch."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_synth import tiny_llama_path  # noqa: E402,F401
from test_slurm import VENV, _log  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slurm, pytest.mark.e2e]


def _submit(cluster, script: str, out: Path, *args: str, **env: str) -> str:
    full = {**cluster.env, "IPT_VENV": VENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    return cluster.sbatch(ROOT / "slurm" / script, f"--output={out}", *args, f"--account={cluster.account}",
                          f"--partition={cluster.partition}", env=full, cwd=ROOT)


@pytest.fixture(scope="module")
def synthesized(slurm_cluster, tiny_llama_path, tmp_path_factory):  # noqa: F811
    """A 4-document quickstart run whose synthesis ran as a 2-task array job plus its merge job on Slurm:
    (config, run folder, array job id, merge job id)."""
    from megatron_ipt.cli import main
    from megatron_ipt.config import load_config, resolved

    tmp = tmp_path_factory.mktemp("slurm_stages")
    cfg = load_config(ROOT / "examples" / "quickstart.yaml", [
        f"run_dir={tmp / 'run'}", "corpus.max_documents=4", f"synthesis.model={tiny_llama_path}",
        "synthesis.max_new_tokens=4", "synthesis.max_context_tokens=64",
        f"format.general_instructions={ROOT / 'examples/data/general_instructions.jsonl'}"])
    config = tmp / "exp.yaml"
    config.write_text(yaml.safe_dump(resolved(cfg), sort_keys=False))
    assert main(["corpus", str(config)]) == 0  # a login-node step (reads the corpus)
    log = tmp / "synth-%a.out"
    array = _submit(slurm_cluster, "synthesize.sbatch", log, "--array=0-1", "--time=00:10:00", CONFIG=str(config),
                    MERGE_SBATCH_ARGS=f"--output={tmp / 'merge.out'}")
    for task in ("0", "1"):
        assert slurm_cluster.wait(f"{array}_{task}", timeout=600) == "COMPLETED", _log(tmp / f"synth-{task}.out")
    submitted = re.search(r"Submitted batch job (\d+)", (tmp / "synth-0.out").read_text())
    assert submitted, _log(tmp / "synth-0.out")
    merge = submitted.group(1)
    assert slurm_cluster.wait(merge, timeout=600) == "COMPLETED", _log(tmp / "merge.out")
    return config, tmp / "run", array, merge


def test_the_merge_job_runs_under_the_array_jobs_account_partition_and_time_without_gpus(slurm_cluster, synthesized):
    config, run, array, merge = synthesized
    state, account, partition, limit, tres = slurm_cluster.accounting(merge, "State,Account,Partition,Timelimit,ReqTRES")
    assert (state, account, partition, limit) == ("COMPLETED", slurm_cluster.account, slurm_cluster.partition, "00:10:00")
    assert "gres/gpu" not in tres and "cpu=1," in tres + ",", tres
    assert len((run / "synthesis" / "pairs.jsonl").read_text().splitlines()) == 4


def test_format_and_tokenize_run_as_slurm_jobs_and_fill_the_runs_tokenized_folder(slurm_cluster, synthesized):
    config, run, _, _ = synthesized
    log = run.parent / "stages.out"
    fmt = _submit(slurm_cluster, "format.sbatch", log, "--open-mode=append", CONFIG=str(config))
    tok = _submit(slurm_cluster, "tokenize.sbatch", log, "--open-mode=append", f"--dependency=afterok:{fmt}",
                  "--cpus-per-task=1", CONFIG=str(config))
    assert slurm_cluster.wait(tok, timeout=600) == "COMPLETED", _log(log)
    assert slurm_cluster.state(fmt)[0] in ("COMPLETED", "")
    manifest = json.loads((run / "tokenized" / "manifest.json").read_text())
    assert manifest["stage"] == "tokenize"
    assert {"train_raw", "train_ipt"} <= set(manifest["counts"]), manifest["counts"]
    assert json.loads((run / "formatted" / "manifest.json").read_text())["stage"] == "format"
