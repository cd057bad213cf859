"""Precision and transformer implementation: config checks, the mapping into a real TransformerConfig, and
bf16 training on CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from megatron_ipt.config import TrainConfig
from megatron_ipt.training.precision import PrecisionError, precision_fields, resolve_transformer_impl

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import make_tokenized_dir, tiny_config  # noqa: E402


def fields(te=True, device="cuda", impl="transformer_engine", layers=32, pp=1, **train):
    return precision_fields(TrainConfig(**train), impl, device, te, layers, pp)


def test_fp8_maps_to_transformer_config_fields():
    f = fields(precision="bf16", fp8="hybrid", fp8_recipe="tensorwise", fp8_bf16_layers=2)
    assert f == {"bf16": True, "fp8": "hybrid", "fp8_recipe": "tensorwise", "fp8_amax_history_len": 1024,
                 "fp8_amax_compute_algo": "max", "first_last_layers_bf16": True, "num_layers_at_start_in_bf16": 2,
                 "num_layers_at_end_in_bf16": 2}
    assert fields(precision="bf16") == {"bf16": True}
    assert fields(precision="fp32", device="cpu", te=False, impl="local") == {"bf16": False}


def test_the_mapped_fields_build_a_real_transformer_config():
    from megatron_ipt.training import mcore
    from megatron_ipt.training.model import transformer_config
    from megatron_ipt.training.parallel import Layout
    from megatron_ipt.training.presets import PRESETS

    f = fields(precision="bf16", fp8="hybrid", fp8_recipe="delayed", layers=4)
    layout = Layout(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, data_parallel_size=1,
                    micro_batch_size=1, global_batch_size=1, world_size=1, num_microbatches=1)
    cfg = transformer_config(PRESETS["llama-test"], layout, device=torch.device("cpu"), precision="bf16",
                             precision_fields=f)
    assert (cfg.fp8, cfg.fp8_recipe, cfg.fp8_amax_history_len, cfg.fp8_amax_compute_algo) == \
        ("hybrid", "delayed", 1024, "max")
    assert cfg.bf16 and cfg.params_dtype == torch.bfloat16
    assert mcore  # the config came through megatron_ipt.training.mcore


@pytest.mark.parametrize("kwargs, message", [
    (dict(device="cpu", te=False, impl="local", precision="bf16", fp8="hybrid"), "needs an FP8-capable GPU"),
    (dict(te=False, precision="bf16", fp8="e4m3"), "needs Transformer Engine"),
    (dict(impl="local", precision="bf16", fp8="hybrid"), "transformer_impl transformer_engine"),
    (dict(precision="fp32", fp8="hybrid"), "set train.precision: bf16"),
    (dict(precision="bf16", fp8="hybrid", fp8_bf16_layers=1), "current-scaling recipe"),
    (dict(precision="bf16", fp8="hybrid", fp8_recipe="tensorwise", fp8_bf16_layers=3, layers=4),
     "leaves no FP8 layer"),
])
def test_impossible_combinations_are_one_line_errors(kwargs, message):
    with pytest.raises(PrecisionError, match=message):
        fields(**kwargs)


def test_transformer_impl_resolution():
    assert resolve_transformer_impl("auto", "cpu", True) == "local"
    assert resolve_transformer_impl("auto", "cuda", True) == "transformer_engine"
    assert resolve_transformer_impl("auto", "cuda", False) == "local"
    with pytest.raises(PrecisionError, match="needs a cuda device"):
        resolve_transformer_impl("transformer_engine", "cpu", True)
    with pytest.raises(PrecisionError, match="does not import"):
        resolve_transformer_impl("transformer_engine", "cuda", False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-path test")
def test_bf16_training_on_cpu_learns(tmp_path):
    from megatron_ipt.training.train import train_stage

    tokenized = make_tokenized_dir(tmp_path / "tok", train_docs=80, heldout_docs=4)
    summary = train_stage(tiny_config(train_iters=12, precision="bf16", eval_iters=1), tokenized, tmp_path / "out", "fp")
    raw = summary["losses"]["heldout_raw"]
    assert summary["completed"] and raw["after"] < raw["before"] - 0.3


def test_auto_precision_resolves_per_device():
    from data_prep.engines import native_bf16_cpu
    from megatron_ipt.training.precision import resolve_precision

    assert resolve_precision("fp32", "cuda") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") == ("bf16" if native_bf16_cpu() else "fp32")
    gpu_bf16 = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
    assert resolve_precision("auto", "cuda") == ("bf16" if gpu_bf16 else "fp32")
    # FP8 runs on top of the resolved precision
    assert fields(precision="auto", fp8="hybrid", fp8_recipe="tensorwise")["bf16"] is gpu_bf16
    assert fields(precision="auto", device="cpu", te=False, impl="local") == {"bf16": native_bf16_cpu()}


def test_training_stages_see_the_resolved_precision_and_the_callers_config_is_unchanged():
    from megatron_ipt.training.precision import resolve_precision
    from megatron_ipt.training.train import on_training_device

    cfg = tiny_config(precision="auto")
    seen = on_training_device(cfg, lambda run_cfg, device: (run_cfg.train.precision, device.type))
    assert seen == (resolve_precision("auto", "cpu"), "cpu") and seen[0] in ("fp32", "bf16")
    assert cfg.train.precision == "auto"
