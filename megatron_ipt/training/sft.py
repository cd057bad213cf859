"""The ``sft`` stage: supervised instruction tuning through the same trainer as ``train``.

:func:`sft_stage` runs the steps of :mod:`megatron_ipt.training.train` (``setup_model_and_optimizer``,
``load_or_start``, ``train_loop``, ``finish``: same parallel layouts, checkpoints, exact resume, logging) with the
SFT datasets of :mod:`megatron_ipt.training.sft_data` in place of the pre-training blend. The loss is the
schedule's masked mean (``step._loss_func``) with the samples' ``loss_mask``, i.e. over the assistant tokens
only. The run's ``train`` section is the experiment's, with the ``sft`` section's iterations, learning rate,
batch sizes and ``init_from`` put in (:func:`sft_train_config`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from megatron_ipt.config import ExperimentConfig
from megatron_ipt.training import checkpoint, checkpoint_trust, data, mcore, train
from megatron_ipt.training.presets import resolve_preset
from megatron_ipt.training.sft_data import SFTDataset, check_sft_files

TRAIN_PREFIX, VALID_PREFIX = "train", "valid"  # inside the stage's data folder
VALID_KEY = "sft_valid"


def sft_train_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """A copy of ``cfg`` whose ``train`` section carries the ``sft`` section's schedule, batch sizes and
    ``init_from`` (what the trainer reads)."""
    s = cfg.sft
    updates = {"train_iters": s.train_iters, "lr": s.lr, "min_lr": s.min_lr, "lr_warmup_iters": s.lr_warmup_iters,
               "init_from": s.init_from}
    updates.update({k: getattr(s, k) for k in ("micro_batch_size", "global_batch_size") if getattr(s, k) is not None})
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=updates)})


def resolve_packing(setting: str, model: list[torch.nn.Module]) -> bool:
    """True to pack conversations. Packing needs attention that applies the per-sample mask as given: megatron-core's
    own ``DotProductAttention`` (local spec) without the fused causal softmax kernel, which ignores masks.
    ``packed`` where unsupported raises :class:`data.DataError` naming ``sft.packing``; ``auto`` pads there."""
    config = model[0].config
    supported = mcore.applies_attention_masks(model[0]) and not getattr(config, "masked_softmax_fusion", False)
    if setting == "packed" and not supported:
        raise data.DataError("sft.packing = 'packed': this model's attention does not apply a per-sample mask "
                             "(Transformer Engine or fused softmax); use padded or auto")
    return setting == "packed" or (setting == "auto" and supported)


def read_data_manifest(data_dir: Path, name: str = TRAIN_PREFIX) -> dict:
    """The ``data_prep.sft`` manifest of ``data_dir/name`` (``name.manifest.json``); DataError when missing."""
    path = Path(data_dir) / f"{name}.manifest.json"
    if not path.is_file():
        raise data.DataError(f"sft: no tokenized conversations at {path} (run ipt sft, which tokenizes sft.data)")
    return json.loads(path.read_text())


def sft_stage(cfg: ExperimentConfig, data_dir: Path, out_dir: Path, fingerprint: str,
              *, exit_after_iterations: int | None = None) -> dict:
    """Tune on ``data_dir/train`` (+ ``data_dir/valid`` when present: held-out loss ``sft_valid``); returns the
    summary (``train.finish``'s). Resumes from ``out_dir/checkpoints``; otherwise starts from ``sft.init_from``.
    ``exit_after_iterations`` saves and stops early (as for ``train``). Must be called on every rank. Raises
    DataError naming the config key for a missing dataset or ``init_from``."""
    cfg = sft_train_config(cfg)
    return train.on_training_device(cfg, lambda cfg, device: _run(cfg, Path(data_dir), Path(out_dir), fingerprint,
                                                                  device, exit_after_iterations))


def _run(cfg: ExperimentConfig, data_dir: Path, out_dir: Path, fingerprint: str, device: torch.device,
         exit_after: int | None) -> dict:
    started = time.time()
    mcore.warn_if_unsupported()
    manifest = read_data_manifest(data_dir)
    tok = manifest["tokenizer"]
    tokenizer = data.DatasetTokenizer(vocab_size=int(tok["vocab_size"]), eod=int(tok["eod_id"]), path=str(tok["path"]))
    check_sft_files(data_dir / TRAIN_PREFIX, "sft.data")
    if (data_dir / f"{VALID_PREFIX}.bin").is_file():
        check_sft_files(data_dir / VALID_PREFIX, "sft.valid_data")
    if cfg.train.init_from and checkpoint.latest_iteration(out_dir / "checkpoints") is None:
        try:
            folder = checkpoint.resolve_checkpoint_dir(cfg.train.init_from)
        except FileNotFoundError as err:
            raise data.DataError(f"sft.init_from = {cfg.train.init_from!r}: {err}") from None
        checkpoint_trust.check(folder, trust=cfg.train.trust_checkpoint)
    inputs = train.Inputs(tokenizer=tokenizer, per_split=None, preset=resolve_preset(cfg.model))
    run = train.setup_model_and_optimizer(cfg, inputs, device)
    if run.rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
    packed = resolve_packing(cfg.sft.packing, run.model)
    t, seq = cfg.train, cfg.model.seq_length
    common = dict(seq_length=seq, packed=packed, pad_id=tokenizer.eod, seed=t.seed)
    sets = train.Datasets(train=SFTDataset(data_dir / TRAIN_PREFIX, num_samples=t.train_iters * t.global_batch_size,
                                           key="sft.data", **common))
    if (data_dir / f"{VALID_PREFIX}.bin").is_file():
        sets.heldout[VALID_KEY] = SFTDataset(data_dir / VALID_PREFIX, key="sft.valid_data", **common)
        sets.eval_seq[VALID_KEY] = seq
    train._say(f"sft: {'packed' if packed else 'padded'} sequences of {seq} tokens; "
               f"{sets.train.truncated} conversations longer than that are cut")
    state = train.load_or_start(cfg, out_dir, run, sets)
    loop = train.train_loop(cfg, out_dir, run, sets, state, exit_after, device)
    summary = train.finish(cfg, data_dir, out_dir, fingerprint, started, run, sets, state, loop, device, stage="sft",
                           manifest_inputs={"sft_data_manifest": data_dir / f"{TRAIN_PREFIX}.manifest.json"})
    summary["packed"] = packed
    return summary
