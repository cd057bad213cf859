"""Model FLOPs, TFLOP/s, MFU and TensorBoard output."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from megatron_ipt.training.metrics import flops_per_token, peak_tflops, throughput
from megatron_ipt.training.presets import PRESETS

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import make_tokenized_dir, tiny_config  # noqa: E402


def test_llama3_8b_flops_per_token_by_hand():
    # h 4096, 32 layers, 8 groups x 128, SwiGLU 14336, vocabulary 128256, sequence 8192:
    # per layer 2*4096*(8192 + 2048) + 6*4096*14336 + 4*8192*4096 = 570,425,344; logits 2*4096*128256
    expected = 3 * (32 * 570_425_344 + 1_050_673_152)
    assert flops_per_token(PRESETS["llama3-8b"], 8192, 128256) == expected == pytest.approx(57.91e9, rel=1e-3)
    # the published ~13.5k tokens/s per H100 (Llama-3-8B, FP8) is ~782 TFLOP/s: 39.5% MFU against the FP8 peak
    t = throughput(13_500, expected, 1, peak_tflops("NVIDIA H100 80GB HBM3", "fp8"))
    assert t["tflops_per_device"] == pytest.approx(781.8, rel=1e-3) and t["mfu"] == pytest.approx(0.395, abs=1e-3)


def test_device_peaks():
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H200", "bf16") == 989.4
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp8") is None
    assert peak_tflops(None, "bf16") is None
    assert "mfu" not in throughput(1000, 1e9, 2, None)


def test_tensorboard_and_logged_throughput(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard (cpu/train extra) not installed in this venv")
    from megatron_ipt.training.train import train_stage

    tokenized = make_tokenized_dir(tmp_path / "tok", train_docs=40, heldout_docs=4)
    summary = train_stage(tiny_config(train_iters=3, eval_iters=1, tensorboard=True), tokenized, tmp_path / "out", "fp")
    assert summary["tflops_per_device"] > 0 and "mfu" not in summary  # CPU: no peak, no MFU
    events = list((tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/tflops_per_device"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]


def _gpu_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_throughput", Path(__file__).parents[1] / "benchmarks" / "gpu_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_builds_bf16_and_fp8_configs_and_checks_its_arguments():
    from megatron_ipt.config import ExperimentConfig
    from megatron_ipt.training.precision import precision_fields

    bench = _gpu_benchmark()
    args = bench.parse_args(["--layers", "2", "--seq-length", "2048", "--fp8-recipe", "delayed"])
    assert args.precisions == ["bf16", "fp8"] and args.global_batch_size == 8
    bf16, fp8 = bench.build_config(args, "bf16"), bench.build_config(args, "fp8")
    for cfg in (bf16, fp8):
        ExperimentConfig.model_validate(cfg.model_dump())  # a valid experiment
        assert (cfg.model.preset, cfg.model.num_layers, cfg.model.seq_length) == ("llama3-8b", 2, 2048)
        assert (cfg.train.device, cfg.train.precision, cfg.model.transformer_impl) == ("cuda", "bf16", "transformer_engine")
    assert bf16.train.fp8 is None and (fp8.train.fp8, fp8.train.fp8_recipe) == ("hybrid", "delayed")
    fields = precision_fields(fp8.train, "transformer_engine", "cuda", True, 2, 1)
    assert fields["fp8"] == "hybrid" and fields["fp8_recipe"] == "delayed"
    with pytest.raises(SystemExit):
        bench.parse_args(["--transformer-impl", "local"])  # FP8 needs TE
    with pytest.raises(SystemExit):
        bench.parse_args(["--micro-batch-size", "3"])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_benchmark_fails_clearly_without_a_gpu(tmp_path, capsys):
    assert _gpu_benchmark().main(["--json", str(tmp_path / "x.json")]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_moe_flops_count_the_active_experts_and_the_router():
    # Qwen3-30B-A3B: h 2048, 48 layers, 32 heads x 128 (q 4096 != h), 4 groups x 128, top-8 of 128 experts of 768,
    # vocabulary 151936, sequence 4096: per layer 2*2048*(8192 + 1024) + 6*2048*768*8 + 2*2048*128 + 4*4096*4096
    per_layer = 37_748_736 + 75_497_472 + 524_288 + 67_108_864
    expected = 3 * (48 * per_layer + 2 * 2048 * 151936)
    assert flops_per_token(PRESETS["qwen3-30b-a3b"], 4096, 151936) == expected == 27_913_617_408
