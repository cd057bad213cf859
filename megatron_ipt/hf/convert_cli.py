"""``ipt convert``: Hugging Face <-> Megatron checkpoints (see megatron_ipt.hf.convert)."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Convert Llama 3 / 3.1 / 3.2, Mistral, Qwen2 / 2.5, Qwen3, Qwen3-MoE and Mixtral checkpoints between Hugging Face
(safetensors) and megatron-core's torch_dist format (weights only; loadable with any tensor/pipeline/expert
layout). Streamed: the model is never built in memory (anonymous memory: a few tensors); hf-to-megatron needs scratch disk inside DST while it runs
for the fused QKV (about 10% of a Llama 3 model) and padded embeddings.

examples:
  ipt convert hf-to-megatron Meta-Llama-3-8B ckpt/llama3-8b --tensor-parallel-size 2
      # then train with: model.hf_config: ckpt/llama3-8b/hf   train.init_from: ckpt/llama3-8b
  ipt convert megatron-to-hf runs/med/train/checkpoints runs/med/hf --hf-config-from ckpt/llama3-8b/hf
"""


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="Convert checkpoints between Hugging Face and Megatron (Llama 3.x, Mistral, Qwen2.5, Qwen3, Qwen3-MoE, Mixtral).",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    a = s.add_parser("hf-to-megatron", help="Hugging Face folder -> torch_dist checkpoint (iter_0000000 + latest)")
    a.add_argument("src", help="Hugging Face model folder (config.json + safetensors)")
    a.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    a.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="TP size training will use: the vocabulary is padded to a multiple of 128 x TP (default 1)")
    a.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's torch_dtype")
    a.add_argument("--overwrite", action="store_true")
    b = s.add_parser("megatron-to-hf", help="torch_dist checkpoint -> Hugging Face folder (sharded safetensors)")
    b.add_argument("src", help="a converted folder, a training run's checkpoints folder, or an iter_* folder")
    b.add_argument("dst", help="output Hugging Face folder")
    b.add_argument("--hf-config-from", help="Hugging Face folder with the model's config/tokenizer (default: the "
                   "hf/ folder stored by hf-to-megatron next to the checkpoint)")
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the config's torch_dtype")
    b.add_argument("--max-shard-size", type=float, default=5.0, metavar="GB")
    b.add_argument("--trust-checkpoint", action="store_true", help="load SRC without scanning its pickles for "
                   "non-data classes (a pickle can run code when loaded); only for checkpoints you trust")
    b.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=run)


def _hf_config_from(args) -> str | None:
    """``--hf-config-from``, else (no ``hf/`` folder next to the checkpoint) ``model.hf_config`` of the run holding
    the checkpoint, read from its resolved config (saying so); else None."""
    from megatron_ipt import run_config
    from megatron_ipt.config import load_config
    from megatron_ipt.hf.convert import hf_files_next_to

    if args.hf_config_from or hf_files_next_to(Path(args.src)) is not None:
        return args.hf_config_from
    run = run_config.run_holding(args.src)
    if run is None:
        return None
    path = run_config.find(run)
    hf_config = load_config(path).model.hf_config
    if hf_config:
        run_config.say_using(path, "convert")
        return str(Path(hf_config).parent if Path(hf_config).is_file() else hf_config)
    return None


def run(args) -> int:
    from megatron_ipt.hf import convert

    try:
        if args.direction == "hf-to-megatron":
            m = convert.hf_to_megatron(args.src, args.dst, tensor_model_parallel_size=args.tensor_parallel_size,
                                       dtype=args.dtype, overwrite=args.overwrite)
            print(f"wrote {args.dst}: {m['parameters']:,} parameters ({m['dtype']}), vocabulary {m['vocab_size']:,} "
                  f"padded to {m['padded_vocab_size']:,}, in {m['seconds']} s "
                  f"(scratch {m['scratch_bytes'] / 2**30:.2f} GiB, deleted)")
            print(f"train from it with: model.hf_config: {args.dst}/hf   train.init_from: {args.dst}")
        else:
            m = convert.megatron_to_hf(args.src, args.dst, hf_config_from=_hf_config_from(args), dtype=args.dtype,
                                       max_shard_bytes=int(args.max_shard_size * 1e9), overwrite=args.overwrite,
                                       trust=args.trust_checkpoint)
            print(f"wrote {args.dst}: {len(m['shards'])} shard(s) ({m['dtype']}) in {m['seconds']} s")
    except (ValueError, FileNotFoundError) as e:
        from megatron_ipt.errors import IptError

        if isinstance(e, IptError):
            raise
        raise convert.ConvertError(str(e)) from None
    return 0
