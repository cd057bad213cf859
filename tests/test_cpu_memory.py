"""``reuse_freed_memory`` (megatron_ipt/training/cpu_memory.py) on the real glibc allocator, observed through
``mallinfo2``: inside it a large tensor comes from the heap (not an mmap of its own, as glibc serves it by
default) and its memory stays there for the next allocations; on exit the kept memory is returned. CPU training runs inside it."""

from __future__ import annotations

import ctypes

import pytest
import torch

from megatron_ipt.training import cpu_memory

libc = cpu_memory.glibc()
pytestmark = pytest.mark.skipif(libc is None or not hasattr(libc, "mallinfo2"), reason="glibc >= 2.33 only")
MIB = 1 << 20
SIZE = 96 * MIB  # above glibc's largest dynamic mmap threshold (32 MiB)


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def mallinfo() -> MallInfo2:
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2()


def resident() -> int:
    """Resident bytes of this process (``/proc/self/statm``)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def big_tensor() -> torch.Tensor:
    return torch.empty(SIZE // 4, dtype=torch.float32).fill_(1.0)


def test_inside_large_tensors_come_from_the_heap_and_stay_there_until_exit():
    with cpu_memory.reuse_freed_memory() as tuned:
        assert tuned
        mmapped = mallinfo().hblkhd
        t = big_tensor()
        assert mallinfo().hblkhd < mmapped + SIZE  # not an mmap of its own
        del t
        assert mallinfo().fordblks >= SIZE  # freed, kept in the heap for the next allocations
        kept = resident()
    assert resident() < kept - SIZE // 2  # returned to the system on exit (malloc_trim)


def test_after_exit_blocks_under_32_mib_are_not_mmapped():
    """Setting glibc's thresholds turns its dynamic ones off for good: on exit the mmap threshold is left at 32 MiB
    (where the dynamic one ends up), not at the static 128 KiB default that would mmap every block above it."""
    with cpu_memory.reuse_freed_memory():
        pass
    before = mallinfo().hblkhd
    t = torch.empty(8 * MIB // 4).fill_(1.0)
    assert mallinfo().hblkhd < before + 8 * MIB
    del t


def test_disabled_changes_nothing():
    with cpu_memory.reuse_freed_memory(enabled=False) as tuned:
        assert not tuned


def test_cpu_training_runs_inside_it():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from train_fixtures import tiny_config

    from megatron_ipt.training.train import on_training_device

    def run(cfg, device):
        before = mallinfo().hblkhd
        t = big_tensor()
        return {"mmapped": mallinfo().hblkhd - before, "numel": t.numel()}

    assert on_training_device(tiny_config(), run)["mmapped"] < SIZE
