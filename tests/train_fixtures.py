"""Test helpers for the training side: a tiny tokenized folder (4 Megatron indexed datasets + manifest).

Documents are counting runs ``s, s+1, s+2, ... (mod vocab)`` ending in EOD, so a model can learn them
in a few iterations; ``train_ipt`` uses stride 2 so the two prefixes differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megatron_ipt.config import ExperimentConfig
from megatron_ipt.manifest import write_manifest

VOCAB = 250  # padded to 256 for TP 1 and 2
EOD = 0


def _documents(n_docs: int, stride: int, seed: int, min_len: int = 20, max_len: int = 120) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        length = int(rng.integers(min_len, max_len))
        start = int(rng.integers(1, VOCAB))
        body = (start + stride * np.arange(length)) % (VOCAB - 1) + 1  # ids 1..VOCAB-1, never EOD
        docs.append(np.append(body, EOD).astype(np.int32))
    return docs


def write_indexed(prefix: Path, docs: list[np.ndarray]) -> None:
    """Write ``prefix.bin`` / ``prefix.idx`` with megatron's ``IndexedDatasetBuilder`` (one document per array)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for doc in docs:
        builder.add_document(torch.from_numpy(doc), [len(doc)])
    builder.finalize(f"{prefix}.idx")


def make_tokenized_dir(root: Path, *, train_docs: int = 400, heldout_docs: int = 24) -> Path:
    """A folder shaped like the tokenize stage's output: train_raw, train_ipt, heldout_raw, heldout_pairs."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_indexed(root / "train_raw", _documents(train_docs, 1, seed=1))
    write_indexed(root / "train_ipt", _documents(train_docs, 2, seed=2))
    write_indexed(root / "heldout_raw", _documents(heldout_docs, 1, seed=3))
    write_indexed(root / "heldout_pairs", _documents(heldout_docs, 2, seed=4))
    write_manifest(root, stage="tokenize", fingerprint="test", config={},
                   tokenizer={"path": "synthetic", "vocab_size": VOCAB, "eod_id": EOD})
    return root


def tiny_config(**train) -> ExperimentConfig:
    """llama-test on CPU, seq 64, micro batch 2, global batch 4, fp32, logging every iteration."""
    cfg = ExperimentConfig()
    cfg.model.preset = "llama-test"
    cfg.model.seq_length = 64
    cfg.train.device = "cpu"
    cfg.train.micro_batch_size = 2
    cfg.train.global_batch_size = 4
    cfg.train.lr = 3e-3
    cfg.train.min_lr = 3e-4
    cfg.train.lr_warmup_iters = 2
    cfg.train.log_interval = 1
    cfg.train.eval_iters = 4
    for key, value in train.items():
        section, name = key.split("__") if "__" in key else ("train", key)
        setattr(getattr(cfg, section), name, value)
    return cfg


def losses_by_iteration(out_dir: Path) -> dict[int, float]:
    """Iteration -> training loss, from a run's ``metrics.jsonl`` (the log-line records)."""
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in records if "iteration" in r and "loss" in r}
