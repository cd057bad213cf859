"""``ipt plan``: the memory estimate counts the bytes of the tensors the trainer really builds, reports every config
problem at once, and says whether the large examples fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megatron_ipt.config import load_config
from megatron_ipt.training import cpu_backend, parallel, plan
from megatron_ipt.training.presets import resolve_preset
from megatron_ipt.training.train import check_inputs, setup_model_and_optimizer

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import make_tokenized_dir, tiny_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenized_dir(tmp_path_factory):
    return make_tokenized_dir(tmp_path_factory.mktemp("tokenized"), train_docs=40, heldout_docs=4)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def built_bytes(cfg, tokenized_dir, out_dir) -> tuple[dict, int]:
    """Bytes of the weights, gradient buffers and optimizer states a real world-size-1 setup builds (after one
    optimizer step, when Adam's moments exist), and the padded vocabulary."""
    with cpu_backend.cpu_backend(enabled=True):
        try:
            run = setup_model_and_optimizer(cfg, check_inputs(cfg, tokenized_dir, out_dir), torch.device("cpu"))
            run.optimizer.step()
            inner = run.optimizer.optimizer
            states = [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
            main = [p for g in inner.param_groups for p in g["params"]] if cfg.train.precision == "bf16" else []
            (ddp,) = run.model
            if cfg.parallel.use_distributed_optimizer:  # the weights are views into the padded parameter buffer
                weights = sum(b.param_data.numel() * b.param_data.element_size() for b in ddp.buffers)
            else:
                weights = tensor_bytes(ddp.parameters())
            return {"parameters": sum(p.numel() for p in ddp.parameters()), "weight_bytes": weights,
                    "gradient_bytes": sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers),
                    "optimizer_bytes": tensor_bytes(states) + tensor_bytes(main)}, run.vocab_size
        finally:
            parallel.teardown()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU path")
@pytest.mark.parametrize("settings", [
    {},
    {"precision": "bf16", "parallel__use_distributed_optimizer": True},
    {"precision": "bf16", "parallel__use_distributed_optimizer": True, "parallel__overlap_grad_reduce": True,
     "parallel__bucket_size": 3000},
], ids=["fp32", "bf16-distopt", "bf16-distopt-buckets"])
def test_weights_grads_and_optimizer_states_match_the_tensors_the_trainer_builds(tokenized_dir, tmp_path, settings):
    cfg = tiny_config(**settings)
    built, vocab = built_bytes(cfg, tokenized_dir, tmp_path)
    estimate = plan.estimate(cfg, resolve_preset(cfg.model), world_size=1, vocab_size=vocab, fused_attention=False)
    for key, value in built.items():
        assert getattr(estimate, key) == pytest.approx(value, rel=0.01), key



@pytest.fixture(scope="module")
def moe_hf_config(tmp_path_factory):
    """A tiny Qwen3-MoE ``config.json`` (4 experts of 48, top-2, QK-norm) for ``model.hf_config``."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("moe-config")
    transformers.Qwen3MoeConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                                num_experts_per_tok=2, moe_intermediate_size=48).save_pretrained(folder)
    return folder / "config.json"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU path")
@pytest.mark.parametrize("settings", [{}, {"precision": "bf16", "parallel__use_distributed_optimizer": True}],
                         ids=["fp32", "bf16-distopt"])
def test_moe_weights_grads_and_optimizer_states_match_the_tensors_the_trainer_builds(tokenized_dir, tmp_path,
                                                                                     moe_hf_config, settings):
    """Every expert's weights count (memory), not only the top-k active ones (FLOPs); the router is not split."""
    cfg = tiny_config(model__hf_config=str(moe_hf_config), **settings)
    built, vocab = built_bytes(cfg, tokenized_dir, tmp_path)
    estimate = plan.estimate(cfg, resolve_preset(cfg.model), world_size=1, vocab_size=vocab, fused_attention=False)
    for key, value in built.items():
        assert getattr(estimate, key) == pytest.approx(value, rel=0.01), key


@pytest.mark.dist
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU path")
def test_every_rank_of_an_expert_parallel_layout_holds_what_the_plan_says(tokenized_dir, tmp_path, moe_hf_config):
    """EP = 2 on 2 processes, bf16 with the distributed optimizer: the experts live in their own buffer, sharded over
    the expert data parallel ranks (1 here) while the rest is sharded over the 2 data parallel ranks."""
    settings = ["parallel.expert_model_parallel_size=2", "parallel.use_distributed_optimizer=true",
                "train.precision=bf16", f"model.hf_config={moe_hf_config}"]
    ranks = measured_on_two_ranks(tokenized_dir, tmp_path, settings)
    cfg = tiny_config(model__hf_config=str(moe_hf_config), precision="bf16", parallel__use_distributed_optimizer=True,
                      parallel__expert_model_parallel_size=2)
    (stage,) = plan.estimate_stages(cfg, resolve_preset(cfg.model), world_size=2, vocab_size=ranks[0]["vocab_size"],
                                    fused_attention=False).values()
    for rank in ranks:
        for key in ("parameters", "weight_bytes", "gradient_bytes", "optimizer_bytes"):
            assert getattr(stage, key) == pytest.approx(rank[key], rel=0.01), (rank["rank"], key)

def test_buffer_padding_follows_megatron_core():
    # distributed optimizer: each parameter starts at a multiple of 64, the bucket ends at a multiple of lcm(DP, 128)
    assert plan.buffer_numel([10, 100], distributed_optimizer=True, dp=2, bucket_size=None) == 256
    assert plan.buffer_numel([10, 100], distributed_optimizer=False, dp=2, bucket_size=None) == 110
    assert plan.buffer_numel([100, 100], distributed_optimizer=True, dp=3, bucket_size=50) == 2 * 384


def ipt_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_ipt.cli", "plan", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


@pytest.mark.parametrize("name, world", [("llama3-8b", 8), ("llama3-70b", 64)])
def test_the_large_examples_fit_in_80_gb(name, world):
    out = ipt_plan(f"examples/{name}-cpt.yaml", "--set", "model.hf_config=null", "--set", f"model.preset={name}",
                   "--world-size", str(world))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].startswith("fits: yes (") and "of 80 GB)" in out.stdout


def test_a_layout_that_does_not_fit_exits_3():
    out = ipt_plan("examples/llama3-70b-cpt.yaml", "--set", "model.hf_config=null", "--set", "model.preset=llama3-70b",
                   "--world-size", "64", "--set", "parallel.overlap_param_gather=false",
                   "--set", "parallel.use_distributed_optimizer=false", "--set", "parallel.align_param_gather=false")
    assert out.returncode == plan.EXIT_DOES_NOT_FIT, out.stderr
    assert out.stdout.splitlines()[-1].startswith("fits: no (")


def test_every_problem_is_reported_at_once_before_any_gpu():
    out = ipt_plan("examples/quickstart.yaml", "--set", "train.fp8=hybrid", "--set", "train.device=cpu",
                   "--set", "train.global_batch_size=7", "--set", "parallel.tensor_model_parallel_size=3",
                   "--world-size", "3")
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert any("global_batch_size 7" in line for line in lines)
    assert any("tensor_model_parallel_size 3" in line for line in lines)
    assert any("train.fp8" in line for line in lines)
    assert len(lines) >= 3


def test_the_model_must_resolve():
    out = ipt_plan("examples/llama3-8b-cpt.yaml")  # its hf_config lies on the cluster
    assert out.returncode == 2 and out.stderr.startswith("ipt plan: model:")


def test_activations_follow_the_recompute_setting():
    cfg = load_config(ROOT / "examples/llama3-8b-cpt.yaml", ["model.hf_config=null", "model.preset=llama3-8b"])
    preset = resolve_preset(cfg.model)

    def activations(**train):
        for k, v in train.items():
            setattr(cfg.train, k, v)
        return plan.estimate(cfg, preset, world_size=8, vocab_size=128256, fused_attention=True).activation_bytes

    block5 = activations()
    none = activations(recompute="none")
    full = activations(recompute="full", recompute_method="uniform", recompute_num_layers=1)
    assert full < block5 < none


def megatron_lm_layer_activations(cfg, preset) -> float:
    """The transformer-layer part of Megatron-LM's ``megatron/training/theoretical_memory_usage.py`` (same formula
    family: Korthikanti et al. 2022, Table 2), first pipeline stage: per layer s·b·h·(18 + 4f/h) / t with sequence
    parallel and selective recompute (``compute_activation_memory``), else s·b·h·(10 + 24/t)
    (``compute_activation_memory_without_sp``); times the layers of the model (PP stages x PP micro-batches in
    flight) and the interleaved schedule's penalty 1 + (PP-1)/(PP·VPP)."""
    p, t = cfg.parallel, cfg.train
    s, b, h, f = cfg.model.seq_length // p.context_parallel_size, t.micro_batch_size, preset.hidden_size, preset.ffn_hidden_size
    tp, pp, vpp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    if p.sequence_parallel and t.recompute == "selective":
        per_layer = s * b * h * (18 + 4 * f / h) / tp
    else:
        per_layer = s * b * h * (10 + 24 / tp)
    total = per_layer * preset.num_layers
    return total * (1 + (pp - 1) / (pp * vpp)) if vpp else total


@pytest.mark.parametrize("name, world, settings", [
    ("llama3-8b", 8, ["train.recompute=none", "train.fp8=null"]),  # bf16, no recompute, TP 1
    ("llama3-70b", 64, ["train.recompute=selective", "train.fp8=null"]),  # TP 4 + SP, selective, CP 2, VPP 5
])
def test_layer_activations_agree_with_megatron_lm_theoretical_memory_within_5_percent(name, world, settings):
    cfg = load_config(ROOT / f"examples/{name}-cpt.yaml", ["model.hf_config=null", f"model.preset={name}", *settings])
    preset = resolve_preset(cfg.model)
    estimate = plan.estimate(cfg, preset, world_size=world, vocab_size=128256, fused_attention=True)
    embedding = estimate.in_flight_microbatches * 2 * cfg.model.seq_length // cfg.parallel.context_parallel_size * \
        preset.hidden_size // (cfg.parallel.tensor_model_parallel_size if cfg.parallel.sequence_parallel else 1)
    ours = estimate.activation_bytes - embedding
    reference = megatron_lm_layer_activations(cfg, preset)
    print(f"{name}: layer activations {ours / 1e9:.2f} GB, Megatron-LM's formula {reference / 1e9:.2f} GB")
    assert ours == pytest.approx(reference, rel=0.05)


def measured_on_two_ranks(tokenized_dir: Path, tmp_path: Path, settings: list[str]) -> list[dict]:
    """Run ``plan_worker.py`` on 2 gloo processes with ``--set`` ``settings``; returns each rank's measured bytes."""
    out = tmp_path / "bytes.json"
    result = subprocess.run([sys.executable, str(Path(__file__).parent / "plan_worker.py"), str(tokenized_dir), str(out),
                             "--procs", "2", *[a for s in settings for a in ("--set", s)]],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.dist
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU path")
@pytest.mark.parametrize("settings", [
    ["parallel.tensor_model_parallel_size=2"],
    ["parallel.pipeline_model_parallel_size=2", "model.num_layers=4"],
    ["parallel.use_distributed_optimizer=true", "train.precision=bf16"],
], ids=["tp2", "pp2", "dp2-distopt-bf16"])
def test_every_rank_of_a_two_process_layout_holds_what_the_plan_says(tokenized_dir, tmp_path, settings):
    ranks = measured_on_two_ranks(tokenized_dir, tmp_path, settings)
    cfg = tiny_config()
    for item in settings:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, yaml.safe_load(value))
    stages = plan.estimate_stages(cfg, resolve_preset(cfg.model), world_size=2, vocab_size=ranks[0]["vocab_size"],
                                  fused_attention=False)
    for rank in ranks:
        stage = stages["only"] if "only" in stages else stages["first" if rank["pp_rank"] == 0 else "last"]
        for key in ("parameters", "weight_bytes", "gradient_bytes", "optimizer_bytes"):
            assert getattr(stage, key) == pytest.approx(rank[key], rel=0.01), (rank["rank"], key)


def test_precision_auto_plans_as_bf16_for_a_gpu_and_as_resolved_for_cpu():
    """``ipt plan`` resolves ``train.precision: auto`` for the device the job will run on: a GPU job (planned here,
    where no GPU is visible) as bf16; a CPU job as this CPU resolves it."""
    from megatron_ipt.training.precision import resolve_precision

    cfg = load_config(ROOT / "examples/llama3-8b-cpt.yaml", ["model.hf_config=null", "model.preset=llama3-8b",
                                                             "train.fp8=null"])
    preset = resolve_preset(cfg.model)

    def planned(device: str, precision: str):
        cfg.train.device, cfg.train.precision = device, precision
        p = plan.estimate(cfg, preset, world_size=8, vocab_size=128256, fused_attention=True)
        return p.weight_bytes, p.gradient_bytes, p.optimizer_bytes, p.activation_bytes

    if not torch.cuda.is_available():
        assert planned("cuda", "auto") == planned("cuda", "bf16") != planned("cuda", "fp32")
    on_cpu = planned("cpu", "auto")
    assert cfg.train.precision == "auto"  # the caller's config is left as it was
    assert on_cpu == planned("cpu", resolve_precision("auto", "cpu"))
