"""The CPU backend redirects CUDA requests to CPU while active and leaves stock torch behind after."""

from __future__ import annotations

import pytest
import torch

from megatron_ipt.training import cpu_backend

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU backend is for CPU-only machines")


@pytest.fixture(autouse=True)
def _always_deactivated():
    yield
    cpu_backend.deactivate()


def test_cuda_device_requests_become_cpu_inside():
    with cpu_backend.cpu_backend():
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
        assert torch.ones(2).cuda().device.type == "cpu"
        assert torch.ones(2).to("cuda:0").device.type == "cpu"
        assert torch.ones(2).to(device=torch.device("cuda")).device.type == "cpu"


def test_type_strings_report_cuda_inside():
    with cpu_backend.cpu_backend():
        assert torch.ones(2).type() == "torch.cuda.FloatTensor"
        assert torch.ones(2).type("torch.cuda.DoubleTensor").dtype == torch.float64


def test_code_run_by_the_autograd_engine_is_rewritten_too():
    seen = []
    with cpu_backend.cpu_backend():
        w = torch.ones(2, requires_grad=True)
        w.register_hook(lambda g: seen.append(torch.zeros(1, device="cuda").device.type) or g)
        (w * 2).sum().backward()
    assert seen == ["cpu"]


def test_cuda_rng_is_the_cpu_generator_inside():
    with cpu_backend.cpu_backend():
        torch.cuda.manual_seed(7)
        state = torch.cuda.get_rng_state()
        a = torch.rand(3)
        torch.cuda.set_rng_state(state)
        assert torch.equal(a, torch.rand(3))
        torch.manual_seed(7)  # routes through torch.cuda.manual_seed_all without recursing
        assert torch.equal(a, torch.rand(3))


def test_streams_events_and_synchronize_are_null_inside():
    with cpu_backend.cpu_backend():
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            torch.cuda.current_stream().wait_stream(stream)
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        assert event.elapsed_time(event) == 0.0


def test_deactivate_restores_stock_torch():
    originals = {name: getattr(torch.cuda, name) for name in ("current_device", "get_rng_state", "manual_seed", "Stream", "synchronize")}
    engine = torch.autograd.graph._engine_run_backward
    cpu_backend.activate()
    assert cpu_backend.is_active()
    cpu_backend.deactivate()
    assert not cpu_backend.is_active()
    for name, fn in originals.items():
        assert getattr(torch.cuda, name) is fn, name
    assert torch.autograd.graph._engine_run_backward is engine
    assert torch.autograd._engine_run_backward is engine
    assert not torch.overrides._get_current_function_mode_stack()
    assert torch.ones(2).type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_activate_is_idempotent_and_one_deactivate_undoes_it():
    cpu_backend.activate()
    cpu_backend.activate()
    assert len(torch.overrides._get_current_function_mode_stack()) == 1
    cpu_backend.deactivate()
    assert not torch.overrides._get_current_function_mode_stack()


def test_suspended_pops_the_mode_for_the_block_only():
    with cpu_backend.cpu_backend():
        with cpu_backend.suspended() as popped:
            assert popped
            assert not torch.overrides._get_current_function_mode_stack()
            assert torch.ones(2).type() == "torch.FloatTensor"  # stock torch inside
            assert torch.cuda.current_device() == 0  # the replaced attributes stay
            with pytest.raises((AssertionError, RuntimeError)):
                torch.zeros(1, device="cuda")
        assert torch.zeros(2, device="cuda").device.type == "cpu"  # the mode is back
        with pytest.raises(ValueError, match="inside"):  # pushed back after an exception too
            with cpu_backend.suspended():
                raise ValueError("inside")
        assert torch.ones(2).type() == "torch.cuda.FloatTensor"


def test_suspended_does_nothing_when_inactive_or_not_innermost():
    with cpu_backend.suspended() as popped:
        assert not popped
    with cpu_backend.cpu_backend():
        with _Passthrough():  # another mode on top of ours
            with cpu_backend.suspended() as popped:
                assert not popped
                assert len(torch.overrides._get_current_function_mode_stack()) == 2


class _Passthrough(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))
