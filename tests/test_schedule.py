"""Learning-rate schedules through megatron-core's OptimizerParamScheduler (real scheduler, plain optimizer)."""

import math

import pytest
import torch

from megatron_ipt.training import mcore
from megatron_ipt.config import TrainConfig
from megatron_ipt.training.train import lr_schedule


def curve(**train) -> list[float]:
    t = TrainConfig(**train)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
    sched = mcore.param_scheduler(optimizer=opt, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, **lr_schedule(t),
                                  start_wd=0.0, end_wd=0.0, wd_incr_style="constant")
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(t.train_iters):
        sched.step(1)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs  # lrs[i]: the learning rate after i scheduler steps


COMMON = dict(train_iters=100, lr_warmup_iters=10, lr=1.0, min_lr=0.1)


def test_warmup_then_cosine():
    lrs = curve(**COMMON, lr_decay_style="cosine")
    assert lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (math.cos(math.pi * 0.5) + 1))
    assert lrs[100] == pytest.approx(0.1)


def test_wsd_is_stable_then_decays_over_the_last_fraction():
    lrs = curve(**COMMON, lr_decay_style="wsd", lr_wsd_decay_fraction=0.2, lr_wsd_decay_style="linear")
    assert lrs[5] == pytest.approx(0.5)
    assert all(lr == pytest.approx(1.0) for lr in lrs[10:81])  # stable until iteration 80
    assert lrs[90] == pytest.approx(0.55)  # halfway through the 20-iteration linear decay
    assert lrs[100] == pytest.approx(0.1)


def test_constant_after_warmup():
    lrs = curve(**COMMON, lr_decay_style="constant")
    assert lrs[5] == pytest.approx(0.5) and all(lr == pytest.approx(1.0) for lr in lrs[10:])
