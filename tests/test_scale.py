"""Activation recompute and communication overlap: the keys reach megatron-core's configs, bad settings are one-line
errors before any process group, and on CPU (gloo) neither changes a loss or a gradient norm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ipt.config import ExperimentConfig
from megatron_ipt.training import cpu_backend, mcore, parallel, scale
from megatron_ipt.training.train import check_inputs, setup_model_and_optimizer, train_stage

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import make_tokenized_dir, tiny_config  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-path tests")
WORKER = Path(__file__).parent / "dist_train_worker.py"


@pytest.fixture(scope="module")
def tokenized_dir(tmp_path_factory):
    return make_tokenized_dir(tmp_path_factory.mktemp("tokenized"), train_docs=120, heldout_docs=8)


def curve(out_dir: Path) -> dict[int, tuple[float, float]]:
    """(loss, grad norm) of every iteration in ``metrics.jsonl``."""
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: (r["loss"], r["grad_norm"]) for r in records if "iteration" in r}


def assert_same_curve(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected) and got
    for it in expected:
        assert got[it] == pytest.approx(expected[it], rel=1e-6, abs=1e-6), it


def two_processes(tokenized_dir: Path, out: Path, *flags: str) -> dict:
    result = subprocess.run([sys.executable, str(WORKER), str(tokenized_dir), str(out), "--procs", "2", *flags],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "summary.json").read_text())


# ------------------------------------------------------------------------------------------- mapping
def scale_config(**sections) -> ExperimentConfig:
    cfg = ExperimentConfig()
    for key, value in sections.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


@pytest.mark.parametrize("train, expected", [
    ({}, {}),
    ({"recompute": "selective"}, {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}),
    ({"recompute": "selective", "recompute_modules": ["mlp"]},
     {"recompute_granularity": "selective", "recompute_modules": ["mlp"]}),
    ({"recompute": "full"}, {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}),
    ({"recompute": "full", "recompute_method": "block"},  # default: every layer of a stage (8 layers / PP 2)
     {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 4}),
    ({"recompute": "full", "recompute_method": "block", "recompute_num_layers": 3},
     {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 3}),
], ids=["none", "selective", "selective-mlp", "full-uniform", "full-block-default", "full-block-3"])
def test_recompute_keys_reach_a_real_transformer_config(train, expected):
    cfg = scale_config(parallel__pipeline_model_parallel_size=2, **{f"train__{k}": v for k, v in train.items()})
    assert scale.problems(cfg, num_layers=8, device_type="cpu", te_available=False) == []
    fields = scale.transformer_fields(cfg, num_layers=8)
    assert fields == expected
    config = mcore.transformer_config(num_layers=8, hidden_size=64, num_attention_heads=4, pipeline_model_parallel_size=2,
                                      pipeline_dtype=torch.float32, use_cpu_initialization=True, **fields)
    assert config.recompute_granularity == expected.get("recompute_granularity")
    for key, value in expected.items():
        assert getattr(config, key) == value


def test_overlap_keys_reach_the_ddp_and_optimizer_configs():
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    cfg = scale_config(parallel__use_distributed_optimizer=True, parallel__overlap_grad_reduce=True,
                       parallel__overlap_param_gather=True, parallel__align_param_gather=True,
                       parallel__bucket_size=5000, parallel__average_in_collective=True, train__precision="bf16")
    assert scale.problems(cfg, num_layers=2, device_type="cpu", te_available=False) == []
    ddp = mcore.make_config(DistributedDataParallelConfig, **scale.ddp_fields(cfg))
    assert (ddp.overlap_grad_reduce, ddp.overlap_param_gather, ddp.align_param_gather, ddp.bucket_size,
            ddp.average_in_collective, ddp.grad_reduce_in_fp32, ddp.use_distributed_optimizer) == (
        True, True, True, 5000, True, True, True)
    assert mcore.make_config(OptimizerConfig, **scale.optimizer_fields(cfg)).overlap_param_gather
    cfg.parallel.grad_reduce_in_fp32 = False  # a bf16 run may reduce in bf16
    assert scale.ddp_fields(cfg)["grad_reduce_in_fp32"] is False


@pytest.mark.parametrize("sections, message", [
    ({"train__recompute": "full", "train__recompute_num_layers": 3}, "train.recompute_num_layers = 3 does not divide the 4 layers"),
    ({"train__recompute": "full", "train__recompute_method": "block", "train__recompute_num_layers": 5},
     "train.recompute_num_layers = 5 is more than the 4 layers"),
    ({"train__recompute": "selective", "train__recompute_modules": ["layernorm"]}, "train.recompute_modules: layernorm needs Transformer Engine"),
    ({"parallel__overlap_param_gather": True, "parallel__overlap_grad_reduce": True},
     "parallel.overlap_param_gather needs parallel.use_distributed_optimizer"),
    ({"parallel__overlap_param_gather": True, "parallel__use_distributed_optimizer": True},
     "parallel.overlap_param_gather needs parallel.overlap_grad_reduce"),
    ({"parallel__align_param_gather": True}, "parallel.align_param_gather needs parallel.overlap_param_gather"),
    ({"parallel__bucket_size": 1000}, "parallel.bucket_size applies to overlapped reduction"),
    ({"parallel__overlap_param_gather_with_optimizer_step": True}, "parallel.overlap_param_gather_with_optimizer_step"),
    ({"parallel__tp_comm_overlap": True}, "parallel.tp_comm_overlap needs CUDA GPUs with Transformer Engine"),
    ({"train__cuda_graph": "local"}, "train.cuda_graph = local needs CUDA GPUs"),
])
def test_impossible_settings_are_one_line_errors_naming_the_key(sections, message):
    cfg = scale_config(**sections)
    found = scale.problems(cfg, num_layers=4, device_type="cpu", te_available=False)
    assert len(found) == 1 and message in found[0], found


def test_gpu_only_settings_are_checked_against_the_layout_on_a_gpu():
    cfg = scale_config(parallel__tp_comm_overlap=True, parallel__tensor_model_parallel_size=2)
    found = scale.problems(cfg, num_layers=4, device_type="cuda", te_available=True)
    assert found == ["parallel.tp_comm_overlap needs tensor_model_parallel_size >= 2 and sequence_parallel: true"]
    cfg.parallel.sequence_parallel = True
    assert scale.problems(cfg, num_layers=4, device_type="cuda", te_available=True) == []
    assert scale.transformer_fields(cfg, num_layers=4) == {"tp_comm_overlap": True}


def test_a_bad_setting_stops_the_run_before_any_process_group(tokenized_dir, tmp_path):
    cfg = tiny_config(train_iters=1, recompute="full", recompute_num_layers=3, model__num_layers=4)
    cfg.parallel.overlap_param_gather = True
    with pytest.raises(scale.ScaleError) as err:
        train_stage(cfg, tokenized_dir, tmp_path, "fp")
    lines = str(err.value).splitlines()
    assert len(lines) == 3 and lines[0].startswith("train.recompute_num_layers = 3")  # every problem at once
    assert not torch.distributed.is_initialized()


def test_overlap_wires_megatron_ddp_into_the_schedule_like_megatron_lm(tokenized_dir, tmp_path):
    cfg = tiny_config(train_iters=1)
    p = cfg.parallel
    p.use_distributed_optimizer = p.overlap_grad_reduce = p.overlap_param_gather = p.align_param_gather = True
    with cpu_backend.cpu_backend(enabled=True):
        try:
            run = setup_model_and_optimizer(cfg, check_inputs(cfg, tokenized_dir, tmp_path), torch.device("cpu"))
            (ddp,) = run.model
            config = ddp.config
            assert ddp.ddp_config.overlap_grad_reduce and ddp.ddp_config.overlap_param_gather
            assert ddp.use_forward_hook and scale.overlaps_param_gather(run.model)
            assert config.no_sync_func == ddp.no_sync and config.grad_sync_func == ddp.start_grad_sync
            assert config.param_sync_func == ddp.start_param_sync
            with scale.params_synced(run.model):  # hooks off inside (evaluation, save), back on after
                assert not ddp.remove_forward_pre_hook_handles
            assert ddp.remove_forward_pre_hook_handles
        finally:
            parallel.teardown()


# ------------------------------------------------------------------------------ recompute: same numbers
RECOMPUTE = {
    "selective": {"recompute": "selective", "recompute_modules": ["core_attn", "mlp"]},
    "full-uniform": {"recompute": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    "full-block": {"recompute": "full", "recompute_method": "block", "recompute_num_layers": 1},
}


@pytest.fixture(scope="module")
def pp1_reference(tokenized_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pp1-none")
    train_stage(tiny_config(train_iters=3, eval_iters=1, save_checkpoint=False), tokenized_dir, out, "fp")
    return curve(out)


@pytest.mark.parametrize("setting", sorted(RECOMPUTE))
def test_recompute_keeps_every_loss_and_grad_norm_at_pp1(tokenized_dir, pp1_reference, tmp_path, setting):
    cfg = tiny_config(train_iters=3, eval_iters=1, save_checkpoint=False, **RECOMPUTE[setting])
    train_stage(cfg, tokenized_dir, tmp_path, "fp")
    assert_same_curve(curve(tmp_path), pp1_reference)


def set_flags(settings: dict) -> list[str]:
    return [arg for k, v in settings.items() for arg in ("--set", f"train.{k}={json.dumps(v)}")]


@pytest.fixture(scope="module")
def pp2_reference(tokenized_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pp2-none")
    two_processes(tokenized_dir, out, "--pp", "2", "--iters", "3", "--set", "train.save_checkpoint=false")
    return curve(out)


@pytest.mark.dist
@pytest.mark.parametrize("setting", ["selective", "full-uniform"])
def test_recompute_keeps_every_loss_and_grad_norm_at_pp2(tokenized_dir, pp2_reference, tmp_path, setting):
    two_processes(tokenized_dir, tmp_path, "--pp", "2", "--iters", "3", "--set", "train.save_checkpoint=false",
                  *set_flags(RECOMPUTE[setting]))
    assert_same_curve(curve(tmp_path), pp2_reference)


@pytest.mark.e2e  # two fresh processes with 8 layers at sequence 1024: about a minute on 2 idle cores
def test_full_recompute_lowers_the_peak_memory_of_a_step():
    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    from recompute_memory import measure

    none, full = (measure(setting, iters=1) for setting in ("none", "full"))  # the benchmark's shape, 1 step
    print(f"step peak growth: no recompute {none['step_growth_mb']:.0f} MB, full {full['step_growth_mb']:.0f} MB")
    assert full["final_train_loss"] == pytest.approx(none["final_train_loss"], rel=1e-6)
    assert full["step_growth_mb"] < 0.6 * none["step_growth_mb"]


# --------------------------------------------------------------------------- overlap: same numbers (gloo)
OVERLAP = ["--set", "parallel.overlap_grad_reduce=true", "--set", "parallel.overlap_param_gather=true",
           "--set", "parallel.bucket_size=4000"]  # several buckets: reductions and gathers really interleave


@pytest.mark.dist
def test_overlapped_grad_reduce_and_param_gather_keep_the_curve_and_checkpoints_at_dp2(tokenized_dir, tmp_path):
    """DP=2 with the distributed optimizer on gloo: megatron-core's async reduce-scatter / all-gather run there.
    A run stopped after 2 iterations and resumed checks that a save gathers the parameters the optimizer updated."""
    two_processes(tokenized_dir, tmp_path / "plain", "--distopt", "--set", "train.save_checkpoint=false")
    expected = curve(tmp_path / "plain")
    summary = two_processes(tokenized_dir, tmp_path / "overlap", "--distopt", *OVERLAP, "--set",
                            "train.save_checkpoint=false")
    assert summary["parallel"]["data_parallel_size"] == 2
    assert_same_curve(curve(tmp_path / "overlap"), expected)
    two_processes(tokenized_dir, tmp_path / "resumed", "--distopt", *OVERLAP, "--stop-at", "2")
    resumed = two_processes(tokenized_dir, tmp_path / "resumed", "--distopt", *OVERLAP)
    assert resumed["resumed_from_iteration"] == 2
    assert_same_curve(curve(tmp_path / "resumed"), expected)


# ----------------------------------------------------------------------------------------- examples
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name, connections", [("llama3-8b-cpt.yaml", "32"), ("llama3-70b-cpt.yaml", "1")])
def test_the_large_examples_pass_the_gpu_rules_and_name_their_process_environment(name, connections):
    from megatron_ipt.config import load_config
    from megatron_ipt.training.presets import resolve_preset

    cfg = load_config(EXAMPLES / name)
    cfg.model.hf_config = None  # the converted model's folder exists only on the cluster
    cfg.model.preset = name.split("-cpt")[0]
    layers = resolve_preset(cfg.model).num_layers
    assert scale.problems(cfg, num_layers=layers, device_type="cuda", te_available=True) == []
    on_cpu = scale.problems(cfg, num_layers=layers, device_type="cpu", te_available=False)
    assert on_cpu == ([] if connections == "32" else  # the 70B layout's userbuffers need CUDA + TE
                      ["parallel.tp_comm_overlap needs CUDA GPUs with Transformer Engine (userbuffers); set it to false"])
    from megatron_ipt.launch.plan import process_environment

    env = process_environment(cfg)
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == connections and env["NVTE_FWD_LAYERNORM_SM_MARGIN"] == "16"


def test_the_launch_plan_applies_set_overrides_to_the_environment(capsys):
    from megatron_ipt.launch import plan

    plan.main([str(EXAMPLES / "llama3-8b-cpt.yaml"), "--set", "parallel.tensor_model_parallel_size=2", "--resume"])
    records = capsys.readouterr().out.split("\0")
    assert "env.CUDA_DEVICE_MAX_CONNECTIONS=1" in records and "env.TORCH_NCCL_AVOID_RECORD_STREAMS=1" in records
