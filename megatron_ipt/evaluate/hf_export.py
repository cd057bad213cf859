"""A Megatron checkpoint as a temporary Hugging Face folder, for tools that only read Hugging Face models
(lm-evaluation-harness): the project's streamed exporter (:func:`megatron_ipt.convert.megatron_to_hf`, what
``ipt convert megatron-to-hf`` runs) writes it, and it is removed when the ``with`` block ends, also on error.

The exporter needs a Hugging Face reference folder with the model's ``config.json`` (architecture) and its
tokenizer files, the same one ``ipt convert megatron-to-hf --hf-config-from`` takes. :func:`reference_folder`
finds it: the folder the user names, else the experiment's ``model.hf_config`` (its folder when it names a
``config.json``), else the ``hf/`` folder that ``ipt convert hf-to-megatron`` stores next to a checkpoint.
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

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ExportError(IptError, ValueError):
    """No Hugging Face reference config for a checkpoint, or the export failed; the message names the
    checkpoint or folder and the option to pass."""


@dataclass(frozen=True)
class Exported:
    """A checkpoint exported for evaluation: ``folder`` (temporary Hugging Face folder), ``checkpoint`` (the
    resolved torch_dist folder, e.g. ``.../iter_0000030``), ``iteration`` (from its ``iter_N`` name; None for
    another folder name), ``reference`` (the Hugging Face folder its config and tokenizer came from),
    ``reference_config_sha256`` and ``dtype`` (of the exported weights)."""

    folder: Path
    checkpoint: Path
    iteration: int | None
    reference: Path
    reference_config_sha256: str
    dtype: str


def reference_folder(checkpoint: str | Path, hf_config_from: str | Path | None = None,
                     model_hf_config: str | None = None) -> Path:
    """The Hugging Face folder that describes ``checkpoint`` (module docstring for the order). Raises
    ExportError naming the checkpoint and ``--hf-config-from`` when there is none, or naming the folder
    when it has no ``config.json``."""
    if hf_config_from:
        folder, what = Path(hf_config_from), "--hf-config-from"
    elif model_hf_config:
        path = Path(model_hf_config)
        folder, what = (path if path.is_dir() else path.parent), "model.hf_config"
    else:
        checkpoint = Path(checkpoint)
        for cand in (checkpoint / "hf", checkpoint.parent / "hf"):
            if (cand / "config.json").is_file():
                return cand
        raise ExportError(f"{checkpoint}: no Hugging Face config to export it with: pass --hf-config-from FOLDER "
                          "(the model's config.json and tokenizer) or set model.hf_config")
    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder}: no config.json ({what} must be a Hugging Face folder with the model's "
                          "config.json and tokenizer)")
    return folder


@contextmanager
def exported(checkpoint: str | Path, *, reference: Path, work_dir: str | Path, dtype: str | None = None,
             tokenizer_dir: str | Path | None = None) -> Iterator[Exported]:
    """Export ``checkpoint`` (a checkpoints folder with ``latest``, an ``iter_*`` or a converted folder) to a
    temporary Hugging Face folder under ``work_dir`` (created; the folder is named ``.hf-export-*``) with the
    config and tokenizer of ``reference``; yields :class:`Exported`; removes the folder on exit, also on error.
    ``dtype``: float32 / bfloat16 / float16 (default: the reference config's). ``tokenizer_dir``: a Hugging
    Face tokenizer folder whose tokenizer files are copied when ``reference`` has none. Raises ExportError
    (ConvertError, an IptError, when the checkpoint does not fit the config)."""
    from megatron_ipt import checkpoint as ckpt_mod
    from megatron_ipt import convert

    try:
        ckpt_dir = ckpt_mod.resolve_checkpoint_dir(checkpoint)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from None
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hf-export-", dir=work_dir))
    try:
        folder = tmp / "hf"
        try:
            manifest = convert.megatron_to_hf(ckpt_dir, folder, hf_config_from=reference, dtype=dtype)
        except (ValueError, FileNotFoundError) as e:
            if isinstance(e, IptError):
                raise
            raise ExportError(f"{checkpoint}: cannot export with {reference}: {e}") from None
        if not any((folder / f).is_file() for f in TOKENIZER_FILES):
            _copy_tokenizer(tokenizer_dir, folder, reference)
        name = ckpt_dir.name
        yield Exported(folder=folder, checkpoint=ckpt_dir,
                       iteration=int(name[5:]) if name.startswith("iter_") and name[5:].isdigit() else None,
                       reference=reference, dtype=manifest["dtype"],
                       reference_config_sha256=hashlib.sha256((reference / "config.json").read_bytes()).hexdigest())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_tokenizer(tokenizer_dir: str | Path | None, folder: Path, reference: Path) -> None:
    source = Path(tokenizer_dir) if tokenizer_dir else None
    if source is not None and source.is_file() and source.name in TOKENIZER_FILES:  # e.g. a bare tokenizer.json
        shutil.copy2(source, folder / source.name)
        return
    if source is None or not source.is_dir() or not any((source / f).is_file() for f in TOKENIZER_FILES):
        raise ExportError(f"{reference}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) and the experiment's "
                          "tokenizer is not a Hugging Face folder: pass --hf-config-from a folder with both")
    for f in source.iterdir():
        if f.is_file() and (f.name in TOKENIZER_FILES or f.name in ("special_tokens_map.json", "merges.txt",
                                                                    "added_tokens.json", "chat_template.jinja")):
            shutil.copy2(f, folder / f.name)
