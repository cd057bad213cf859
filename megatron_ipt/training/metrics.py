"""Training throughput in the field's terms: model FLOPs per token, TFLOP/s per device, MFU; TensorBoard.

Model FLOPs per token (training = forward + backward = 3 x forward; Narayanan et al., *Efficient Large-Scale
Language Model Training on GPU Clusters Using Megatron-LM*, SC'21, §5.1 eq. 3, generalised from GPT's
4h MLP and full multi-head attention to Llama's SwiGLU and grouped-query attention)::

    forward per token = L * [ 2h(2h + 2*g*d)      # Q and output projections (h x h each), K and V (h x g*d each)
                            + 6*h*F               # SwiGLU: gate, up (h x F) and down (F x h)
                            + 4*s*h ]             # attention scores QK^T and the weighted sum over s positions
                        + 2*h*V                   # output layer (logits)
    training per token = 3 * forward per token

with L layers, hidden size h, g query groups of head size d, SwiGLU size F, sequence length s and
(padded) vocabulary V. The Q and output projections count ``h * n*d`` each, which is h x h unless the head
size is set on its own (Qwen3). A mixture-of-experts layer counts the *active* parameters: its MLP term is
``6*h*Fe*k`` (k experts of SwiGLU size Fe per token) plus the router ``2*h*E`` over E experts. Causal attention is counted as full attention, as Megatron-LM's formula does, so
numbers compare with published Megatron/NeMo figures; activation recomputation is not counted (model FLOPs,
not hardware FLOPs). MFU = achieved model FLOP/s per device / the device's dense peak for the precision.
"""

from __future__ import annotations

from pathlib import Path

from megatron_ipt.training.presets import ModelPreset

# Dense (no sparsity) peak TFLOP/s by device name fragment and precision, from the vendors' data sheets.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.4, "fp8": 1978.9},  # NVIDIA H100 Tensor Core GPU data sheet
    "H100 PCIe": {"bf16": 756.0, "fp8": 1513.0},
    "H100 NVL": {"bf16": 835.0, "fp8": 1671.0},
    "H100": {"bf16": 989.4, "fp8": 1978.9},  # "NVIDIA H100 80GB HBM3" is the SXM part
    "H200": {"bf16": 989.4, "fp8": 1978.9},  # same compute as H100 SXM, more memory
    "GH200": {"bf16": 989.4, "fp8": 1978.9},
    "B200": {"bf16": 2250.0, "fp8": 4500.0},
    "A100": {"bf16": 312.0},
}


def flops_per_token(preset: ModelPreset, seq_length: int, vocab_size: int) -> float:
    """Training model FLOPs per token (see the module docstring for the formula and its source)."""
    h, L, F = preset.hidden_size, preset.num_layers, preset.ffn_hidden_size
    q, kv = preset.num_attention_heads * preset.kv_channels, preset.num_query_groups * preset.kv_channels
    if preset.num_moe_experts:  # active parameters: top-k experts and the router
        mlp = 6 * h * preset.expert_ffn_hidden_size * preset.moe_router_topk + 2 * h * preset.num_moe_experts
    else:
        mlp = 6 * h * F
    per_layer = 2 * h * (2 * q + 2 * kv) + mlp + 4 * seq_length * q
    return 3.0 * (L * per_layer + 2 * h * vocab_size)


def peak_tflops(device_name: str | None, precision: str) -> float | None:
    """The dense peak TFLOP/s of a device (``torch.cuda.get_device_name()``) for ``bf16`` or ``fp8``;
    None for unknown devices and CPUs (MFU is then not reported)."""
    if not device_name:
        return None
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # most specific name first
        if key in device_name:
            return PEAK_TFLOPS[key].get(precision)
    return None


def throughput(tokens_per_s: float, flops_token: float, devices: int, peak: float | None) -> dict[str, float]:
    """``tflops_per_device`` and, when the device peak is known, ``mfu`` (a fraction) for a measured rate."""
    tflops = tokens_per_s * flops_token / devices / 1e12
    out = {"tflops_per_device": tflops}
    if peak:
        out["mfu"] = tflops / peak
    return out


class TensorBoard:
    """Scalars to TensorBoard (``torch.utils.tensorboard``) under ``log_dir``, rank 0 only; a no-op when disabled.
    Raises IptError naming the extra when enabled without the ``tensorboard`` package."""

    def __init__(self, log_dir: Path, enabled: bool) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            from megatron_ipt.errors import IptError

            raise IptError("train.tensorboard needs the tensorboard package: pip install tensorboard "
                           "(part of the train and cpu extras)") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, record: dict, step: int) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "iteration":
                self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandB:
    """The same scalars to Weights & Biases (``train.wandb_project`` / ``wandb_name``), rank 0 only; files under
    ``run_dir`` (``wandb/``). Offline runs (``WANDB_MODE=offline``) write a run folder to sync later. Raises IptError
    naming the extra when enabled without the ``wandb`` package."""

    def __init__(self, run_dir: Path, *, project: str | None, name: str | None, config: dict, enabled: bool) -> None:
        self.run = None
        if not enabled or not project:
            return
        try:
            import wandb
        except ImportError:
            from megatron_ipt.errors import IptError

            raise IptError("train.wandb_project needs the wandb package: pip install -e '.[trackers]'") from None
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=name, dir=str(run_dir), config=config, resume="allow")

    def log(self, record: dict, step: int) -> None:
        if self.run is not None:
            self.run.log({f"train/{k}": v for k, v in _scalars(record).items()}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MLflow:
    """The same scalars to MLflow (``train.mlflow_tracking_uri``, experiment ``train.mlflow_experiment``), rank 0
    only; the run is named after the experiment. Raises IptError naming the extra without the ``mlflow`` package."""

    def __init__(self, *, tracking_uri: str | None, experiment: str, run_name: str, enabled: bool) -> None:
        self.mlflow = None
        if not enabled or not tracking_uri:
            return
        try:
            import mlflow
        except ImportError:
            from megatron_ipt.errors import IptError

            raise IptError("train.mlflow_tracking_uri needs the mlflow package: pip install -e '.[trackers]'") from None
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)
        mlflow.start_run(run_name=run_name)
        self.mlflow = mlflow

    def log(self, record: dict, step: int) -> None:
        if self.mlflow is not None:
            self.mlflow.log_metrics({f"train/{k}": float(v) for k, v in _scalars(record).items()}, step=step)

    def close(self) -> None:
        if self.mlflow is not None:
            self.mlflow.end_run()
            self.mlflow = None


def _scalars(record: dict) -> dict:
    """The numeric entries of a log record (what TensorBoard gets), without the iteration itself."""
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration"}


class Trackers:
    """TensorBoard, W&B and MLflow together (each only when configured), rank 0 only: ``log(record, step)``,
    ``close()``. ``train``: the ``TrainConfig``; ``config``: the resolved experiment config (W&B run config)."""

    def __init__(self, out_dir: Path, train, *, name: str, config: dict, enabled: bool) -> None:
        self.writers = [
            TensorBoard(out_dir / "tensorboard", enabled=enabled and train.tensorboard),
            WandB(out_dir, project=train.wandb_project, name=train.wandb_name or name, config=config, enabled=enabled),
            MLflow(tracking_uri=train.mlflow_tracking_uri, experiment=train.mlflow_experiment or name, run_name=name,
                   enabled=enabled),
        ]

    def log(self, record: dict, step: int) -> None:
        for writer in self.writers:
            writer.log(record, step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
