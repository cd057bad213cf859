"""A Megatron checkpoint as a temporary Hugging Face folder, for tools that only read Hugging Face models
(lm-evaluation-harness): the project's streamed exporter (:func:`megatron_ipt.hf.convert.megatron_to_hf`, what
``ipt convert megatron-to-hf`` runs) writes it, and it is removed when the ``with`` block ends, also on error.

The exporter needs a Hugging Face reference folder with the model's ``config.json`` (architecture) and its
tokenizer files, the same one ``ipt convert megatron-to-hf --hf-config-from`` takes. :func:`reference_folder`
finds it: the folder the user names, else the experiment's ``model.hf_config`` (its folder when it names a
``config.json``), else the ``hf/`` folder that ``ipt convert hf-to-megatron`` stores next to a checkpoint. A
checkpoint trained from a preset has none of these: :func:`preset_reference` writes one from the experiment's
model config (as every other ``ipt eval`` reads the checkpoint) and tokenizer, checked by reading it back.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from megatron_ipt.errors import IptError
from megatron_ipt.training.presets import ModelPreset

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ExportError(IptError, ValueError):
    """No Hugging Face reference config for a checkpoint, or the export failed; the message names the
    checkpoint or folder and the option to pass."""


@dataclass(frozen=True)
class Exported:
    """A checkpoint exported for evaluation: ``folder`` (temporary Hugging Face folder), ``checkpoint`` (the
    resolved torch_dist folder, e.g. ``.../iter_0000030``), ``iteration`` (from its ``iter_N`` name; None for
    another folder name), ``reference`` (the Hugging Face folder its config and tokenizer came from; None when
    they were derived from the experiment, :func:`preset_reference`), ``reference_config_sha256`` (of the
    config.json used) and ``dtype`` (of the exported weights)."""

    folder: Path
    checkpoint: Path
    iteration: int | None
    reference: Path | None
    reference_config_sha256: str
    dtype: str


def reference_folder(checkpoint: str | Path, hf_config_from: str | Path | None = None,
                     model_hf_config: str | None = None, *, required: bool = True) -> Path | None:
    """The Hugging Face folder that describes ``checkpoint`` (module docstring for the order). When there is
    none: None if not ``required``, else ExportError naming the checkpoint and ``--hf-config-from``. ExportError
    naming the folder when a named one has no ``config.json``."""
    if hf_config_from:
        folder, what = Path(hf_config_from), "--hf-config-from"
    elif model_hf_config:
        path = Path(model_hf_config)
        folder, what = (path if path.is_dir() else path.parent), "model.hf_config"
    else:
        from megatron_ipt.hf.convert import hf_files_next_to

        found = hf_files_next_to(checkpoint)
        if found is not None or not required:
            return found
        raise ExportError(f"{checkpoint}: no Hugging Face config to export it with: pass --hf-config-from FOLDER "
                          "(the model's config.json and tokenizer) or set model.hf_config")
    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder}: no config.json ({what} must be a Hugging Face folder with the model's "
                          "config.json and tokenizer)")
    return folder


def preset_reference(preset: ModelPreset, folder: str | Path, *, vocab_size: int, tokenizer: str | Path | None,
                     what: str = "the experiment's model config") -> Path:
    """Write ``folder`` as the Hugging Face reference of a checkpoint trained from ``preset``: ``config.json``
    (transformers' ``LlamaConfig``, ``Qwen2Config`` for presets with QKV bias, ``Qwen3Config`` for presets with
    QK-norm, ``MistralConfig`` for presets with a sliding window, ``Qwen3MoeConfig`` / ``MixtralConfig`` for MoE
    presets with / without QK-norm) with the preset's sizes, RoPE, sliding window,
    norm epsilon, tied embeddings and Llama-3.1 RoPE scaling, ``vocab_size`` (the tokenizer's: the export cuts
    the checkpoint's padding rows) and the tokenizer's bos/eos ids, plus the tokenizer files of ``tokenizer``
    (a Hugging Face tokenizer folder or ``tokenizer.json``). Returns ``folder``. Raises ExportError naming
    ``tokenizer`` when it is not a Hugging Face tokenizer, or when the config does not read back as ``preset``
    (:func:`megatron_ipt.training.presets.preset_from_hf_config`)."""
    import dataclasses

    import transformers

    from megatron_ipt.training.presets import preset_from_hf_config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _copy_tokenizer(tokenizer, folder, f"{what}: no Hugging Face config to export the checkpoint with")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for an unreadable tokenizer
        raise ExportError(f"{tokenizer}: not a Hugging Face tokenizer ({type(e).__name__}): pass --hf-config-from "
                          "a folder with the model's config.json and tokenizer") from None
    p = preset
    rope = {"rope_type": "llama3", "factor": p.rope_scaling_factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192} if p.rope_scaling_factor else None
    cls = (transformers.Qwen3Config if p.qk_layernorm else transformers.Qwen2Config if p.add_qkv_bias
           else transformers.MistralConfig if p.sliding_window else transformers.LlamaConfig)
    moe = {"sliding_window": p.sliding_window} if cls is transformers.MistralConfig else {}
    if p.num_moe_experts:  # Qwen3-MoE (QK-norm) or Mixtral; a preset neither can express fails the read-back below
        cls = transformers.Qwen3MoeConfig if p.qk_layernorm else transformers.MixtralConfig
        moe = dict(num_experts_per_tok=p.moe_router_topk, router_aux_loss_coef=p.moe_aux_loss_coeff)
        moe.update(dict(num_experts=p.num_moe_experts, moe_intermediate_size=p.expert_ffn_hidden_size,
                        norm_topk_prob=not p.moe_router_pre_softmax) if p.qk_layernorm
                   else dict(num_local_experts=p.num_moe_experts, sliding_window=p.sliding_window))
    config = cls(head_dim=p.kv_channels, vocab_size=vocab_size, hidden_size=p.hidden_size,
                 intermediate_size=p.ffn_hidden_size, num_hidden_layers=p.num_layers, num_attention_heads=p.num_attention_heads,
                 num_key_value_heads=p.num_query_groups, max_position_embeddings=p.max_position_embeddings,
                 rope_theta=p.rotary_base, rms_norm_eps=p.norm_epsilon, tie_word_embeddings=p.tie_word_embeddings,
                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                 **({"rope_scaling": rope} if rope else {}), **({} if p.add_qkv_bias else {"attention_bias": False}),
                 **moe)
    config.save_pretrained(folder)
    try:
        back = preset_from_hf_config(folder)
    except ValueError as e:
        raise ExportError(f"{what}: cannot be written as a Hugging Face config ({e})") from None
    expected = dataclasses.replace(preset, vocab_size=vocab_size, init_method_std=back.init_method_std)
    if back != expected:
        diff = {f.name: (getattr(expected, f.name), getattr(back, f.name)) for f in dataclasses.fields(back)
                if getattr(expected, f.name) != getattr(back, f.name)}
        raise ExportError(f"{what}: the Hugging Face config written for it reads back differently {diff}: pass "
                          "--hf-config-from")
    return folder


@contextmanager
def exported(checkpoint: str | Path, *, reference: Path | None, work_dir: str | Path, dtype: str | None = None,
             tokenizer_dir: str | Path | None = None, preset: ModelPreset | None = None,
             vocab_size: int | None = None, trust: bool = False) -> Iterator[Exported]:
    """Export ``checkpoint`` (a checkpoints folder with ``latest``, an ``iter_*`` or a converted folder) to a
    temporary Hugging Face folder under ``work_dir`` (created; the folder is named ``.hf-export-*``) with the
    config and tokenizer of ``reference``; yields :class:`Exported`; removes the folder on exit, also on error.
    ``reference`` None: written from ``preset``, ``vocab_size`` and ``tokenizer_dir`` (:func:`preset_reference`)
    into the temporary folder. ``trust``: skip the scan of the checkpoint's pickles (``megatron_to_hf``'s).
    ``dtype``: float32 / bfloat16 / float16 (default: the reference config's).
    ``tokenizer_dir``: a Hugging Face tokenizer folder (or tokenizer.json) whose tokenizer files are copied when
    ``reference`` has none. Raises ExportError (ConvertError, an IptError, when the checkpoint does not fit the
    config; for a derived config the message says so)."""
    from megatron_ipt.training import checkpoint as ckpt_mod
    from megatron_ipt.hf import convert

    try:
        ckpt_dir = ckpt_mod.resolve_checkpoint_dir(checkpoint)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from None
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hf-export-", dir=work_dir))
    try:
        folder, source = tmp / "hf", reference
        if source is None:
            if preset is None or vocab_size is None:
                raise ExportError(f"{checkpoint}: no Hugging Face config to export it with: pass --hf-config-from")
            source = preset_reference(preset, tmp / "reference", vocab_size=vocab_size, tokenizer=tokenizer_dir)
        try:
            manifest = convert.megatron_to_hf(ckpt_dir, folder, hf_config_from=source, dtype=dtype, trust=trust)
        except (ValueError, FileNotFoundError) as e:
            message = str(e) if isinstance(e, IptError) else f"{checkpoint}: cannot export with {source}: {e}"
            if reference is None:  # the temporary config is gone when the user reads this
                message = message.replace(str(source / "config.json"), "the experiment's model config").replace(
                    str(source), "the experiment's model config") + " (pass --hf-config-from for the model's own)"
            raise ExportError(message) from None
        if not any((folder / f).is_file() for f in TOKENIZER_FILES):
            _copy_tokenizer(tokenizer_dir, folder, f"{reference}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        name = ckpt_dir.name
        yield Exported(folder=folder, checkpoint=ckpt_dir,
                       iteration=int(name[5:]) if name.startswith("iter_") and name[5:].isdigit() else None,
                       reference=reference, dtype=manifest["dtype"],
                       reference_config_sha256=hashlib.sha256((source / "config.json").read_bytes()).hexdigest())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_tokenizer(tokenizer_dir: str | Path | None, folder: Path, missing: str) -> None:
    """Copy the Hugging Face tokenizer files of ``tokenizer_dir`` (a folder, or a bare ``tokenizer.json``) into
    ``folder``; ExportError starting with ``missing`` when it is no Hugging Face tokenizer."""
    source = Path(tokenizer_dir) if tokenizer_dir else None
    if source is not None and source.is_file() and source.name in TOKENIZER_FILES:  # e.g. a bare tokenizer.json
        shutil.copy2(source, folder / source.name)
        return
    if source is None or not source.is_dir() or not any((source / f).is_file() for f in TOKENIZER_FILES):
        raise ExportError(f"{missing} and the experiment's tokenizer ({source}) is not a Hugging Face tokenizer "
                          "folder: pass --hf-config-from a folder with the model's config.json and tokenizer")
    for f in source.iterdir():
        if f.is_file() and (f.name in TOKENIZER_FILES or f.name in ("special_tokens_map.json", "merges.txt",
                                                                    "added_tokens.json", "chat_template.jinja")):
            shutil.copy2(f, folder / f.name)
