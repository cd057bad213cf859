"""Hugging Face <-> Megatron checkpoints for Llama 3 / 3.1 / 3.2, Mistral, Qwen2 / 2.5, Qwen3, Qwen3-MoE and
Mixtral, streamed tensor by tensor.

``hf_to_megatron`` writes a weights-only torch_dist checkpoint (``DST/iter_0000000`` + ``DST/latest``) that
``train.init_from`` loads with any tensor/pipeline layout (torch_dist reshards on load). ``megatron_to_hf``
reads such a checkpoint (or a training run's) and writes sharded safetensors with
``model.safetensors.index.json``. Neither builds the model in memory:

- The structure comes from a megatron-core ``GPTModel`` built on the ``meta`` device in a world of one
  process (no parameter memory): its ``sharded_state_dict()`` names every ShardedTensor, its key, global
  shape and offsets, exactly as training saves and loads them.
- Every megatron parameter is a stack, along dim 0, of row ranges of Hugging Face tensors (and zero rows
  for the vocabulary padding): :func:`row_plan`. On import each ShardedTensor (after megatron's own
  factories, e.g. the SwiGLU ``linear_fc1`` split into gate and up) gets *file-backed* data: a memory map of
  the Hugging Face safetensors file itself when it is one row range of one tensor in the target dtype
  (``o_proj``, ``down_proj``, norms, gate, up), else a memory map of a scratch file assembled block by block
  (fused QKV, padded embeddings, dtype casts). ``dist_checkpointing.save`` then reads the data through the
  page cache (clean file pages), so the process's anonymous memory stays at a few row blocks.
- On export each megatron parameter is loaded alone (``dist_checkpointing.load`` of its pieces as regions of
  the stored tensors, whatever layout saved them; torch_dist reads only the chunks it needs) and its row
  ranges are streamed into
  :class:`~megatron_ipt.hf.safetensors_stream.ShardedWriter`; peak memory is about two copies of one parameter.

The mapping (:mod:`megatron_ipt.hf.mapping`; megatron-core local layer spec names, the layout Megatron-LM's own
Llama converters use; experts are ``SequentialMLP`` modules, saved by megatron under one key per projection with
the expert index as an axis, so checkpoints load with any expert-parallel size):

| Hugging Face | megatron-core |
| --- | --- |
| ``model.embed_tokens.weight`` [V, H] | ``embedding.word_embeddings.weight`` [V_pad, H] (padded rows zero) |
| ``layers.i.input_layernorm.weight`` | ``decoder.layers.i.input_layernorm.weight`` |
| ``q_proj`` [nq*d, H], ``k_proj``, ``v_proj`` [ng*d, H] (+ ``.bias``, Qwen2) | ``self_attention.linear_qkv`` [(nq+2ng)*d, H]: per query group ``[its nq/ng query heads, k, v]`` |
| ``q_norm``, ``k_norm`` [d] (Qwen3) | ``self_attention.q_layernorm``, ``self_attention.k_layernorm`` |
| ``o_proj`` | ``self_attention.linear_proj`` |
| ``post_attention_layernorm`` | ``pre_mlp_layernorm`` |
| ``gate_proj``, ``up_proj`` [F, H] | ``mlp.linear_fc1`` [2F, H] = ``[gate; up]`` (SwiGLU) |
| ``down_proj`` | ``mlp.linear_fc2`` |
| MoE router ``mlp.gate`` (Qwen3-MoE) / ``block_sparse_moe.gate`` (Mixtral) [E, H] | ``mlp.router`` |
| expert j: ``gate_proj`` / ``w1``, ``up_proj`` / ``w3`` [Fe, H] | ``mlp.experts.local_experts.j.linear_fc1`` [2Fe, H] = ``[gate; up]`` |
| expert j: ``down_proj`` / ``w2`` [H, Fe] | ``mlp.experts.local_experts.j.linear_fc2`` |
| ``model.norm.weight`` | ``decoder.final_layernorm.weight`` |
| ``lm_head.weight`` (absent when tied) | ``output_layer.weight`` [V_pad, H] (absent when tied) |

Both use rotate-half RoPE, so no query/key permutation is needed. The vocabulary is padded to a multiple of
128 x the target tensor-parallel size on import (:func:`megatron_ipt.training.presets.padded_vocab_size`, what the
trainer computes) and cut back on export.

Memory and disk (measured by ``benchmarks/convert_memory.py``): anonymous memory stays at a few 64 MB row
blocks on import and about two copies of the largest parameter on export (torch_dist reads a stored chunk,
then copies it); file pages of the inputs pass through the page cache. Import needs scratch disk for the
tensors that are not a plain slice of one Hugging Face tensor (the fused QKV, about 10% of a Llama 3 model; the
embeddings when the vocabulary needs padding; everything when ``dtype`` differs from the source), inside the
output folder while it is written, deleted at the end (``scratch_bytes`` in the manifest).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from data_prep import atomic
from megatron_ipt.training import checkpoint, checkpoint_trust, cpu_backend, mcore, parallel
from megatron_ipt.config import ParallelConfig
from megatron_ipt.errors import IptError
from megatron_ipt.training.presets import ModelPreset, padded_vocab_size, preset_from_hf_config
from megatron_ipt.hf.mapping import Rows, hf_names, hf_shape, megatron_sources, row_plan, slice_plan
from megatron_ipt.hf.safetensors_stream import ModelWeights, PlannedTensor, ShardedWriter, mmap_tensor

__all__ = ["hf_to_megatron", "megatron_to_hf", "hf_files_next_to", "ConvertError", "Rows", "hf_names", "hf_shape",
           "megatron_sources", "row_plan"]

CONVERT_MANIFEST = "convert_manifest.json"
HF_FILES_DIR = "hf"  # inside a converted checkpoint: the source's config, tokenizer and chat template
SCRATCH_DIR = ".convert-scratch"  # inside the output folder while hf_to_megatron writes it
MAPPING_VERSION = 1
BLOCK_BYTES = 64 * 2**20  # rows copied at a time into scratch files
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConvertError(IptError, ValueError):
    """A checkpoint cannot be converted; the message names the file or tensor."""


# ----------------------------------------------------------------------------- model structure (meta)
@contextlib.contextmanager
def one_process_world(preset: ModelPreset) -> Iterator[parallel.Layout]:
    """A torch.distributed world of one process (gloo) with megatron's parallel state for ``preset`` and the
    CPU backend active; yields the layout (TP = PP = 1). Everything is torn down on exit."""
    with cpu_backend.cpu_backend(enabled=True):
        layout = parallel.setup(ParallelConfig(), torch.device("cpu"), micro_batch_size=1, global_batch_size=1,
                                num_layers=preset.num_layers, num_attention_heads=preset.num_attention_heads,
                                num_query_groups=preset.num_query_groups, seed=0)
        try:
            yield layout
        finally:
            parallel.teardown()


def meta_model(preset: ModelPreset, layout: parallel.Layout, vocab_size: int) -> torch.nn.Module:
    """The fp32 CPU ``GPTModel`` of ``preset`` (:func:`megatron_ipt.training.model.build_model`) with parameters on the
    ``meta`` device (no memory): the structure of its ``sharded_state_dict()``."""
    from megatron_ipt.training.model import build_model

    return build_model(preset, layout, vocab_size=vocab_size, seq_length=preset.max_position_embeddings,
                       device=torch.device("meta"), precision="fp32")


def _param_rows(view: torch.Tensor, param: torch.Tensor, what: str) -> tuple[int, int]:
    """The dim-0 row range of ``param`` that ``view`` (a ShardedTensor's data: the parameter itself or a row
    slice of it, as megatron's SwiGLU factory makes) covers."""
    row = 1
    for d in param.shape[1:]:
        row *= d
    if tuple(view.shape[1:]) != tuple(param.shape[1:]) or not view.is_contiguous() or view.storage_offset() % row:
        raise ConvertError(f"{what}: megatron shards it as {list(view.shape)} of {list(param.shape)}, not as a row "
                           "range (unsupported megatron-core version?)")
    start = view.storage_offset() // row
    return start, start + (view.shape[0] if view.dim() else 1)


# ------------------------------------------------------------------------------------- import
class _Scratch:
    """Raw tensor files assembled from row ranges, handed back memory-mapped (see module docstring)."""

    def __init__(self, folder: Path, weights: ModelWeights) -> None:
        self.folder, self.weights, self.count, self.bytes = folder, weights, 0, 0
        folder.mkdir(parents=True, exist_ok=True)

    def tensor(self, rows: list[Rows], dtype: torch.dtype, trailing: tuple[int, ...]) -> torch.Tensor:
        path = self.folder / f"{self.count:06d}.bin"
        self.count += 1
        row_numel = 1
        for d in trailing:
            row_numel *= d
        step = max(1, BLOCK_BYTES // max(1, row_numel * dtype.itemsize))
        with open(path, "wb") as f:
            for r in rows:
                for lo in range(r.start, r.stop, step):
                    hi = min(r.stop, lo + step)
                    if r.name is None:
                        block = torch.zeros((hi - lo, *trailing), dtype=dtype)
                    else:
                        block = self.weights.mmap_rows(r.name, lo, hi).to(dtype)
                    f.write(block.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        total = sum(r.count for r in rows)
        self.bytes += total * row_numel * dtype.itemsize
        return mmap_tensor(path, 0, dtype, (total, *trailing) if trailing else (total,))


def _bind(sh, data: torch.Tensor):
    """``sh`` (a ShardedTensor) holding ``data`` instead of its meta tensor."""
    return dataclasses.replace(sh, data=data.reshape(sh.data.shape), dtype=data.dtype)


def _file_backed_state_dict(model: torch.nn.Module, weights: ModelWeights, preset: ModelPreset, model_type: str,
                            vocab: int, dtype: torch.dtype, scratch: _Scratch, bar) -> tuple[dict, int]:
    """The meta model's sharded state dict with every ShardedTensor's data file-backed; returns it and the
    parameter count. Factories are applied here (their pieces are bound one by one)."""
    ShardedTensor, ShardedTensorFactory = mcore.sharded_tensor_classes()
    params = dict(model.named_parameters())
    sources = megatron_sources(preset, model_type)
    unmapped = sorted(set(params) - set(sources))
    if unmapped:
        raise ConvertError(f"megatron parameter {unmapped[0]} has no Hugging Face source (mapping incomplete)")
    sd = model.sharded_state_dict()
    for key, entry in sd.items():
        if not isinstance(entry, (ShardedTensor, ShardedTensorFactory)):
            continue  # ShardedObjects (local layers' empty _extra_state) are saved as they are
        if key not in params:
            raise ConvertError(f"megatron sharded state dict entry {key} is not a parameter (unsupported layer spec?)")
        param, plan = params[key], row_plan(key, preset, vocab, model_type)
        if sum(r.count for r in plan) != param.shape[0]:
            raise ConvertError(f"megatron parameter {key} has {param.shape[0]} rows; its sources give "
                               f"{sum(r.count for r in plan)}")
        pieces = entry.build() if isinstance(entry, ShardedTensorFactory) else [entry]
        bound = []
        for sh in pieces:
            rows = slice_plan(plan, *_param_rows(sh.data, param, key))
            one = rows[0] if len(rows) == 1 else None
            if one is not None and one.name is not None and weights.tensors[one.name].torch_dtype == dtype:
                data = weights.mmap_rows(one.name, one.start, one.stop)  # the Hugging Face file itself
            else:
                data = scratch.tensor(rows, dtype, tuple(param.shape[1:]))
            bound.append(_bind(sh, data))
        sd[key] = bound if isinstance(entry, ShardedTensorFactory) else bound[0]
        bar.advance()
    return sd, sum(p.numel() for p in params.values())


def _progress(enabled: bool, total: int, unit: str):
    """A convert progress report on stderr; reports nothing when not ``enabled``, nor for a conversion that ends
    within one progress interval (the small ones of tests and ``ipt eval``'s exports). Bytes when ``unit`` is ''."""
    from data_prep.progress import StageProgress

    return StageProgress("convert", total, unit, byte_units=not unit, enabled=enabled, stream=sys.stderr,
                         quiet_when_quick=True)


class _StateDictHolder:
    """What :func:`megatron_ipt.training.checkpoint.save_model_weights` needs of a model: its sharded state dict."""

    def __init__(self, sd: dict) -> None:
        self._sd = sd

    def sharded_state_dict(self) -> dict:
        return self._sd


def _atomic_folder(dst: Path, overwrite: bool) -> Path:
    if dst.exists() and not overwrite:
        raise ConvertError(f"{dst} exists; choose another output folder or pass --overwrite")
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _finish(tmp: Path, dst: Path) -> None:
    atomic.replace_dir(tmp, dst)  # an output replaced with --overwrite is swapped out in one step, then removed


def _copy_hf_files(src: Path, dst: Path) -> list[str]:
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf")) \
                and f.name not in ("model.safetensors.index.json", CONVERT_MANIFEST):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def _dtype_name(dtype: str | None, hf_cfg: dict) -> str:
    name = dtype or hf_cfg.get("torch_dtype") or hf_cfg.get("dtype") or "float32"
    if name not in _DTYPES:
        raise ConvertError(f"dtype {name!r}: choose one of {sorted(_DTYPES)}")
    return name


def hf_to_megatron(src: str | Path, dst: str | Path, *, tensor_model_parallel_size: int = 1,
                   dtype: str | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Convert a Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Qwen3-MoE / Mixtral folder into a weights-only torch_dist checkpoint at ``dst``, streamed:
    the anonymous memory used is a few 64 MB row blocks whatever the model size (see the module docstring).

    ``tensor_model_parallel_size``: the TP size training will use (sets the vocabulary padding, 128 x TP);
    ``dtype``: ``float32`` / ``bfloat16`` / ``float16`` (default: the checkpoint's ``torch_dtype``), the dtype
    stored in the checkpoint (training casts on load). ``dst`` gets ``iter_0000000/``, ``latest``, ``hf/``
    (config, tokenizer, chat template of the source, for the export back and for ``model.hf_config``) and
    ``convert_manifest.json``. Raises ConvertError naming the tensor when the checkpoint lacks a tensor, has one
    the mapping does not know, or one with a wrong shape, and naming the sizes when the heads or query groups do
    not divide by ``tensor_model_parallel_size``; ValueError for unsupported configs. ``progress``: parameters
    mapped, then one line before megatron-core writes the checkpoint, on stderr (as :func:`megatron_to_hf`)."""
    src, dst = Path(src), Path(dst)
    start = time.perf_counter()
    preset = preset_from_hf_config(src)
    tp = tensor_model_parallel_size
    if preset.num_attention_heads % tp or preset.num_query_groups % tp:
        raise ConvertError(f"--tensor-parallel-size {tp}: {src / 'config.json'} has {preset.num_attention_heads} "
                           f"attention heads and {preset.num_query_groups} query groups (num_key_value_heads); "
                           f"tensor parallelism needs both divisible by {tp}, so this model can never train at TP={tp}")
    hf_cfg = json.loads((src / "config.json").read_text())
    dtype_name = _dtype_name(dtype, hf_cfg)
    weights = ModelWeights(src)
    try:
        model_type = hf_cfg.get("model_type", "llama")
        names = hf_names(preset, model_type)
        missing = [n for n in names if n not in weights]
        if missing:
            raise ConvertError(f"{src}: tensor {missing[0]} is missing ({len(missing)} missing) for a "
                               f"{hf_cfg.get('model_type')} model with this config.json")
        # a tensor the mapping does not know (an o_proj / MLP bias, an MoE router, ...) would be dropped silently
        known = set(names) | ({"lm_head.weight"} if preset.tie_word_embeddings else set())
        extra = sorted(n for n in weights.names() if n not in known and not n.endswith("rotary_emb.inv_freq"))
        if extra:
            raise ConvertError(f"{src}: tensor {extra[0]} is not part of a {hf_cfg.get('model_type')} model with this "
                               f"config.json ({len(extra)} unknown tensors)")
        for n in names:
            if weights.tensors[n].shape != hf_shape(n, preset):
                raise ConvertError(f"{src}: tensor {n} has shape {list(weights.tensors[n].shape)}; config.json "
                                   f"gives {list(hf_shape(n, preset))}")
        vocab = padded_vocab_size(preset.vocab_size, tensor_model_parallel_size)
        tmp = _atomic_folder(dst, overwrite)
        try:
            scratch = _Scratch(tmp / SCRATCH_DIR, weights)
            with one_process_world(preset) as layout:
                model = meta_model(preset, layout, vocab)
                with _progress(progress, len(list(model.parameters())), "parameters") as bar:
                    sd, n_params = _file_backed_state_dict(model, weights, preset, model_type, vocab,
                                                           _DTYPES[dtype_name], scratch, bar)
                if progress:
                    print(f"convert: writing the torch_dist checkpoint ({n_params:,} parameters, {dtype_name}) to "
                          f"{dst}", file=sys.stderr, flush=True)
                checkpoint.save_model_weights(tmp, _StateDictHolder(sd))
                del sd
            shutil.rmtree(tmp / SCRATCH_DIR)
            copied = _copy_hf_files(src, tmp / HF_FILES_DIR)
            from megatron_ipt.hf.residual import folder_fingerprint

            manifest = {"direction": "hf-to-megatron", "mapping_version": MAPPING_VERSION,
                        "source": folder_fingerprint(weights), "model_type": hf_cfg.get("model_type"),
                        "dtype": dtype_name, "tensor_model_parallel_size_padding": tensor_model_parallel_size,
                        "padded_vocab_size": vocab, "vocab_size": preset.vocab_size, "parameters": n_params,
                        "scratch_bytes": scratch.bytes, "hf_files": copied,
                        "seconds": round(time.perf_counter() - start, 2)}
            (tmp / CONVERT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        weights.close()
    _finish(tmp, dst)
    return manifest


# ------------------------------------------------------------------------------------- export
def _checkpoint_dtypes(ckpt_dir: Path) -> dict[str, torch.dtype]:
    """torch_dist key -> stored dtype (from the checkpoint's ``.metadata``)."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(ckpt_dir)).read_metadata()
    return {k: v.properties.dtype for k, v in meta.state_dict_metadata.items() if hasattr(v, "properties")}


def _checkpoint_vocab(ckpt_dir: Path) -> int:
    """The padded vocabulary the checkpoint was saved with (read from its metadata)."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(ckpt_dir)).read_metadata()
    keys = [k for k in meta.state_dict_metadata if k.endswith("word_embeddings.weight")]
    if not keys:
        raise ConvertError(f"{ckpt_dir}: no word embeddings in the checkpoint")
    return int(meta.state_dict_metadata[keys[0]].size[0])


def _load_parameter(key: str, entry, param: torch.Tensor, dtypes: dict[str, torch.dtype], ckpt_dir: Path,
                    cfg_file: Path) -> torch.Tensor:
    """Parameter ``key`` read alone from the checkpoint, in the stored dtype. ``entry``: its meta
    ShardedTensor or factory, ``param``: the meta parameter.

    Each piece megatron would load (a factory's pieces, e.g. SwiGLU's gate and up halves) is asked for as a
    plain region ``[offset : offset + shape]`` of the stored global tensor (the layer axis megatron prepends
    made explicit), read straight into its rows of the parameter: megatron's prepended-axis form would build
    torch ShardedTensor metadata for every layer, which a one-process world cannot hold for a part."""
    ShardedTensor, ShardedTensorFactory = mcore.sharded_tensor_classes()
    pieces = entry.build() if isinstance(entry, ShardedTensorFactory) else [entry]
    missing = [sh.key for sh in pieces if sh.key not in dtypes]
    if missing:
        raise ConvertError(f"{ckpt_dir}: tensor {missing[0]} (parameter {key}) is not in the checkpoint; is it a "
                           f"checkpoint of the model {cfg_file} describes?")
    value = torch.empty(param.shape, dtype=dtypes[pieces[0].key])
    requests = []
    for sh in pieces:
        start, stop = _param_rows(sh.data, param, key)
        shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
        offsets = [(axis, off // size, total // size) for axis, (off, size, total)
                   in enumerate(zip(sh.global_offset, shape, sh.global_shape)) if total != size]
        requests.append(ShardedTensor.from_rank_offsets(sh.key, value[start:stop].view(shape), *offsets))
    try:
        loaded = mcore.load_distributed({"model": {key: requests}}, ckpt_dir, whole_tensors=False)["model"][key]
    except (Exception, CheckpointException) as e:  # megatron's messages are long; keep the informative line
        raise ConvertError(f"{ckpt_dir}: does not fit the model described by {cfg_file}: "
                           f"{checkpoint.load_error_reason(e)}") from None
    for sh, got in zip(pieces, loaded):
        start, stop = _param_rows(sh.data, param, key)
        if got.data_ptr() != value[start:stop].data_ptr():
            value[start:stop].copy_(got.reshape(value[start:stop].shape))
    return value


def megatron_to_hf(src: str | Path, dst: str | Path, *, hf_config_from: str | Path | None = None, trust: bool = False,
                   dtype: str | None = None, max_shard_bytes: int = 5 * 10**9, overwrite: bool = False,
                   progress: bool = True) -> dict:
    """Export a torch_dist checkpoint (a converted folder, a training run's ``checkpoints`` folder or one
    ``iter_*`` folder, saved with any parallel layout) to a Hugging Face folder with sharded safetensors and
    ``model.safetensors.index.json``, one parameter in memory at a time.

    ``hf_config_from``: the Hugging Face folder whose config/tokenizer/chat template describe the model
    (default: the ``hf/`` folder a conversion stored next to the checkpoint). The vocabulary padding is cut
    back to the config's ``vocab_size``. ``progress``: bytes written, on stderr (:class:`data_prep.progress.
    StageProgress`: a bar on a terminal, a line every 30 s otherwise). Raises ConvertError when no config is found
    or the checkpoint does not fit the config, UntrustedCheckpointError when its pickles name a non-data class
    (unless ``trust``)."""
    src, dst = Path(src), Path(dst)
    start = time.perf_counter()
    ckpt_dir = checkpoint.resolve_checkpoint_dir(src)
    checkpoint_trust.check(ckpt_dir, trust=trust)  # before anything reads its .metadata
    cfg_dir = Path(hf_config_from) if hf_config_from else _find_hf_files(src)
    preset = preset_from_hf_config(cfg_dir)
    hf_cfg = json.loads((cfg_dir / "config.json").read_text())
    dtype_name = _dtype_name(dtype, hf_cfg)
    out_dtype = _DTYPES[dtype_name]
    vocab, dtypes = _checkpoint_vocab(ckpt_dir), _checkpoint_dtypes(ckpt_dir)
    model_type = hf_cfg.get("model_type", "llama")
    names = hf_names(preset, model_type)
    by_hf = {h: m for m, hs in megatron_sources(preset, model_type).items() for h in hs}
    tmp = _atomic_folder(dst, overwrite)
    try:
        planned = [PlannedTensor(n, out_dtype, hf_shape(n, preset)) for n in names]
        writer = ShardedWriter(tmp, planned, max_shard_bytes, metadata={"producer": "megatron-ipt convert"})
        bar = _progress(progress, sum(math.prod(p.shape) for p in planned) * out_dtype.itemsize, "")
        with bar, one_process_world(preset) as layout:
            model = meta_model(preset, layout, vocab)
            sd, params = model.sharded_state_dict(), dict(model.named_parameters())
            loaded_key, value = None, None
            for name in names:
                key = by_hf[name]
                if key != loaded_key:
                    loaded_key, value = None, None  # free the previous parameter first
                    value = _load_parameter(key, sd[key], params[key], dtypes, ckpt_dir, cfg_dir / "config.json")
                    loaded_key = key
                offset = 0
                for r in row_plan(key, preset, vocab, model_type):
                    if r.name == name:
                        writer.write(name, value[offset:offset + r.count].to(out_dtype))
                        bar.advance(r.count * math.prod(value.shape[1:]) * out_dtype.itemsize)
                    offset += r.count
            value = None
        shards = writer.close()
        copied = _copy_hf_files(cfg_dir, tmp)
        manifest = {"direction": "megatron-to-hf", "mapping_version": MAPPING_VERSION,
                    "checkpoint": str(ckpt_dir.resolve()), "hf_config_from": str(cfg_dir.resolve()),
                    "dtype": dtype_name, "shards": shards, "hf_files": copied,
                    "seconds": round(time.perf_counter() - start, 2)}
        (tmp / CONVERT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _finish(tmp, dst)
    return manifest


def hf_files_next_to(checkpoint: str | Path) -> Path | None:
    """The ``hf/`` folder (``HF_FILES_DIR``: config, tokenizer, chat template of the source) that ``hf-to-megatron``
    stores in a converted checkpoint, found in ``checkpoint`` or its parent (for an ``iter_*`` folder); None when
    neither has one with a ``config.json``."""
    checkpoint = Path(checkpoint)
    for cand in (checkpoint / HF_FILES_DIR, checkpoint.parent / HF_FILES_DIR):
        if (cand / "config.json").is_file():
            return cand
    return None


def _find_hf_files(src: Path) -> Path:
    if (found := hf_files_next_to(src)) is not None:
        return found
    raise ConvertError(f"{src}: no {HF_FILES_DIR}/config.json next to the checkpoint; pass --hf-config-from with the "
                       "Hugging Face folder the model came from")
