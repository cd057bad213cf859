"""Instruction-tuning samples from a token dataset and its loss-mask dataset (``PREFIX`` / ``PREFIX_mask``).

The on-disk format is ``data_prep.sft``'s (docs/training.md, "Instruction tuning"): two megatron-core indexed
datasets with the same document boundaries, token ids and a uint8 target mask. A conversation of ``L`` tokens
gives ``L - 1`` positions: inputs ``x[:-1]``, labels ``x[1:]``, ``loss_mask = mask[1:]``; one longer than
``seq_length + 1`` tokens is cut to its first ``seq_length + 1``.

Samples (keys and shapes as megatron-core's ``GPTDataset``: ``tokens``, ``labels``, ``position_ids`` int64
``[seq_length]``, ``loss_mask`` float32 ``[seq_length]``):
- ``padded``: one conversation per sample, then padding (EOD ids, ``loss_mask`` 0). Causal attention alone keeps
  the conversation from seeing the padding after it, so no ``attention_mask`` is given.
- ``packed``: conversations placed back to back in order (next fit) while they fit, then padding; ``position_ids``
  restart at 0 for every conversation and ``attention_mask`` (bool ``[1, seq_length, seq_length]``, True =
  masked) is causal within each conversation and masks everything across conversations (padding forms a block
  of its own). Only for attention that applies a given mask (megatron-core's local layer spec without the fused
  causal softmax kernel): see :func:`megatron_ipt.training.sft.resolve_packing`.

Training order: every epoch visits all conversations in a seeded permutation (``seed + epoch``), packed in that
order; samples are drawn until ``num_samples``. Evaluation (``num_samples`` None): one epoch in file order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megatron_ipt.training import mcore
from megatron_ipt.training.data import DataError, check_indexed

MASK_SUFFIX = "_mask"  # data_prep.sft.MASK_SUFFIX (the training side does not import data_prep)


def pack(order: np.ndarray, positions: np.ndarray, seq_length: int, packed: bool) -> list[list[int]]:
    """Group conversations (in ``order``) into samples: ``[[conversation index, ...], ...]``. ``positions[i]``:
    the positions conversation ``i`` fills (``min(L, seq_length + 1) - 1``; 0 is skipped). Next fit: a sample
    is closed when the next conversation does not fit; ``packed`` False: one conversation per sample."""
    samples: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        n = int(positions[i])
        if n <= 0:
            continue
        if current and (not packed or used + n > seq_length):
            samples.append(current)
            current, used = [], 0
        current.append(int(i))
        used += n
    if current:
        samples.append(current)
    return samples


def check_sft_files(prefix: str | Path, key: str) -> None:
    """Check ``prefix`` and ``prefix_mask`` before training reads them
    (:func:`megatron_ipt.training.data.check_indexed`: header, sizes, and what ``PREFIX.manifest.json`` records for
    all four files). Raises :class:`DataError` naming ``key``."""
    check_indexed(prefix, key)
    check_indexed(f"{prefix}{MASK_SUFFIX}", key)


class SFTDataset(torch.utils.data.Dataset):
    """Samples over ``prefix`` / ``prefix_mask`` (module docstring); ``len`` is ``num_samples`` (training) or the
    samples of one epoch (``num_samples`` None). Raises :class:`DataError` naming ``key`` when a file is missing,
    the two datasets disagree, or no conversation has a target token."""

    def __init__(self, prefix: str | Path, *, seq_length: int, packed: bool, pad_id: int, seed: int = 1234,
                 num_samples: int | None = None, key: str = "sft") -> None:
        prefix = str(prefix)
        for p in (prefix, prefix + MASK_SUFFIX):
            for suffix in (".bin", ".idx"):
                if not Path(p + suffix).is_file():
                    raise DataError(f"{key}: SFT dataset file missing: {p}{suffix}")
        self.tokens = mcore.indexed_dataset(prefix)
        self.mask = mcore.indexed_dataset(prefix + MASK_SUFFIX)
        lengths = np.asarray(self.tokens.sequence_lengths)
        if len(self.mask) != len(self.tokens) or not np.array_equal(lengths, self.mask.sequence_lengths):
            raise DataError(f"{key}: {prefix} and {prefix}{MASK_SUFFIX} do not have the same sequence lengths")
        self.seq_length, self.packed, self.pad_id = seq_length, packed, pad_id
        positions = np.minimum(lengths, seq_length + 1) - 1
        self.truncated = int((lengths > seq_length + 1).sum())
        if not len(lengths) or positions.max() <= 0:
            raise DataError(f"{key}: {prefix} holds no conversation of two tokens or more")
        samples: list[list[int]] = []
        epoch = 0
        while True:
            order = (np.arange(len(lengths)) if num_samples is None
                     else np.random.default_rng(seed + epoch).permutation(len(lengths)))
            samples += pack(order, positions, seq_length, packed)
            epoch += 1
            if num_samples is None or len(samples) >= num_samples:
                break
        self.samples = samples[:num_samples] if num_samples is not None else samples
        self.epochs = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s = self.seq_length
        tokens = np.full(s, self.pad_id, dtype=np.int64)
        labels = np.full(s, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        position_ids = np.zeros(s, dtype=np.int64)
        segment = np.full(s, -1, dtype=np.int64)
        offset = 0
        for k, i in enumerate(self.samples[index]):
            n = min(int(self.tokens.sequence_lengths[i]), s + 1)
            x = np.asarray(self.tokens.get(i, 0, n), dtype=np.int64)
            m = np.asarray(self.mask.get(i, 0, n), dtype=np.float32)
            tokens[offset:offset + n - 1], labels[offset:offset + n - 1] = x[:-1], x[1:]
            loss_mask[offset:offset + n - 1] = m[1:]
            position_ids[offset:offset + n - 1] = np.arange(n - 1)
            segment[offset:offset + n - 1] = k
            offset += n - 1
        position_ids[offset:] = np.arange(s - offset)
        sample = {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                  "loss_mask": torch.from_numpy(loss_mask), "position_ids": torch.from_numpy(position_ids)}
        if self.packed:
            seg = torch.from_numpy(segment)
            allowed = (seg[:, None] == seg[None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
            sample["attention_mask"] = (~allowed).unsqueeze(0)
        return sample
