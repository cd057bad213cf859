"""The training forward outside the CPU backend's function mode (megatron_ipt.training.step._model_forward): the
same losses as under the mode, and a forward that needs the mode is rerun with it (real megatron-core on CPU)."""

import json
import types
from pathlib import Path

import pytest
import torch
from train_fixtures import make_tokenized_dir, tiny_config

from megatron_ipt.training import cpu_backend, step
from megatron_ipt.training.train import train_stage


def _losses(tmp_path: Path, name: str) -> list[float]:
    tok = make_tokenized_dir(tmp_path / "tok", train_docs=200, heldout_docs=4)
    cfg = tiny_config(train_iters=4, eval_iters=1, log_interval=1, save_checkpoint=False)
    train_stage(cfg, tok, tmp_path / name, "bench")
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "iteration" in r]


def test_training_outside_the_mode_gives_the_losses_of_training_under_it(tmp_path, monkeypatch):
    suspended = []
    real = cpu_backend.suspended

    def counting():
        suspended.append(1)
        return real()

    monkeypatch.setattr(cpu_backend, "suspended", counting)
    fast = _losses(tmp_path, "fast")
    assert suspended, "no forward ran outside the mode"
    monkeypatch.setattr(step, "_forward_without_collectives", lambda model: False)  # every forward under the mode
    assert _losses(tmp_path, "under_mode") == fast


class _NamesCuda(torch.nn.Module):
    """A forward that allocates on ``torch.cuda.current_device()`` every time (as megatron-core's RoPE does once)."""

    config = types.SimpleNamespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)

    def forward(self, input_ids):
        return input_ids + torch.ones(input_ids.shape, device=torch.cuda.current_device())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where cuda is unavailable")
def test_a_forward_that_needs_the_mode_is_rerun_under_it_and_keeps_it():
    model, x = _NamesCuda(), torch.zeros(2)
    with cpu_backend.cpu_backend():
        outputs = [step._model_forward(model, {"input_ids": x}) for _ in range(3)]
    assert all(torch.equal(o, torch.ones(2)) for o in outputs)
    assert model.ipt_cpu_forward["needs_mode"]  # the second forward failed outside the mode; the third kept it
