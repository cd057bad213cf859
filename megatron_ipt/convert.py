"""Hugging Face <-> Megatron checkpoints for Llama 3 / 3.1 and Qwen2 / 2.5.

``hf_to_megatron``: reads the Hugging Face safetensors tensor by tensor (positioned reads, no memory map,
:mod:`megatron_ipt.safetensors_stream`), fills a megatron-core ``GPTModel`` built from the checkpoint's
``config.json`` (:func:`megatron_ipt.presets.preset_from_hf_config`) and saves it as a weights-only
torch_dist checkpoint (:func:`megatron_ipt.checkpoint.save_model_weights`): ``DST/iter_0000000`` and
``DST/latest``, loadable with any tensor/pipeline layout (megatron reshards on load) by ``train.init_from``.
``megatron_to_hf``: loads such a checkpoint (or a training run's ``checkpoints`` folder) into the same model
and writes sharded safetensors with ``model.safetensors.index.json`` tensor by tensor.

The mapping (megatron-core local layer spec names; the layout Megatron-LM's own Llama converters use):

| Hugging Face | megatron-core |
| --- | --- |
| ``model.embed_tokens.weight`` [V, H] | ``embedding.word_embeddings.weight`` [V_pad, H] (padded rows zero) |
| ``layers.i.input_layernorm.weight`` | ``decoder.layers.i.input_layernorm.weight`` |
| ``q_proj`` [nq*d, H], ``k_proj``, ``v_proj`` [ng*d, H] (+ ``.bias``, Qwen2) | ``self_attention.linear_qkv`` [(nq+2ng)*d, H]: per query group ``[its nq/ng query heads, k, v]`` |
| ``o_proj`` | ``self_attention.linear_proj`` |
| ``post_attention_layernorm`` | ``pre_mlp_layernorm`` |
| ``gate_proj``, ``up_proj`` [F, H] | ``mlp.linear_fc1`` [2F, H] = ``[gate; up]`` (SwiGLU) |
| ``down_proj`` | ``mlp.linear_fc2`` |
| ``model.norm.weight`` | ``decoder.final_layernorm.weight`` |
| ``lm_head.weight`` (absent when tied) | ``output_layer.weight`` [V_pad, H] (absent when tied) |

Both use rotate-half RoPE, so no query/key permutation is needed. The vocabulary is padded to a multiple of
128 x the target tensor-parallel size on import (:func:`megatron_ipt.presets.padded_vocab_size`, what the
trainer computes) and cut back on export. Memory: the Hugging Face side is streamed, but the megatron model
is built whole in one process (one model in the checkpoint's dtype, about 16 GB for Llama-3-8B in bf16);
a 70B conversion therefore needs a node with about 150 GB of RAM.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from megatron_ipt import checkpoint, cpu_backend, parallel
from megatron_ipt.config import ParallelConfig
from megatron_ipt.errors import IptError
from megatron_ipt.presets import ModelPreset, padded_vocab_size, preset_from_hf_config
from megatron_ipt.safetensors_stream import ModelWeights, PlannedTensor, ShardedWriter

CONVERT_MANIFEST = "convert_manifest.json"
HF_FILES_DIR = "hf"  # inside a converted checkpoint: the source's config, tokenizer and chat template
MAPPING_VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConvertError(IptError, ValueError):
    """A checkpoint cannot be converted; the message names the file or tensor."""


def _qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: ModelPreset) -> torch.Tensor:
    """Fuse HF q/k/v (weights [n*d, H] or biases [n*d]) into megatron's per-group ``linear_qkv`` layout."""
    d, g = p.kv_channels, p.num_query_groups
    per = p.num_attention_heads // g
    rest = q.shape[1:]
    fused = torch.cat([q.reshape(g, per * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1)
    return fused.reshape(g * (per + 2) * d, *rest)


def _split_qkv(qkv: torch.Tensor, p: ModelPreset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, g = p.kv_channels, p.num_query_groups
    per = p.num_attention_heads // g
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (per + 2) * d, *rest)
    q, k, v = torch.split(grouped, [per * d, d, d], dim=1)
    return q.reshape(g * per * d, *rest), k.reshape(g * d, *rest), v.reshape(g * d, *rest)


def _hf_names(p: ModelPreset) -> list[str]:
    names = ["model.embed_tokens.weight"]
    for i in range(p.num_layers):
        a = f"model.layers.{i}."
        names += [a + "input_layernorm.weight", a + "self_attn.q_proj.weight", a + "self_attn.k_proj.weight",
                  a + "self_attn.v_proj.weight", a + "self_attn.o_proj.weight", a + "post_attention_layernorm.weight",
                  a + "mlp.gate_proj.weight", a + "mlp.up_proj.weight", a + "mlp.down_proj.weight"]
        if p.add_qkv_bias:
            names += [a + "self_attn.q_proj.bias", a + "self_attn.k_proj.bias", a + "self_attn.v_proj.bias"]
    names.append("model.norm.weight")
    if not p.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def _megatron_sources(p: ModelPreset) -> dict[str, tuple[str, ...]]:
    """megatron parameter name -> the HF tensors it is built from."""
    out = {"embedding.word_embeddings.weight": ("model.embed_tokens.weight",),
           "decoder.final_layernorm.weight": ("model.norm.weight",)}
    if not p.tie_word_embeddings:
        out["output_layer.weight"] = ("lm_head.weight",)
    for i in range(p.num_layers):
        a, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = (a + "input_layernorm.weight",)
        out[m + "self_attention.linear_qkv.weight"] = tuple(a + f"self_attn.{x}_proj.weight" for x in "qkv")
        if p.add_qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = tuple(a + f"self_attn.{x}_proj.bias" for x in "qkv")
        out[m + "self_attention.linear_proj.weight"] = (a + "self_attn.o_proj.weight",)
        out[m + "pre_mlp_layernorm.weight"] = (a + "post_attention_layernorm.weight",)
        out[m + "mlp.linear_fc1.weight"] = (a + "mlp.gate_proj.weight", a + "mlp.up_proj.weight")
        out[m + "mlp.linear_fc2.weight"] = (a + "mlp.down_proj.weight",)
    return out


class _SingleProcessModel:
    """A megatron-core GPTModel for ``preset`` in a world of one process on CPU (the CPU backend active)."""

    def __init__(self, preset: ModelPreset, vocab_size: int, dtype: torch.dtype) -> None:
        from megatron_ipt.model import build_model

        self.ctx = cpu_backend.cpu_backend(enabled=True)
        self.ctx.__enter__()
        try:
            device = torch.device("cpu")
            self.layout = parallel.setup(ParallelConfig(), device, micro_batch_size=1, global_batch_size=1,
                                         num_layers=preset.num_layers, num_attention_heads=preset.num_attention_heads,
                                         num_query_groups=preset.num_query_groups, seed=0)
            precision = "bf16" if dtype == torch.bfloat16 else "fp32"
            self.model = build_model(preset, self.layout, vocab_size=vocab_size, seq_length=min(
                preset.max_position_embeddings, 4096), device=device, precision=precision)
        except BaseException:
            self.close()
            raise
        self.gpt = getattr(self.model, "module", self.model)  # inside Float16Module for bf16
        self.params = dict(self.gpt.named_parameters())

    def close(self) -> None:
        parallel.teardown()
        self.ctx.__exit__(None, None, None)


def _atomic_folder(dst: Path, overwrite: bool) -> Path:
    if dst.exists() and not overwrite:
        raise ConvertError(f"{dst} exists; choose another output folder or pass --overwrite")
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _finish(tmp: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def _copy_hf_files(src: Path, dst: Path) -> list[str]:
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf")) \
                and f.name not in ("model.safetensors.index.json", CONVERT_MANIFEST):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def hf_to_megatron(src: str | Path, dst: str | Path, *, tensor_model_parallel_size: int = 1,
                   dtype: str | None = None, overwrite: bool = False) -> dict:
    """Convert a Hugging Face Llama/Qwen2 folder into a weights-only torch_dist checkpoint at ``dst``.

    ``tensor_model_parallel_size``: the TP size training will use (sets the vocabulary padding, 128 x TP);
    ``dtype``: ``float32`` / ``bfloat16`` / ``float16`` (default: the checkpoint's ``torch_dtype``).
    ``dst`` gets ``iter_0000000/``, ``latest``, ``hf/`` (config, tokenizer, chat template of the source, for
    the export back and for ``model.hf_config``) and ``convert_manifest.json``. Raises ConvertError naming
    the tensor when the checkpoint lacks a tensor or has a wrong shape; ValueError for unsupported configs."""
    src, dst = Path(src), Path(dst)
    start = time.perf_counter()
    preset = preset_from_hf_config(src)
    hf_cfg = json.loads((src / "config.json").read_text())
    dtype_name = dtype or hf_cfg.get("torch_dtype") or hf_cfg.get("dtype") or "float32"
    if dtype_name not in _DTYPES:
        raise ConvertError(f"dtype {dtype_name!r}: choose one of {sorted(_DTYPES)}")
    weights = ModelWeights(src)
    missing = [n for n in _hf_names(preset) if n not in weights]
    if missing:
        raise ConvertError(f"{src}: tensor {missing[0]} is missing ({len(missing)} missing) for a "
                           f"{hf_cfg.get('model_type')} model with this config.json")
    vocab = padded_vocab_size(preset.vocab_size, tensor_model_parallel_size)
    tmp = _atomic_folder(dst, overwrite)
    world = _SingleProcessModel(preset, vocab, _DTYPES[dtype_name])
    try:
        sources = _megatron_sources(preset)
        unmapped = sorted(set(world.params) - set(sources))
        if unmapped:
            raise ConvertError(f"megatron parameter {unmapped[0]} has no Hugging Face source (mapping incomplete)")
        with torch.no_grad():
            for name, param in world.params.items():
                parts = [weights.read_rows(n) for n in sources[name]]
                if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
                    value = _qkv(*parts, preset)
                elif name.endswith("linear_fc1.weight"):
                    value = torch.cat(parts, dim=0)
                else:
                    value = parts[0]
                if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                    padded = torch.zeros(param.shape, dtype=value.dtype)
                    padded[: value.shape[0]] = value
                    value = padded
                if tuple(value.shape) != tuple(param.shape):
                    raise ConvertError(f"tensor {sources[name][0]}: shape {list(value.shape)} does not give "
                                       f"megatron's {name} {list(param.shape)}")
                param.copy_(value.to(param.dtype))
        checkpoint.save_model_weights(tmp, world.model)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        world.close()
        weights.close()
    copied = _copy_hf_files(src, tmp / HF_FILES_DIR)
    from megatron_ipt.residual import folder_fingerprint

    manifest = {"direction": "hf-to-megatron", "mapping_version": MAPPING_VERSION, "source": folder_fingerprint(
        ModelWeights(src)), "model_type": hf_cfg.get("model_type"), "dtype": dtype_name,
        "tensor_model_parallel_size_padding": tensor_model_parallel_size, "padded_vocab_size": vocab,
        "vocab_size": preset.vocab_size, "parameters": sum(p.numel() for p in world.params.values()),
        "hf_files": copied, "seconds": round(time.perf_counter() - start, 2)}
    (tmp / CONVERT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _finish(tmp, dst)
    return manifest


def megatron_to_hf(src: str | Path, dst: str | Path, *, hf_config_from: str | Path | None = None,
                   dtype: str | None = None, max_shard_bytes: int = 5 * 10**9, overwrite: bool = False) -> dict:
    """Export a torch_dist checkpoint (a converted folder, a training run's ``checkpoints`` folder or one
    ``iter_*`` folder) to a Hugging Face folder with sharded safetensors and ``model.safetensors.index.json``.

    ``hf_config_from``: the Hugging Face folder whose config/tokenizer/chat template describe the model
    (default: the ``hf/`` folder a conversion stored next to the checkpoint). The vocabulary padding is cut
    back to the config's ``vocab_size``. Raises ConvertError when no config is found or the checkpoint does
    not fit the config."""
    src, dst = Path(src), Path(dst)
    start = time.perf_counter()
    cfg_dir = Path(hf_config_from) if hf_config_from else _find_hf_files(src)
    preset = preset_from_hf_config(cfg_dir)
    hf_cfg = json.loads((cfg_dir / "config.json").read_text())
    dtype_name = dtype or hf_cfg.get("torch_dtype") or hf_cfg.get("dtype") or "float32"
    if dtype_name not in _DTYPES:
        raise ConvertError(f"dtype {dtype_name!r}: choose one of {sorted(_DTYPES)}")
    out_dtype = _DTYPES[dtype_name]
    ckpt_dir = checkpoint.resolve_checkpoint_dir(src)
    vocab = _checkpoint_vocab(ckpt_dir, preset)
    tmp = _atomic_folder(dst, overwrite)
    world = _SingleProcessModel(preset, vocab, torch.float32)
    try:
        try:
            checkpoint.load_model_weights(ckpt_dir, world.model)
        except (Exception, CheckpointException) as e:  # megatron's messages for missing keys/shapes are long; keep the first line
            raise ConvertError(f"{ckpt_dir}: does not fit the model described by {cfg_dir / 'config.json'}: "
                               f"{checkpoint.load_error_reason(e)}") from None
        sources = _megatron_sources(preset)
        plan = [PlannedTensor(n, out_dtype, _hf_shape(n, world.params, sources, preset)) for n in _hf_names(preset)]
        writer = ShardedWriter(tmp, plan, max_shard_bytes, metadata={"producer": "megatron-ipt convert"})
        by_hf = {}
        for mname, hf in sources.items():
            for h in hf:
                by_hf[h] = mname
        with torch.no_grad():
            for t in plan:
                writer.write(t.name, _hf_tensor(t.name, by_hf[t.name], world.params, sources, preset).to(out_dtype))
        shards = writer.close()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        world.close()
    copied = _copy_hf_files(cfg_dir, tmp)
    manifest = {"direction": "megatron-to-hf", "mapping_version": MAPPING_VERSION, "checkpoint": str(ckpt_dir.resolve()),
                "hf_config_from": str(cfg_dir.resolve()), "dtype": dtype_name, "shards": shards,
                "hf_files": copied, "seconds": round(time.perf_counter() - start, 2)}
    (tmp / CONVERT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _finish(tmp, dst)
    return manifest


def _find_hf_files(src: Path) -> Path:
    for cand in (src / HF_FILES_DIR, src.parent / HF_FILES_DIR):
        if (cand / "config.json").is_file():
            return cand
    raise ConvertError(f"{src}: no {HF_FILES_DIR}/config.json next to the checkpoint; pass --hf-config-from with the "
                       "Hugging Face folder the model came from")


def _checkpoint_vocab(ckpt_dir: Path, preset: ModelPreset) -> int:
    """The padded vocabulary the checkpoint was saved with (read from megatron's checkpoint metadata)."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(ckpt_dir)).read_metadata()
    for key in ("embedding.word_embeddings.weight", "model.embedding.word_embeddings.weight"):
        if key in meta.state_dict_metadata:
            return int(meta.state_dict_metadata[key].size[0])
    keys = [k for k in meta.state_dict_metadata if k.endswith("word_embeddings.weight")]
    if keys:
        return int(meta.state_dict_metadata[keys[0]].size[0])
    raise ConvertError(f"{ckpt_dir}: no word embeddings in the checkpoint")


def _hf_shape(hf_name, params, sources, p: ModelPreset) -> tuple[int, ...]:
    if hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (p.vocab_size, p.hidden_size)
    mname = next(m for m, hs in sources.items() if hf_name in hs)
    return tuple(_hf_tensor(hf_name, mname, params, sources, p, shape_only=True))


def _hf_tensor(hf_name: str, mname: str, params, sources, p: ModelPreset, shape_only: bool = False):
    value = params[mname].detach()
    hs = sources[mname]
    if mname.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        value = _split_qkv(value, p)[hs.index(hf_name)]
    elif mname.endswith("linear_fc1.weight"):
        value = torch.chunk(value, 2, dim=0)[hs.index(hf_name)]
    elif mname in ("embedding.word_embeddings.weight", "output_layer.weight"):
        value = value[: p.vocab_size]
    return value.shape if shape_only else value.contiguous()
