"""What a launcher needs to know about a training run before it starts processes: ``python -m
megatron_ipt.launch.plan CONFIG [ipt train arguments]``.

``slurm/train.sbatch`` runs this in the same environment that trains (the venv, or the container image
through ``srun --container-image`` on the first node), so the batch shell itself needs no Python. It prints
NUL-terminated ``KEY=VALUE`` records (safe for any path; read them with ``read -r -d ''``):

- ``run_dir``: the run folder (``RUN_DIR/train/stopped.json`` tells the script that training saved and stopped);
- ``nproc_per_node``: processes per node, from the config's ``parallel.nproc_per_node`` (the one source of truth);
- ``resume_iteration``: the iteration ``RUN_DIR/train/checkpoints/latest`` names (0 without a checkpoint);
- ``env.NAME``: process environment for the layout (see :func:`process_environment`).

Arguments other than ``--set KEY=VALUE`` (e.g. ``--force``) are accepted and ignored, so the script can pass
the same ``IPT_ARGS`` here and to ``ipt train``. A bad config prints one line naming the key and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from megatron_ipt.errors import IptError


def process_environment(cfg) -> dict[str, str]:
    """The process environment NVIDIA's performance recipes set for this layout (Megatron-Bridge
    ``scripts/performance``; Megatron-LM's launch scripts and warnings say the same), exported by
    ``slurm/train.sbatch`` before the training processes start (CUDA reads them when it creates its context); a
    variable already set in the submitting shell wins:

    - ``CUDA_DEVICE_MAX_CONNECTIONS=1`` with tensor, context or sequence parallelism: one hardware queue, so a
      communication kernel launched before a GEMM starts before it (what sequence parallel's and userbuffers'
      overlap rely on; megatron-core warns without it); otherwise 32, so independent kernels (data-parallel
      overlap) run concurrently;
    - ``NVTE_FWD_LAYERNORM_SM_MARGIN`` / ``NVTE_BWD_LAYERNORM_SM_MARGIN=16`` with overlapped data-parallel
      communication: Transformer Engine's norms leave SMs to the NCCL kernels running beside them;
    - ``TORCH_NCCL_AVOID_RECORD_STREAMS=1`` and ``NCCL_NVLS_ENABLE=0``, which every recipe sets.

    None of them changes anything on CPU, so they are derived from the config alone."""
    p = cfg.parallel
    one_queue = p.tensor_model_parallel_size > 1 or p.context_parallel_size > 1 or p.sequence_parallel
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "1" if one_queue else "32",
           "TORCH_NCCL_AVOID_RECORD_STREAMS": "1", "NCCL_NVLS_ENABLE": "0"}
    if p.overlap_grad_reduce or p.overlap_param_gather:
        env.update(NVTE_FWD_LAYERNORM_SM_MARGIN="16", NVTE_BWD_LAYERNORM_SM_MARGIN="16")
    return env


def _latest(path) -> int:
    """The iteration in a checkpoints folder's ``latest`` file (written atomically by the trainer), else 0.
    Read here as text: importing the checkpoint module would import torch and megatron-core."""
    text = path.read_text().strip() if path.is_file() else ""
    return int(text) if text.isdigit() else 0


def plan(config: str, overrides: list[str]) -> dict[str, str]:
    """The records :func:`main` prints, as a dict."""
    from megatron_ipt.config import load_config

    cfg = load_config(config, overrides)
    run_dir = cfg.run_path
    out = {"run_dir": str(run_dir), "nproc_per_node": str(cfg.parallel.nproc_per_node),
           "resume_iteration": str(_latest(run_dir / "train" / "checkpoints" / "latest"))}
    out.update({f"env.{k}": v for k, v in process_environment(cfg).items()})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_ipt.launch.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args, _ = parser.parse_known_args(argv)
    try:
        records = plan(args.config, args.overrides)
    except IptError as e:
        print(f"cannot read {args.config}: {e}", file=sys.stderr)
        return 2
    sys.stdout.write("".join(f"{k}={v}\0" for k, v in records.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
