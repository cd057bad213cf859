"""Shard assignment, per-shard files with manifests, and merge validation (data_prep/shards.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from data_prep.errors import DataPrepError
from data_prep.shards import ShardJournal, merge_shards, select_shard, shard_finished, shard_of, shard_paths, write_shard

DOCS = [{"id": f"doc-{i}", "split": "train", "text": f"text {i}"} for i in range(200)]


def test_assignment_covers_every_document_once_and_is_stable_across_processes():
    for n in (1, 2, 3, 7):
        shards = [select_shard(DOCS, i, n) for i in range(n)]
        ids = [d["id"] for s in shards for d in s]
        assert sorted(ids) == sorted(d["id"] for d in DOCS)
        assert len(ids) == len(set(ids))
    # another interpreter (different hash salt) assigns the same shards
    code = "from data_prep.shards import shard_of; print([shard_of(f'doc-{i}', 7) for i in range(200)])"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert json.loads(other.stdout) == [shard_of(f"doc-{i}", 7) for i in range(200)]
    sizes = [len(select_shard(DOCS, i, 4)) for i in range(4)]
    assert min(sizes) > 30  # roughly balanced


def test_bad_index_and_duplicate_ids_are_errors():
    with pytest.raises(DataPrepError, match="shard-index"):
        select_shard(DOCS, 3, 3)
    with pytest.raises(DataPrepError, match="duplicate document id 'doc-0'"):
        select_shard(DOCS + [DOCS[0]], 0, 2)


def _write_all(tmp_path, n):
    for i in range(n):
        recs = [dict(d, pairs=[]) for d in select_shard(DOCS, i, n)]
        write_shard(tmp_path, i, n, recs, {"generated_tokens": 10 * len(recs), "generation_seconds": 2.0})


def test_merge_restores_input_order(tmp_path):
    _write_all(tmp_path, 3)
    assert all(shard_finished(tmp_path, i, 3) for i in range(3))
    counts = merge_shards(tmp_path, 3, DOCS, tmp_path / "pairs.jsonl")
    merged = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [r["id"] for r in merged] == [d["id"] for d in DOCS]
    assert counts["documents"] == 200 and counts["generated_tokens"] == 2000 and counts["generation_seconds"] == 6.0
    assert not list(tmp_path.glob(".*.tmp"))


def test_merged_counts_sum_the_shards_pair_structure(tmp_path):
    for i in range(2):
        recs = [dict(d, pairs=[]) for d in select_shard(DOCS, i, 2)]
        write_shard(tmp_path, i, 2, recs, {"pair_structure": {"plain": 3 + i, "cot": i, "issue:x": 1}})
    counts = merge_shards(tmp_path, 2, DOCS, tmp_path / "pairs.jsonl")
    assert counts["pair_structure"] == {"cot": 1, "issue:x": 2, "plain": 7}


def test_journal_keeps_complete_batches_only(tmp_path):
    journal = ShardJournal(tmp_path / ".partial.jsonl")
    journal.append([{"id": "a", "chunk": 0, "text": "x", "tokens": 1}], 0.5)
    journal.append([{"id": "b", "chunk": 0, "text": "y", "tokens": 2}, {"id": "b", "chunk": 1, "text": "z", "tokens": 3}], 1.0)
    with open(journal.path, "ab") as f:
        f.write(b'{"batch": 2, "results": [{"id": "c"')  # cut by a crash before its progress record
    again = ShardJournal(journal.path)
    assert sorted(again.load()) == [("a", 0), ("b", 0), ("b", 1)]
    assert (again.batches, again.prompts, again.seconds) == (2, 3, 1.5)
    assert journal.path.read_bytes().endswith(b"}\n")  # the cut line is gone
    journal.progress_path.unlink()  # no progress record: nothing is trusted, the shard starts over
    assert ShardJournal(journal.path).load() == {} and not journal.path.exists()


def test_journal_written_for_another_key_is_discarded_not_reused(tmp_path):
    journal = ShardJournal(tmp_path / ".partial.jsonl", key="config-a:input-a")
    journal.append([{"id": "a", "chunk": 0, "text": "x", "tokens": 1}], 0.5)
    assert ShardJournal(journal.path, key="config-a:input-a").load() == {("a", 0): {"id": "a", "chunk": 0, "text": "x", "tokens": 1}}
    other = ShardJournal(journal.path, key="config-a:input-b")
    assert other.load() == {} and "another config or input" in other.discarded
    assert not journal.path.exists() and not journal.progress_path.exists()


def test_missing_shard_is_named(tmp_path):
    _write_all(tmp_path, 3)
    shard_paths(tmp_path, 1, 3)[1].unlink()
    assert not shard_finished(tmp_path, 1, 3)
    with pytest.raises(DataPrepError, match="shard 1 of 3 is missing or unfinished"):
        merge_shards(tmp_path, 3, DOCS, tmp_path / "pairs.jsonl")
    assert not (tmp_path / "pairs.jsonl").exists()


def test_corrupt_shard_is_named(tmp_path):
    _write_all(tmp_path, 3)
    path = shard_paths(tmp_path, 2, 3)[0]
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataPrepError, match=r"shard 2 of 3 is corrupt: .*shard-00002-of-00003.jsonl"):
        merge_shards(tmp_path, 3, DOCS, tmp_path / "pairs.jsonl")


def test_document_missing_from_shards_is_named(tmp_path):
    _write_all(tmp_path, 2)
    extra = {"id": "not-synthesized", "split": "train", "text": "x"}
    with pytest.raises(DataPrepError, match="lacks document 'not-synthesized'"):
        merge_shards(tmp_path, 2, DOCS + [extra], tmp_path / "pairs.jsonl")


from fixtures_synth import save_tiny_llama, tiny_llama_path  # noqa: E402,F401 (fixture)


def _ipt(*args, cwd, env_extra=None):
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SLURM_ARRAY_TASK_ID", None)
    env.pop("SLURM_ARRAY_TASK_COUNT", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "megatron_ipt.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


def test_two_shard_cli_run_then_merge_equals_unsharded_run(tiny_llama_path, tmp_path):
    """Real tiny model, real CLI: shards by index and by Slurm array variables, rerun skips, merge == one run."""
    import pathlib

    repo = pathlib.Path(__file__).parents[1]
    common = ["--set", "corpus.max_documents=6", "--set", f"synthesis.model={tiny_llama_path}",
              "--set", "synthesis.max_new_tokens=4", "--set", "synthesis.max_context_tokens=64"]
    cfg_a = [str(repo / "examples/quickstart.yaml"), "--set", f"run_dir={tmp_path / 'a'}", *common]
    cfg_b = [str(repo / "examples/quickstart.yaml"), "--set", f"run_dir={tmp_path / 'b'}", *common]
    for cfg in (cfg_a, cfg_b):
        r = _ipt("corpus", *cfg, cwd=repo)
        assert r.returncode == 0, r.stderr
    r = _ipt("synthesize", *cfg_a, cwd=repo)
    assert r.returncode == 0, r.stderr
    r = _ipt("synthesize", *cfg_b, "--merge", "--num-shards", "2", cwd=repo)
    assert r.returncode == 2 and "shard 0 of 2 is missing" in r.stderr
    r = _ipt("synthesize", *cfg_b, "--num-shards", "2", "--shard-index", "0", cwd=repo)
    assert r.returncode == 0, r.stderr
    r = _ipt("synthesize", *cfg_b, cwd=repo, env_extra={"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"})
    assert r.returncode == 0, r.stderr
    r = _ipt("synthesize", *cfg_b, "--num-shards", "2", "--shard-index", "0", cwd=repo)
    assert r.returncode == 0 and "already finished" in r.stderr
    r = _ipt("synthesize", *cfg_b, "--merge", "--num-shards", "2", cwd=repo)
    assert r.returncode == 0, r.stderr
    a = (tmp_path / "a" / "synthesis" / "pairs.jsonl").read_text()
    b = (tmp_path / "b" / "synthesis" / "pairs.jsonl").read_text()
    assert a == b and len(a.splitlines()) == 6
    manifest = json.loads((tmp_path / "b" / "synthesis" / "manifest.json").read_text())
    assert manifest["counts"]["documents"] == 6 and manifest["counts"]["shards"] == 2


def test_synthesize_sbatch_runs_its_array_tasks_and_merge(tiny_llama_path, tmp_path):
    """slurm/synthesize.sbatch is valid bash, and its ipt command lines run for real (2 array tasks, then the
    merge step), outside Slurm, with the Slurm variables set by hand (no sbatch: SLURM_ARRAY_JOB_ID unset)."""
    import os
    import pathlib

    repo = pathlib.Path(__file__).parents[1]
    script = repo / "slurm" / "synthesize.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    sets = (f"--set run_dir={tmp_path / 'run'} --set corpus.max_documents=4 --set synthesis.model={tiny_llama_path} "
            "--set synthesis.max_new_tokens=4 --set synthesis.max_context_tokens=64")
    r = _ipt("corpus", str(repo / "examples/quickstart.yaml"), *sets.split(), cwd=repo)
    assert r.returncode == 0, r.stderr
    venv = pathlib.Path(sys.executable).parents[1]
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base.update(CONFIG=str(repo / "examples/quickstart.yaml"), SYNTH_ARGS=sets, IPT_VENV=str(venv),
                SLURM_SUBMIT_DIR=str(repo), OMP_NUM_THREADS="1")
    for task in ("0", "1"):
        env = dict(base, SLURM_ARRAY_TASK_ID=task, SLURM_ARRAY_TASK_COUNT="2")
        r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    r = subprocess.run(["bash", str(script)], env=dict(base, SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_TASK_COUNT="2"),
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--array=0-1" in r.stderr
    r = subprocess.run(["bash", str(script)], env=dict(base, IPT_SYNTHESIZE_MERGE="1", IPT_NUM_SHARDS="2"),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "run" / "synthesis" / "pairs.jsonl").read_text().splitlines()
    assert len(lines) == 4


def _two_runs(tmp_path, model, *sets):
    """The quickstart config on 16 documents with ``model`` (plus the ``sets`` overrides) and one prompt per batch
    (so a kill falls between journaled batches), as two runs: ``a`` (uninterrupted) and ``b`` (to be killed); the
    corpus stage done in both. Returns (repo, CLI args of a, CLI args of b)."""
    import pathlib

    repo = pathlib.Path(__file__).parents[1]
    common = ["--set", "corpus.max_documents=16", "--set", f"synthesis.model={model}",
              "--set", "synthesis.max_new_tokens=48", "--set", "synthesis.max_context_tokens=64",
              "--set", "synthesis.batch_size=1", *[a for s in sets for a in ("--set", s)]]
    cfg_a = [str(repo / "examples/quickstart.yaml"), "--set", f"run_dir={tmp_path / 'a'}", *common]
    cfg_b = [str(repo / "examples/quickstart.yaml"), "--set", f"run_dir={tmp_path / 'b'}", *common]
    for cfg in (cfg_a, cfg_b):
        assert _ipt("corpus", *cfg, cwd=repo).returncode == 0
    return repo, cfg_a, cfg_b


def _kill_9_when(args, cwd, ready) -> bool:
    """Start ``ipt ARGS`` and SIGKILL it as soon as ``ready()`` is true (within 120 s); False when it ended first."""
    import os
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.Popen([sys.executable, "-m", "megatron_ipt.cli", *args], cwd=cwd,
                            env=dict(env, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return killed


@pytest.mark.e2e
def test_kill_9_mid_shard_then_rerun_resumes_after_the_last_batch_and_merges_every_document_once(tiny_llama_path, tmp_path):
    """A shard process killed with SIGKILL after some batches leaves no shard file, only its journal; the rerun
    generates only the batches not in the journal, and the merged output equals an uninterrupted (unsharded) run,
    every document exactly once."""
    from data_prep.shards import journal_path, shard_paths

    repo, cfg_a, cfg_b = _two_runs(tmp_path, tiny_llama_path)
    assert _ipt("synthesize", *cfg_a, cwd=repo).returncode == 0
    assert _ipt("synthesize", *cfg_b, "--num-shards", "2", "--shard-index", "0", cwd=repo).returncode == 0
    shard_dirs = list((tmp_path / "b" / "synthesis.shards").iterdir())
    assert len(shard_dirs) == 1
    journal = journal_path(shard_dirs[0], 1, 2)
    progress = journal.with_name(journal.name + ".progress.json")
    killed = _kill_9_when(["synthesize", *cfg_b, "--num-shards", "2", "--shard-index", "1"], repo, progress.exists)
    print("killed mid-shard:", killed)
    if killed:
        assert not shard_paths(shard_dirs[0], 1, 2)[1].exists()
        assert journal.exists() and json.loads(progress.read_text())["batches"] >= 1
        r = _ipt("synthesize", *cfg_b, "--merge", "--num-shards", "2", cwd=repo)
        assert r.returncode == 2 and "shard 1 of 2 is missing" in r.stderr
    r = _ipt("synthesize", *cfg_b, "--num-shards", "2", "--shard-index", "1", cwd=repo)
    assert r.returncode == 0, r.stderr
    manifest = json.loads(shard_paths(shard_dirs[0], 1, 2)[1].read_text())
    if killed:  # batch_size 1: every prompt journaled before the kill was not generated again
        assert 1 <= manifest["counts"]["resumed_prompts"] < manifest["records"]
    assert not journal.exists() and not progress.exists()
    r = _ipt("synthesize", *cfg_b, "--merge", "--num-shards", "2", cwd=repo)
    assert r.returncode == 0, r.stderr
    a = (tmp_path / "a" / "synthesis" / "pairs.jsonl").read_text()
    b = (tmp_path / "b" / "synthesis" / "pairs.jsonl").read_text()
    ids = [json.loads(line)["id"] for line in b.splitlines()]
    assert a == b and len(ids) == len(set(ids)) == 16
    assert not [p for p in shard_dirs[0].iterdir() if p.name.startswith(".") and "tmp" in p.name]


def _quickstart(tmp_path, model, *sets):
    import pathlib

    from megatron_ipt.config import load_config

    repo = pathlib.Path(__file__).parents[1]
    return load_config(str(repo / "examples/quickstart.yaml"), [
        f"run_dir={tmp_path}", "corpus.max_documents=6", f"synthesis.model={model}", "synthesis.max_new_tokens=4",
        "synthesis.max_context_tokens=64", *sets])


def test_unsharded_run_reuses_only_a_journal_of_its_own_config_and_input_and_then_deletes_it(tiny_llama_path, tmp_path):
    """The unsharded stage journals as shard 0 of 1: batches in a journal keyed by this stage's fingerprint,
    input and synthesizer files are taken as generated (here a marker text), a journal with another key (another
    config, or weights since rewritten in place) is thrown away, and the journal and its folders are gone once
    synthesis/ is written."""
    import shutil

    from data_prep.shards import journal_path
    from megatron_ipt.manifest import sha256_file
    from megatron_ipt.pipeline import run_corpus, run_synthesize, stage_path, synthesis_fingerprint, synthesis_shard_dir

    from data_prep.models import files_stamp

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_path, model)
    cfg = _quickstart(tmp_path, model)
    run_corpus(cfg)
    docs = [json.loads(line) for line in (stage_path(cfg, "corpus") / "documents.jsonl").read_text().splitlines()]
    marker = [{"id": d["id"], "chunk": c, "text": " JOURNALED <ANS> x </END>", "tokens": 4} for d in docs for c in range(8)]
    config_and_input = f"{synthesis_fingerprint(cfg)}:{sha256_file(stage_path(cfg, 'corpus') / 'documents.jsonl')}"
    old_weights = files_stamp(model)
    weights = next(p for p in model.iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes())  # rewritten in place (same bytes, new modification time)
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    right_key = f"{config_and_input}:{files_stamp(model)}"
    assert right_key != f"{config_and_input}:{old_weights}"
    for key, reused in (("an-older-config:input:weights", False), (f"{config_and_input}:{old_weights}", False),
                        (right_key, True)):
        shutil.rmtree(stage_path(cfg, "synthesize"), ignore_errors=True)
        ShardJournal(journal_path(synthesis_shard_dir(cfg), 0, 1), key=key).append(marker, 1.0)
        counts = run_synthesize(cfg).manifest["counts"]
        raw = [json.loads(line)["raw_output"] for line in (stage_path(cfg, "synthesize") / "pairs.jsonl").read_text().splitlines()]
        assert len(raw) == 6
        assert all("JOURNALED" in str(r) for r in raw) == reused and any("JOURNALED" in str(r) for r in raw) == reused
        assert (counts["resumed_prompts"] == counts["prompts"]) if reused else counts["resumed_prompts"] == 0
        assert not (tmp_path / "synthesis.shards").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("rounds", [1, 2])
def test_kill_9_mid_unsharded_run_then_rerun_resumes_after_the_last_batch_and_writes_the_same_output(tiny_llama_path, tmp_path, rounds):
    """``ipt synthesize`` without shards killed with SIGKILL after some batches leaves no synthesis/ folder, only
    its journal; the rerun generates only the batches not in the journal, and synthesis/pairs.jsonl is
    byte-identical to an uninterrupted run's (with 2 rounds the kill falls in round 0, and round 1's
    prompts are built from round 0's outputs read back from the journal)."""
    repo, cfg_a, cfg_b = _two_runs(tmp_path, tiny_llama_path, f"synthesis.rounds={rounds}")
    assert _ipt("synthesize", *cfg_a, cwd=repo).returncode == 0
    assert not (tmp_path / "a" / "synthesis.shards").exists()  # an uninterrupted run leaves no journal
    progress = []

    def journaled() -> bool:
        progress[:] = (tmp_path / "b").glob("synthesis.shards/*/.shard-00000-of-00001.partial.jsonl.progress.json")
        return bool(progress)

    killed = _kill_9_when(["synthesize", *cfg_b], repo, journaled)
    print("killed mid-run:", killed)
    if killed:
        assert not (tmp_path / "b" / "synthesis").exists()
        assert json.loads(progress[0].read_text())["batches"] >= 1
    r = _ipt("synthesize", *cfg_b, cwd=repo)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "b" / "synthesis" / "manifest.json").read_text())
    if killed:  # batch_size 1: every prompt journaled before the kill was not generated again
        assert 1 <= manifest["counts"]["resumed_prompts"] < manifest["counts"]["prompts"]
        assert "resumed from its journal" in r.stderr
    assert not (tmp_path / "b" / "synthesis.shards").exists()
    a = (tmp_path / "a" / "synthesis" / "pairs.jsonl").read_bytes()
    b = (tmp_path / "b" / "synthesis" / "pairs.jsonl").read_bytes()
    ids = [json.loads(line)["id"] for line in b.splitlines()]
    assert a == b and len(ids) == len(set(ids)) == 16
