"""Build the trainer's model, DDP and optimizer for a layout on several gloo processes and report, per rank, the
bytes of the weights, gradient buffers and optimizer states (used by tests/test_plan.py).

    python tests/plan_worker.py TOKENIZED_DIR OUT_JSON --procs 2 [--set section.key=value ...]
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
    p.add_argument("out_json", type=Path)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    cfg = tiny_config()
    cfg.parallel.nproc_per_node = args.procs
    for item in args.set:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, yaml.safe_load(value))
    relaunch_under_torchrun([__file__, *sys.argv[1:]], args.procs)

    import torch

    from megatron_ipt.training import cpu_backend, mcore, parallel
    from megatron_ipt.training.train import check_inputs, setup_model_and_optimizer

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    with cpu_backend.cpu_backend(enabled=True):
        try:
            run = setup_model_and_optimizer(cfg, check_inputs(cfg, args.tokenized_dir, args.out_json.parent),
                                            torch.device("cpu"))
            run.optimizer.step()
            optimizers = getattr(run.optimizer, "chained_optimizers", [run.optimizer])
            inner = [o.optimizer for o in optimizers]
            states = [t for o in inner for s in o.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
            main = [p for o in inner for g in o.param_groups for p in g["params"]] if cfg.train.precision == "bf16" else []
            # the experts have their own buffers when EP > 1
            buffers = [b for chunk in run.model for b in [*chunk.buffers, *getattr(chunk, "expert_parallel_buffers", [])]]
            if cfg.parallel.use_distributed_optimizer:
                weights = sum(b.param_data.numel() * b.param_data.element_size() for b in buffers)
            else:
                weights = nbytes(p for chunk in run.model for p in chunk.parameters())
            ps = mcore.parallel_state()
            mine = {"rank": torch.distributed.get_rank(), "pp_rank": ps.get_pipeline_model_parallel_rank(),
                    "parameters": sum(p.numel() for chunk in run.model for p in chunk.parameters()),
                    "weight_bytes": weights,
                    "gradient_bytes": sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers),
                    "optimizer_bytes": nbytes(states) + nbytes(main), "vocab_size": run.vocab_size}
            everyone = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, mine)
            if torch.distributed.get_rank() == 0:
                args.out_json.write_text(json.dumps(everyone, indent=1))
        finally:
            parallel.teardown()


if __name__ == "__main__":
    main()
