"""Run ``train_stage`` from the command line, relaunching itself under torchrun (used by the dist tests).

    python tests/dist_train_worker.py TOKENIZED_DIR OUT_DIR --procs 2 --tp 2 --pp 1 [--vpp 2] [--layers 4]
        [--distopt] [--iters 4] [--stop-at N] [--init-from CHECKPOINTS] [--async-save] [--save-interval N]
        [--ep 2] [--hf-config HF_FOLDER] [--set section.key=value ...]

Rank 0 writes ``OUT_DIR/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))

from train_fixtures import tiny_config  # noqa: E402

from megatron_ipt.launch.torchrun import relaunch_under_torchrun  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("tokenized_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages (model chunks per pipeline rank)")
    p.add_argument("--layers", type=int, default=None, help="model.num_layers (default: the preset's)")
    p.add_argument("--init-from", default=None, help="train.init_from: start from these weights")
    p.add_argument("--distopt", action="store_true")
    p.add_argument("--async-save", action="store_true", help="train.async_save")
    p.add_argument("--save-interval", type=int, default=None)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--ep", type=int, default=1, help="parallel.expert_model_parallel_size (MoE)")
    p.add_argument("--hf-config", default=None, help="model.hf_config: the architecture of a Hugging Face folder")
    p.add_argument("--stop-at", type=int, default=None, help="exit after this many iterations (resume tests)")
    p.add_argument("--set", action="append", default=[], help="section.key=value (a YAML value), applied last")
    args = p.parse_args()
    cfg = tiny_config(train_iters=args.iters, eval_iters=2, init_from=args.init_from, model__num_layers=args.layers,
                      async_save=args.async_save, save_interval=args.save_interval, model__hf_config=args.hf_config)
    cfg.parallel.nproc_per_node = args.procs
    cfg.parallel.tensor_model_parallel_size = args.tp
    cfg.parallel.pipeline_model_parallel_size = args.pp
    cfg.parallel.virtual_pipeline_model_parallel_size = args.vpp
    cfg.parallel.use_distributed_optimizer = args.distopt
    cfg.parallel.expert_model_parallel_size = args.ep
    for item in args.set:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, yaml.safe_load(value))
    relaunch_under_torchrun([__file__, *sys.argv[1:]], cfg.parallel.nproc_per_node)

    import torch

    from megatron_ipt.training.train import train_stage

    summary = train_stage(cfg, args.tokenized_dir, args.out_dir, "dist-test", exit_after_iterations=args.stop_at)
    if int(__import__("os").environ.get("RANK", 0)) == 0:
        (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    del torch


if __name__ == "__main__":
    main()
