"""Training blend and held-out sets over Megatron indexed datasets, and the micro-batch iterators.

Datasets are megatron-core's: ``BlendedMegatronDatasetBuilder`` + ``GPTDatasetConfig`` build a
``BlendedDataset`` of ``GPTDataset`` s over the ``train_raw`` and ``train_ipt`` prefixes, weighted by
``cfg.blend.raw_weight`` / ``instruct_weight``; a held-out prefix becomes one ``GPTDataset`` covering the
whole prefix for one epoch, in a fixed (seeded) order. Each sample is a dict of ``tokens``, ``labels``,
``loss_mask``, ``position_ids`` (int64 / float32 tensors of shape ``[seq_length]``) and, when
``create_attention_mask`` is on, ``attention_mask`` (bool ``[1, seq_length, seq_length]``, True = masked).

The builder needs a process group (it coordinates the index cache across ranks); index caches go to
``cache_dir`` (the train output's ``blend_cache/``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from megatron_ipt.training import mcore
from megatron_ipt.errors import IptError

TRAIN_PREFIXES = ("train_raw", "train_ipt")
GENERAL_PREFIX = "train_general"  # the general instructions alone; written only when the format stage mixes some in


class DataError(IptError, ValueError):
    """An input named in the config (a dataset prefix, an init_from checkpoint) is missing or unusable; the
    message names the key."""

HELDOUT_PREFIXES = ("heldout_raw", "heldout_pairs")


@dataclass
class DatasetTokenizer:
    """The few tokenizer facts megatron's datasets need: vocabulary size and end-of-document id.

    Stands in for megatron's tokenizer classes (the legacy ``MegatronLegacyTokenizer`` module is gone in
    newer megatron-core). ``unique_identifiers`` is serialised into the dataset cache key
    (``datasets/megatron_dataset.py``), so two tokenizers with the same path, size and EOD share caches.
    """

    vocab_size: int
    eod: int
    path: str = ""
    unique_identifiers: dict = field(init=False)

    def __post_init__(self) -> None:
        self.unique_identifiers = {
            "class": type(self).__name__,
            "path": self.path,
            "vocab_size": self.vocab_size,
            "eod": self.eod,
        }

    @property
    def eos(self) -> int:
        return self.eod

    @classmethod
    def from_manifest(cls, manifest: dict) -> "DatasetTokenizer":
        """From a tokenize-stage manifest's ``"tokenizer": {"path", "vocab_size", "eod_id"}``.

        Raises KeyError naming the missing field.
        """
        tok = manifest.get("tokenizer")
        if not isinstance(tok, dict):
            raise KeyError("tokenize manifest has no 'tokenizer' section")
        for key in ("vocab_size", "eod_id"):
            if key not in tok:
                raise KeyError(f"tokenize manifest: 'tokenizer.{key}' is missing")
        return cls(vocab_size=int(tok["vocab_size"]), eod=int(tok["eod_id"]), path=str(tok.get("path", "")))


def check_prefixes(tokenized_dir: Path, prefixes: tuple[str, ...]) -> None:
    """Raise FileNotFoundError naming the first missing ``PREFIX.bin`` / ``PREFIX.idx``."""
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            path = Path(tokenized_dir) / f"{prefix}{suffix}"
            if not path.is_file():
                raise FileNotFoundError(f"indexed dataset file missing: {path}")


def check_indexed(prefix: str | Path, key: str, *, records: bool = True) -> None:
    """Check the indexed dataset ``prefix`` before anything reads it (``data_prep.dataset_check``: the ``.idx``
    header and size, the ``.bin`` size against the tokens the ``.idx`` counts, and, with ``records``, the size and
    sampled digest ``PREFIX.manifest.json`` records, if any). Raises :class:`DataError` naming ``key`` and the
    file, expected vs found."""
    from data_prep.dataset_check import IndexedDatasetError, check_dataset, check_with_manifest

    try:
        (check_with_manifest if records else check_dataset)(prefix)
    except (FileNotFoundError, IndexedDatasetError) as err:
        raise DataError(f"{key}: {err}") from None


def check_tokenized(tokenized_dir: Path, manifest: dict) -> None:
    """Check the tokenize stage's datasets (the four, and ``train_general`` when written): each pair (:func:`check_indexed`; DataError), then each output
    against the size and sampled digest the stage manifest records (``manifest.verify_outputs``; ManifestError;
    the per-prefix manifests beside them record the same files and are not read again)."""
    from megatron_ipt.manifest import verify_outputs

    general = (GENERAL_PREFIX,) if (Path(tokenized_dir) / f"{GENERAL_PREFIX}.idx").is_file() else ()
    for prefix in TRAIN_PREFIXES + general + HELDOUT_PREFIXES:
        check_indexed(Path(tokenized_dir) / prefix, f"tokenize stage dataset {prefix}", records=False)
    verify_outputs(tokenized_dir, manifest)


def prefix_tokens(tokenized_dir: Path, prefix: str) -> int:
    """Number of tokens in the indexed dataset ``tokenized_dir/prefix`` (read from its ``.idx``); 0 for an empty one
    (a 0-byte ``.bin``, e.g. ``heldout_pairs`` when no held-out document got a pair: it cannot be memory-mapped)."""
    if (Path(tokenized_dir) / f"{prefix}.bin").stat().st_size == 0:
        return 0
    dataset = mcore.indexed_dataset(str(Path(tokenized_dir) / prefix))  # keep it alive: its arrays view its mmap
    return int(dataset.sequence_lengths.sum())


def check_general(tokenized_dir: Path, general_weight: float) -> None:
    """Raise :class:`DataError` naming ``blend.general_weight`` when it is > 0 and the tokenize stage wrote no
    ``train_general`` (the format stage writes it only when ``format.general_instructions`` is set)."""
    prefix = Path(tokenized_dir) / GENERAL_PREFIX
    if general_weight > 0 and not (prefix.with_suffix(".bin").is_file() and prefix.with_suffix(".idx").is_file()):
        raise DataError(f"blend.general_weight = {general_weight} but {prefix}.bin/.idx do not exist: set "
                        "format.general_instructions (the format stage then writes the general instructions alone "
                        "as train_general) and rerun ipt run")


def document_masking(blend) -> dict[str, bool]:
    """``GPTDatasetConfig`` document-masking fields from ``blend`` (a ``BlendConfig``): ``reset_position_ids``
    (positions restart at 0 after every EOD), ``reset_attention_mask`` (no attention across an EOD: a per-sample
    boolean mask ``[1, s, s]``, True = masked, so ``create_attention_mask`` is turned on with it) and
    ``eod_mask_loss`` (no loss at positions whose input token is EOD)."""
    return {"reset_position_ids": blend.reset_position_ids, "reset_attention_mask": blend.reset_attention_mask,
            "eod_mask_loss": blend.eod_mask_loss}


def _gpt_config(
    *, tokenizer: DatasetTokenizer, seq_length: int, seed: int, cache_dir: Path, masking: dict | None = None, **kwargs
):
    masking = masking or {}
    return mcore.gpt_dataset_config(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=tokenizer,
        path_to_cache=str(cache_dir),
        reset_position_ids=masking.get("reset_position_ids", False),
        reset_attention_mask=masking.get("reset_attention_mask", False),
        eod_mask_loss=masking.get("eod_mask_loss", False),
        # Without per-document masks the causal mask is built inside the attention (saves S*S bytes per sample).
        create_attention_mask=masking.get("reset_attention_mask", False),
        mmap_bin_files=True,
        **kwargs,
    )


def check_extra_prefix(prefix: str | Path, key: str) -> Path:
    """Check an extra dataset prefix named by config ``key``: both files exist, agree (:func:`check_indexed`) and
    hold a document.

    Raises :class:`DataError` naming the key and the missing or mismatched file (or the empty dataset: megatron-core
    0.16.1's ``GPTDataset`` loops forever on a prefix without documents). Returns the prefix as a Path.
    """
    prefix = Path(prefix)
    for suffix in (".bin", ".idx"):
        if not Path(f"{prefix}{suffix}").is_file():
            raise DataError(f"{key} = {str(prefix)!r}: indexed dataset file missing: {prefix}{suffix}")
    check_indexed(prefix, key)
    check_not_empty(prefix, key)
    return prefix


def check_not_empty(prefix: str | Path, key: str) -> None:
    """Raise :class:`DataError` when the indexed dataset ``prefix`` has no document or no token."""
    empty = DataError(f"{key}: indexed dataset {prefix} holds no documents (megatron-core cannot sample from it)")
    if Path(f"{prefix}.bin").stat().st_size == 0:  # (an empty .bin cannot even be memory-mapped)
        raise empty
    dataset = mcore.indexed_dataset(str(prefix))
    if len(dataset) == 0 or int(dataset.sequence_lengths.sum()) < 2:
        raise empty


def build_train_dataset(
    tokenized_dir: Path,
    *,
    tokenizer: DatasetTokenizer,
    raw_weight: float,
    instruct_weight: float,
    general_weight: float = 0.0,
    num_samples: int,
    seq_length: int,
    seed: int,
    cache_dir: Path,
    extra: list[tuple[str | Path, float]] = (),
    masking: dict | None = None,
):
    """The weighted blend of ``train_raw``, ``train_ipt``, ``train_general`` and ``extra`` prefixes
    (``BlendedMegatronDatasetBuilder``).

    ``num_samples`` is the train split's size in sequences (iterations * global batch). ``extra`` is
    ``[(prefix path, weight > 0)]`` (``blend.extra``). Weights are normalised by megatron-core. A prefix
    with weight 0 is left out. Sample order is fixed by ``seed`` and the blend; index files are cached
    in ``cache_dir`` (``path_to_cache``). Returns the train split's dataset (a ``BlendedDataset`` or,
    with one prefix, a ``GPTDataset``). Must be called on every rank.
    Raises :class:`DataError` for a blended prefix without documents.
    """
    check_prefixes(tokenized_dir, TRAIN_PREFIXES)
    check_general(tokenized_dir, general_weight)
    prefixes, weights = [], []
    named = [(Path(tokenized_dir) / p, w, f"blend.{k}") for p, w, k in
             zip(TRAIN_PREFIXES + (GENERAL_PREFIX,), (raw_weight, instruct_weight, general_weight),
                 ("raw_weight", "instruct_weight", "general_weight"))]
    named += [(Path(p), w, f"blend.extra[{i}].prefix") for i, (p, w) in enumerate(extra)]
    for prefix, weight, key in named:
        if weight > 0:
            check_not_empty(prefix, key)
            prefixes.append(str(prefix))
            weights.append(float(weight))
    config = _gpt_config(
        tokenizer=tokenizer, seq_length=seq_length, seed=seed, cache_dir=cache_dir, masking=masking,
        blend=(prefixes, weights if len(prefixes) > 1 else None), split="100,0,0",
    )
    # Held-out evaluation uses whole held-out documents (corpus stage), so every training document goes to
    # the train split. A valid/test split with no document makes GPTDataset._get_num_epochs loop forever
    # (megatron-core 0.16.1), which small corpora hit. With blend weights every split needs a number.
    sizes = [num_samples, 0, 0]
    train, _valid, _test = mcore.build_gpt_datasets(sizes, config)
    return train


SPLITS = ("train", "valid", "test")


def resolve_split_prefix(prefix: str, tokenized_dir: Path) -> Path:
    """A ``blend.per_split`` prefix as a path: a tokenize-stage dataset name (``train_raw``, ``train_ipt``,
    ``train_general``, ``heldout_raw``, ``heldout_pairs``) names that dataset in ``tokenized_dir``; anything else is a path prefix."""
    if prefix in TRAIN_PREFIXES + (GENERAL_PREFIX,) + HELDOUT_PREFIXES:
        return Path(tokenized_dir) / prefix
    return Path(prefix)


def check_per_split(per_split: dict[str, list[tuple[str, float]]], tokenized_dir: Path) -> dict[str, list[tuple[Path, float]]]:
    """Resolve and check every ``blend.per_split`` prefix (both files exist, at least one document).

    ``per_split``: ``{"train": [(prefix, weight)], "valid": [...], "test": [...]}``. Returns the same with
    resolved paths. Raises :class:`DataError` naming the key (``blend.per_split.valid[1].prefix``).
    """
    out = {}
    for split in SPLITS:
        out[split] = [(check_extra_prefix(resolve_split_prefix(p, tokenized_dir), f"blend.per_split.{split}[{i}].prefix"),
                       float(w)) for i, (p, w) in enumerate(per_split.get(split) or [])]
    return out


def split_component_keys(split: str, prefixes: list[str | Path]) -> list[str]:
    """Metric names of the datasets of a ``blend.per_split`` valid / test blend, in config order.

    ``SPLIT.STEM``, the prefix's file name (a tokenize-stage name such as ``heldout_raw`` is its own stem):
    ``valid.general_valid``, ``valid.heldout_raw`` (as ``ipt eval --task perplexity`` names them). Stems that
    occur more than once in the split get their config index appended (``valid.valid.0``, ``valid.valid.2``
    for ``blend.per_split.valid[0]`` / ``[2]``), so names depend on the config alone and never collide.
    """
    stems = [Path(p).name for p in prefixes]
    return [f"{split}.{stem}" + (f".{i}" if stems.count(stem) > 1 else "") for i, stem in enumerate(stems)]


def build_per_split_datasets(
    per_split: dict[str, list[tuple[Path, float]]],
    *,
    tokenizer: DatasetTokenizer,
    num_samples: int,
    eval_samples: int,
    seq_length: int,
    seed: int,
    cache_dir: Path,
    masking: dict | None = None,
) -> tuple:
    """Train, valid and test datasets from one blend per split (megatron-core's ``blend_per_split``; no split
    ratios: every prefix is used whole by its split). ``per_split`` as returned by :func:`check_per_split`.

    The train split holds ``num_samples`` sequences drawn by weight. A valid / test split of one prefix covers
    that prefix once (as a held-out set does); one of several prefixes is a weighted blend of ``eval_samples``
    sequences (megatron-core needs a size for weighted blends). Returns ``(train, valid, test)``; a split
    without components is None. Must be called on every rank.
    """
    blends, sizes = [], []
    for split in SPLITS:
        components = per_split.get(split) or []
        if not components:
            blends.append(None)
            sizes.append(None)
            continue
        prefixes = [str(p) for p, _ in components]
        weighted = len(prefixes) > 1
        blends.append((prefixes, [w for _, w in components] if weighted else None))
        sizes.append(num_samples if split == "train" else (eval_samples if weighted else None))
    config = _gpt_config(tokenizer=tokenizer, seq_length=seq_length, seed=seed, cache_dir=cache_dir, masking=masking,
                         blend_per_split=blends)
    train, valid, test = mcore.build_gpt_datasets(sizes, config)
    return train, valid, test


def build_mock_train_dataset(*, tokenizer: DatasetTokenizer, num_samples: int, seq_length: int, seed: int,
                             cache_dir: Path, masking: dict | None = None):
    """megatron-core's ``MockGPTDataset`` (synthetic documents of token ids, no files): ``blend.mock``, for
    smoke tests and throughput runs without data. Samples have the same keys and shapes as the real blend's."""
    config = _gpt_config(tokenizer=tokenizer, seq_length=seq_length, seed=seed, cache_dir=cache_dir, masking=masking,
                         blend=None)
    train, _valid, _test = mcore.build_mock_gpt_datasets([num_samples, 1, 1], config)
    return train


def build_heldout_dataset(
    tokenized_dir: Path, prefix: str, *, tokenizer: DatasetTokenizer, seq_length: int, seed: int, cache_dir: Path,
    masking: dict | None = None,
):
    """One ``GPTDataset`` over the whole ``prefix`` (one epoch, every document, a seeded fixed order)."""
    check_prefixes(tokenized_dir, (prefix,))
    config = _gpt_config(
        tokenizer=tokenizer, seq_length=seq_length, seed=seed, cache_dir=cache_dir, masking=masking,
        blend=([str(Path(tokenized_dir) / prefix)], None), split="100,0,0",
    )
    dataset, _valid, _test = mcore.build_gpt_datasets([None, None, None], config)
    return dataset


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack per-sample tensors into a micro-batch: each key gets a leading ``[micro_batch]`` dim."""
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}


def micro_batches(
    dataset, *, micro_batch_size: int, data_parallel_rank: int, data_parallel_size: int, start_sample: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training micro-batches for one data-parallel rank (Megatron's pretraining sampler).

    Global samples are consumed in order from ``start_sample`` (the consumed-samples count, for exact
    resume); each block of ``micro_batch_size * data_parallel_size`` samples is split into contiguous
    per-rank slices. Stops when the dataset is exhausted.
    """
    block = micro_batch_size * data_parallel_size
    for first in itertools.count(start_sample, block):
        if first + block > len(dataset):
            return
        lo = first + data_parallel_rank * micro_batch_size
        yield collate([dataset[i] for i in range(lo, lo + micro_batch_size)])


def eval_micro_batches(
    dataset, *, micro_batch_size: int, data_parallel_rank: int, data_parallel_size: int, max_batches: int | None = None,
    multiple_of: int = 1,
) -> tuple[int, Iterator[dict[str, torch.Tensor]]]:
    """Micro-batches covering the whole held-out ``dataset`` once; returns ``(count, iterator)``.

    Every rank gets the same number of micro-batches; samples are dealt round-robin over ranks and the
    last micro-batches are padded with copies whose ``loss_mask`` is zero, so each sample counts exactly
    once in a per-token mean. ``max_batches`` caps the micro-batches per rank (``train.eval_iters``);
    ``count`` is then rounded up to a multiple of ``multiple_of`` with such zero-mask micro-batches (the
    interleaved pipeline schedule needs a multiple of the pipeline size).
    """
    n = len(dataset)
    block = micro_batch_size * data_parallel_size
    count = max((n + block - 1) // block, 1)
    if max_batches is not None:
        count = min(count, max_batches)
    real, count = count, -(-count // multiple_of) * multiple_of

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for b in range(count):
            samples = []
            for j in range(micro_batch_size):
                index = b * block + j * data_parallel_size + data_parallel_rank
                sample = dict(dataset[min(index, n - 1)])
                if index >= n or b >= real:
                    sample["loss_mask"] = torch.zeros_like(torch.as_tensor(sample["loss_mask"]))
                samples.append(sample)
            yield collate(samples)

    return count, batches()
