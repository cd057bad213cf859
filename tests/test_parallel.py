"""Parallel layout checks, presets, and process-group setup/teardown in one process."""

from __future__ import annotations

import pytest
import torch

from megatron_ipt.training import parallel
from megatron_ipt.config import ModelConfig, ParallelConfig
from megatron_ipt.training.presets import PRESETS, padded_vocab_size, resolve_preset


def layout(tp=1, pp=1, world=1, mb=4, gb=8, layers=4, heads=4, groups=2):
    return parallel.check_layout(
        ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
        world_size=world, micro_batch_size=mb, global_batch_size=gb,
        num_layers=layers, num_attention_heads=heads, num_query_groups=groups,
    )


def test_data_parallel_size_and_microbatches_are_derived():
    got = layout(tp=2, pp=2, world=8, mb=2, gb=16)
    assert (got.data_parallel_size, got.num_microbatches) == (2, 4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(tp=2, world=3), "world size 3 is not divisible by tensor_model_parallel_size 2 * pipeline_model_parallel_size 1 = 2"),
    (dict(world=2, mb=4, gb=12), "global_batch_size 12 is not divisible by micro_batch_size 4 * data parallel size 2 = 8"),
    (dict(pp=2, world=2, layers=3), "num_layers 3 is not divisible by pipeline_model_parallel_size 2"),
    (dict(tp=4, world=4, heads=6, groups=6), "num_attention_heads 6 is not divisible by tensor_model_parallel_size 4"),
    (dict(tp=2, world=2, heads=4, groups=1), "num_query_groups 1 is not divisible by tensor_model_parallel_size 2"),
])
def test_layout_errors_name_the_numbers(kwargs, message):
    with pytest.raises(parallel.ParallelLayoutError) as err:
        layout(**kwargs)
    assert message in str(err.value)


def test_every_broken_rule_is_reported_at_once():
    with pytest.raises(parallel.ParallelLayoutError) as err:
        layout(tp=2, pp=2, world=4, layers=3, heads=4, groups=1, gb=3)
    assert str(err.value).count("\n") == 3


def test_vocabulary_is_padded_to_128_times_tp():
    assert padded_vocab_size(49152, 1) == 49152
    assert padded_vocab_size(250, 2) == 256
    assert padded_vocab_size(128257, 8) == 129024


def test_model_overrides_apply_on_top_of_the_preset():
    preset = resolve_preset(ModelConfig(preset="llama3-8b", num_layers=2))
    assert (preset.num_layers, preset.hidden_size, preset.num_query_groups) == (2, 4096, 8)
    assert PRESETS["qwen2.5-7b"].add_qkv_bias and not PRESETS["llama3-70b"].add_qkv_bias


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="llama-tiny"):
        resolve_preset(ModelConfig(preset="gpt-5"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU path")
def test_setup_and_teardown_can_repeat_in_one_process():
    from megatron.core import parallel_state

    from megatron_ipt.training.cpu_backend import cpu_backend

    for _ in range(2):
        with cpu_backend():
            got = parallel.setup(ParallelConfig(), torch.device("cpu"), micro_batch_size=2, global_batch_size=4,
                                 num_layers=2, num_attention_heads=4, num_query_groups=2, seed=1)
            assert got.num_microbatches == 2 and parallel_state.model_parallel_is_initialized()
            parallel.teardown()
        assert not torch.distributed.is_initialized()


def test_a_layout_error_leaves_no_process_group_behind():
    with pytest.raises(parallel.ParallelLayoutError):
        parallel.setup(ParallelConfig(tensor_model_parallel_size=2), torch.device("cpu"), micro_batch_size=2,
                       global_batch_size=4, num_layers=2, num_attention_heads=4, num_query_groups=2, seed=1)
    assert not torch.distributed.is_initialized()


def test_relaunch_only_when_several_processes_and_not_under_torchrun(monkeypatch):
    from megatron_ipt.launch import torchrun as launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert launch.needs_relaunch(2) and not launch.needs_relaunch(1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not launch.needs_relaunch(2)
    cmd = launch.torchrun_command(["-m", "megatron_ipt.cli", "train"], 2, python="python")
    assert cmd == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "megatron_ipt.cli", "train"]


def layout_with(world=8, layers=8, seq=256, experts=None, expert_ffn=96, **parallel_fields):
    global_batch = parallel_fields.pop("global_batch", 16)
    return parallel.check_layout(
        ParallelConfig(**parallel_fields), world_size=world, micro_batch_size=1, global_batch_size=global_batch,
        num_layers=layers, num_attention_heads=8, num_query_groups=4, seq_length=seq, num_moe_experts=experts,
        moe_ffn_hidden_size=expert_ffn if experts else None,
    )


def test_expert_parallel_shares_the_data_parallel_ranks():
    got = layout_with(world=8, experts=8, tensor_model_parallel_size=2, expert_model_parallel_size=4,
                      sequence_parallel=True)
    assert (got.data_parallel_size, got.expert_model_parallel_size) == (4, 4)
    # expert tensor parallel defaults to TP (megatron-core's default); the rest of the world is expert data parallel
    assert (got.expert_tensor_parallel_size, got.expert_data_parallel_size) == (2, 1)


def test_expert_tensor_parallel_takes_its_share_of_the_expert_ranks():
    got = layout_with(world=8, experts=8, tensor_model_parallel_size=2, sequence_parallel=True,
                      expert_model_parallel_size=2, expert_tensor_parallel_size=1)
    assert (got.data_parallel_size, got.expert_tensor_parallel_size, got.expert_data_parallel_size) == (4, 1, 4)
    got = layout_with(world=8, experts=8, expert_model_parallel_size=2, expert_tensor_parallel_size=4)
    assert (got.data_parallel_size, got.expert_tensor_parallel_size, got.expert_data_parallel_size) == (8, 4, 1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(expert_model_parallel_size=2), "expert_model_parallel_size 2 needs a mixture-of-experts model"),
    (dict(experts=6, expert_model_parallel_size=4), "number of experts 6 is not divisible by expert_model_parallel_size 4"),
    (dict(world=8, experts=8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2, expert_model_parallel_size=4,
          sequence_parallel=True),
     "world size 8 is not divisible by expert_tensor_parallel_size 2 * expert_model_parallel_size 4 * "
     "pipeline_model_parallel_size 2 = 16"),
    (dict(expert_tensor_parallel_size=2), "expert_tensor_parallel_size 2 needs a mixture-of-experts model"),
    (dict(world=8, experts=8, expert_model_parallel_size=2, expert_tensor_parallel_size=8),
     "world size 8 is not divisible by expert_tensor_parallel_size 8 * expert_model_parallel_size 2 * "
     "pipeline_model_parallel_size 1 = 16"),
    (dict(experts=8, expert_tensor_parallel_size=2), "expert_tensor_parallel_size 2 other than "
     "tensor_model_parallel_size 1 needs expert_model_parallel_size > 1"),
    (dict(experts=8, expert_ffn=90, expert_tensor_parallel_size=4, expert_model_parallel_size=2), "expert inner size 90 is not divisible by "
     "expert_tensor_parallel_size 4"),
    (dict(world=12, experts=8, expert_model_parallel_size=8, global_batch=12),
     "world size 12 is not divisible by expert_tensor_parallel_size 1 * expert_model_parallel_size 8"),
    (dict(experts=8, tensor_model_parallel_size=2), "tensor_model_parallel_size 2 with a mixture-of-experts model "
     "needs sequence_parallel true"),
])
def test_expert_parallel_errors_name_the_numbers(kwargs, message):
    with pytest.raises(parallel.ParallelLayoutError) as err:
        layout_with(**kwargs)
    assert message in str(err.value)


def test_context_parallel_takes_its_share_of_the_world():
    got = layout_with(world=16, tensor_model_parallel_size=2, pipeline_model_parallel_size=2, context_parallel_size=2)
    assert (got.data_parallel_size, got.num_microbatches, got.context_parallel_size) == (2, 8, 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(world=6, tensor_model_parallel_size=2, context_parallel_size=2),
     "world size 6 is not divisible by tensor_model_parallel_size 2 * pipeline_model_parallel_size 1 * context_parallel_size 2 = 4"),
    (dict(seq=100, context_parallel_size=4), "seq_length 100 is not divisible by 2 * context_parallel_size 4 = 8"),
    (dict(virtual_pipeline_model_parallel_size=2), "virtual_pipeline_model_parallel_size 2 needs pipeline_model_parallel_size >= 2 (is 1)"),
    (dict(layers=12, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=4),
     "num_layers 12 is not divisible by pipeline_model_parallel_size 2 * virtual_pipeline_model_parallel_size 4 = 8"),
    (dict(world=4, pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=2, layers=16,
          tensor_model_parallel_size=1, global_batch=6),
     "virtual_pipeline_model_parallel_size 2: micro-batches per iteration 6 (global_batch_size 6 / (micro_batch_size 1 "
     "* data parallel size 1)) is not divisible by pipeline_model_parallel_size 4"),
    (dict(sequence_parallel=True), "sequence_parallel needs tensor_model_parallel_size >= 2 (is 1)"),
    (dict(seq=255, sequence_parallel=True, tensor_model_parallel_size=2),
     "sequence_parallel: seq_length 255 is not divisible by tensor_model_parallel_size 2"),
])
def test_vpp_cp_sp_errors_name_the_numbers(kwargs, message):
    with pytest.raises(parallel.ParallelLayoutError) as err:
        layout_with(**kwargs)
    assert message in str(err.value)


def test_cp_sp_need_cuda_before_groups_are_built_and_vpp_runs_anywhere():
    got = layout_with(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, context_parallel_size=2,
                      sequence_parallel=True)
    parallel.check_runnable(got, "cuda")  # GPU: runnable
    with pytest.raises(parallel.ParallelLayoutError) as err:
        parallel.check_runnable(got, "cpu")
    assert "context_parallel_size 2 needs CUDA" in str(err.value) and "sequence_parallel runs on CUDA" in str(err.value)
    vpp = layout_with(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    parallel.check_runnable(vpp, "cpu")  # interleaved schedule: trained on CPU by tests/test_train.py
    with pytest.raises(parallel.ParallelLayoutError, match="context_parallel_size 2"):
        parallel.setup(ParallelConfig(context_parallel_size=2), torch.device("cpu"), micro_batch_size=1,
                       global_batch_size=1, num_layers=2, num_attention_heads=4, num_query_groups=2, seed=1)
    assert not torch.distributed.is_initialized()


def test_vpp_cp_sp_map_into_a_real_transformer_config():
    from megatron_ipt.training.model import transformer_config

    got = layout_with(world=16, tensor_model_parallel_size=2, pipeline_model_parallel_size=2, context_parallel_size=2,
                      virtual_pipeline_model_parallel_size=2, sequence_parallel=True)
    config = transformer_config(resolve_preset(ModelConfig(preset="llama-test")), got, device=torch.device("cpu"),
                                precision="bf16")
    assert (config.tensor_model_parallel_size, config.pipeline_model_parallel_size, config.context_parallel_size,
            config.virtual_pipeline_model_parallel_size, config.sequence_parallel) == (2, 2, 2, 2, True)
