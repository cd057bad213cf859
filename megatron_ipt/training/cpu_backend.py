"""CPU backend: let megatron-core's CUDA-assuming code run, unchanged, on a CPU-only machine.

megatron-core calls ``torch.cuda.current_device()``, passes ``device="cuda"`` literals, calls
``.cuda()``, asserts ``tensor.type() == "torch.cuda.FloatTensor"``, reads the CUDA RNG state and uses
CUDA streams and events in about a hundred files.
Rather than patching call sites, this module, while active:

- points ``torch.cuda.current_device`` at device index 0, and the CUDA RNG functions
  (``torch.cuda.get_rng_state``/``set_rng_state``/``manual_seed``/``manual_seed_all`` and megatron's
  ``tensor_parallel.random._get_cuda_rng_state``/``_set_cuda_rng_state``) at the CPU default generator;
- pushes a :class:`torch.overrides.TorchFunctionMode` that rewrites any cuda device argument
  (``device="cuda"``, ``device=0``, ``Tensor.to("cuda")``, ``Tensor.cuda()``) to CPU and makes
  ``Tensor.type()`` report ``torch.cuda.*`` type strings;
- re-enters that mode around the autograd engine (``torch.autograd.graph._engine_run_backward``),
  because torch pops function modes while ``Tensor.backward`` dispatches, so code run by the engine
  (DDP grad hooks, activation recompute) would otherwise escape the rewrite;
- replaces ``torch.cuda.Stream/Event/stream/current_stream/default_stream/synchronize/empty_cache/
  set_device`` by null stand-ins;
- binds ``megatron.core.transformer.moe.moe_utils.te_general_gemm`` to None where megatron-core 0.16.1 leaves
  it unbound without Transformer Engine (the MoE router then uses ``torch.mm``, as 0.17+ does).

Use it only when the run's device is CPU; the trainer never activates it on a GPU run.
:func:`deactivate` restores every attribute it replaced and pops the mode, so other code in the same
process (transformers generation, other tests) sees stock torch afterwards.

:func:`suspended` pops the mode for a block of code that names no cuda device (the mode's Python hook on every
torch call is about a quarter of the CPU of a small model's KV-cached decoding step).

The mode is per thread (torch's function-mode stack is thread local): activate it in the thread that
trains. State is kept in one private object of this module; ``activate`` is idempotent.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

from megatron_ipt.training import mcore

__all__ = ["activate", "deactivate", "is_active", "cpu_backend", "suspended", "CudaToCpuMode"]


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # a bare index means a CUDA device
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _cpu_if_cuda(device: Any) -> Any:
    return torch.device("cpu") if _is_cuda_device(device) else device


def _to_cpu_type_string(name: Any) -> Any:
    if isinstance(name, str) and name.startswith("torch.cuda."):
        return "torch." + name[len("torch.cuda."):]
    return name


class CudaToCpuMode(TorchFunctionMode):
    """A TorchFunctionMode that maps CUDA device requests to CPU and reports CUDA type strings.

    Rewrites: a ``device`` keyword naming cuda (string, ``torch.device`` or bare index) becomes
    ``cpu``; ``Tensor.to(cuda...)`` and ``Tensor.cuda(...)`` become no-op moves to CPU;
    ``Tensor.type()`` with no argument returns e.g. ``"torch.cuda.FloatTensor"`` (megatron asserts
    this), and ``Tensor.type("torch.cuda.X")`` converts to ``torch.X``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        if func is torch.Tensor.cuda:
            kwargs.pop("device", None)
            kwargs.pop("memory_format", None)
            return args[0].to(device="cpu", non_blocking=kwargs.get("non_blocking", False))
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _cpu_if_cuda(args[1]), *args[2:])
        elif func is torch.Tensor.type:
            if len(args) == 1 and not kwargs:
                name = func(*args)
                return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
            if len(args) > 1:
                args = (args[0], _to_cpu_type_string(args[1]), *args[2:])
            if "dtype" in kwargs:
                kwargs["dtype"] = _to_cpu_type_string(kwargs["dtype"])
        return func(*args, **kwargs)


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``: every method is a no-op; usable as a context manager."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> "_NullStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_event(self, *args: Any, **kwargs: Any) -> "_NullEvent":
        return _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _NullEvent:
    """Stand-in for ``torch.cuda.Event``: records nothing, elapsed time is 0 ms."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


def _cpu_get_rng_state(device: Any = "cuda", *args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.default_generator.get_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, *args: Any, **kwargs: Any) -> None:
    torch.default_generator.set_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    # Not torch.manual_seed: it calls torch.cuda.manual_seed_all, which would recurse into this.
    torch.default_generator.manual_seed(int(seed))


def _cpu_manual_seed_all(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _current_device() -> int:
    return 0


def _replacements() -> list[tuple[Any, str, Any]]:
    """(owner object, attribute, replacement) triples applied by :func:`activate`."""
    cuda = torch.cuda
    triples: list[tuple[Any, str, Any]] = [
        (cuda, "current_device", _current_device),
        (cuda, "set_device", lambda *a, **k: None),
        (cuda, "get_rng_state", _cpu_get_rng_state),
        (cuda, "set_rng_state", _cpu_set_rng_state),
        (cuda, "manual_seed", _cpu_manual_seed),
        (cuda, "manual_seed_all", _cpu_manual_seed_all),
        (cuda.random, "get_rng_state", _cpu_get_rng_state),
        (cuda.random, "set_rng_state", _cpu_set_rng_state),
        (cuda.random, "manual_seed", _cpu_manual_seed),
        (cuda.random, "manual_seed_all", _cpu_manual_seed_all),
        (cuda, "Stream", _NullStream),
        (cuda, "Event", _NullEvent),
        (cuda, "stream", lambda *a, **k: _NullStream()),
        (cuda, "current_stream", lambda *a, **k: _NullStream()),
        (cuda, "default_stream", lambda *a, **k: _NullStream()),
        (cuda, "synchronize", lambda *a, **k: None),
        (cuda, "empty_cache", lambda *a, **k: None),
    ]
    # megatron-core's own copies of the CUDA RNG accessors (imported by name elsewhere too).
    for module_name in mcore.CUDA_RNG_MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # an optional megatron module that does not import here
            continue
        for name, fn in (("_get_cuda_rng_state", _cpu_get_rng_state), ("_set_cuda_rng_state", _cpu_set_rng_state)):
            if hasattr(module, name):
                triples.append((module, name, fn))
    # 0.16.1's MoE router calls moe_utils.te_general_gemm, a name bound only when Transformer Engine imports
    # (0.17+ binds it to None without TE); None selects its torch.mm path
    try:
        moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    except Exception:
        moe_utils = None
    if moe_utils is not None and not hasattr(moe_utils, "te_general_gemm"):
        triples.append((moe_utils, "te_general_gemm", None))
    return triples


class _State:
    """What :func:`activate` changed, so that :func:`deactivate` can undo exactly that."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.saved: list[tuple[Any, str, Any]] = []
        self.mode: CudaToCpuMode | None = None
        self.thread: int | None = None


_STATE = _State()


def _build_dynamo_rule_map() -> None:
    """Let torch._dynamo index the real ``torch.cuda`` functions before they are replaced.

    Its rule map is built once per process (``functools.cache``) from the objects it finds under
    their names; built while our stand-ins are in place it would fail (or remember the stand-ins).
    megatron-core decorates functions with ``torch.compile`` at import time, which builds it.
    """
    try:
        from torch._dynamo import trace_rules

        trace_rules.get_torch_obj_rule_map()
    except Exception:  # dynamo unavailable: nothing to protect
        pass


def _mode_is_on_stack(mode: TorchFunctionMode) -> bool:
    stack = torch.overrides._get_current_function_mode_stack()
    return any(m is mode for m in stack)


def _engine_with_mode(engine_run_backward: Callable, mode: CudaToCpuMode) -> Callable:
    @functools.wraps(engine_run_backward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if _mode_is_on_stack(mode):
            return engine_run_backward(*args, **kwargs)
        with mode:
            return engine_run_backward(*args, **kwargs)

    return run


def is_active() -> bool:
    """True between :func:`activate` and :func:`deactivate`."""
    return _STATE.mode is not None


def activate() -> None:
    """Redirect CUDA calls to CPU for this process (idempotent; a second call does nothing).

    Mirrors nothing upstream: it is the stand-in for a GPU that megatron-core assumes. Must be undone
    with :func:`deactivate` from the same thread. Raises RuntimeError when a CUDA device is
    available (the CPU backend is for CPU runs only).
    """
    with _STATE.lock:
        if _STATE.mode is not None:
            return
        if torch.cuda.is_available():
            raise RuntimeError("cpu_backend.activate(): CUDA is available; the CPU backend is for CPU-only runs")
        _build_dynamo_rule_map()
        mode = CudaToCpuMode()
        triples = _replacements()
        engine = torch.autograd.graph._engine_run_backward
        wrapped_engine = _engine_with_mode(engine, mode)
        triples += [
            (torch.autograd.graph, "_engine_run_backward", wrapped_engine),
            (torch.autograd, "_engine_run_backward", wrapped_engine),
        ]
        saved = []
        for owner, name, replacement in triples:
            saved.append((owner, name, owner.__dict__.get(name, getattr(owner, name, None))))
            setattr(owner, name, replacement)
        mode.__enter__()
        _STATE.saved, _STATE.mode, _STATE.thread = saved, mode, threading.get_ident()


def deactivate() -> None:
    """Undo :func:`activate`: pop the function mode and restore every replaced attribute.

    Does nothing when not active. Raises RuntimeError if called from another thread than
    :func:`activate`, or if another function mode was pushed on top of ours and is still active.
    """
    with _STATE.lock:
        mode = _STATE.mode
        if mode is None:
            return
        if threading.get_ident() != _STATE.thread:
            raise RuntimeError("cpu_backend.deactivate() must be called from the thread that activated it")
        stack = torch.overrides._get_current_function_mode_stack()
        if not stack or stack[-1] is not mode:
            raise RuntimeError("cpu_backend.deactivate(): another TorchFunctionMode is active on top of the CPU backend")
        mode.__exit__(None, None, None)
        for owner, name, original in reversed(_STATE.saved):
            setattr(owner, name, original)
        _STATE.saved, _STATE.mode, _STATE.thread = [], None, None


@contextlib.contextmanager
def suspended() -> Iterator[bool]:
    """Context manager: pop the function mode for the block, push it back after (the replaced ``torch.cuda``
    attributes stay). Yields True when it popped the mode; False, doing nothing, when the backend is not active or
    the mode is not the innermost one of this thread (another thread's, or a mode pushed on top).

    Every torch call passes through the mode's Python ``__torch_function__`` while it is pushed: about a quarter
    of the CPU of a KV-cached decoding step of a small model. Code known to name no cuda device (megatron-core's
    decoding step once the prefill has allocated the cache) runs faster without it; inside the block a cuda
    device argument reaches stock torch again and fails ("Torch not compiled with CUDA enabled").
    """
    mode = _STATE.mode
    stack = torch.overrides._get_current_function_mode_stack()
    if mode is None or not stack or stack[-1] is not mode:
        yield False
        return
    mode.__exit__(None, None, None)
    try:
        yield True
    finally:
        mode.__enter__()


@contextlib.contextmanager
def cpu_backend(enabled: bool = True) -> Iterator[None]:
    """Context manager: :func:`activate` on entry (when ``enabled``), :func:`deactivate` on exit.

    Nested use is safe: only the outermost block that actually activated deactivates.
    """
    if not enabled or is_active():
        yield
        return
    activate()
    try:
        yield
    finally:
        deactivate()
