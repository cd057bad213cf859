"""Checks run by ``ipt run`` / ``ipt STAGE`` before the first stage starts: what can be known to fail later.

Each check is a plain function of the resolved config returning one line naming the key and what to write instead,
or None. :func:`problems` runs the ones that apply to the stages about to run (the corpus stage's inputs only while
it has not finished: it keeps what it read); :func:`check` raises :class:`PreflightError` with one line per problem
(the ``ipt`` command prints each and exits with status 2).

- names that resolve: ``synthesis.model`` (an existing folder or a known name), ``tokenize.tokenizer`` (an existing
  file or folder; a ``synthesis.model`` name there gets a hint), ``model.preset`` / ``model.hf_config``;
- files and folders that exist: ``corpus.paths``, ``format.general_instructions``, ``train.init_from``,
  ``blend.extra`` prefixes, ``sft.data``, ``sft.init_from``, ``sft.tokenizer``;
- the device: ``train.device`` / ``synthesis.device`` = cuda without a GPU, ``synthesis.engine`` = vllm without vllm;
- resources (``resources=True``; ``--no-resource-check`` turns them off): ``parallel.nproc_per_node`` more than this
  machine's GPUs (cuda) or CPU cores (cpu), and on CPU the memory estimate of ``ipt plan``
  (:mod:`megatron_ipt.training.plan`, per process times ``nproc_per_node``) above the memory available
  (``MemAvailable`` of /proc/meminfo, or the cgroup's limit when lower).

Importing this module is light; torch is imported only when a training stage's device is checked.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from megatron_ipt.config import ExperimentConfig
from megatron_ipt.errors import IptError

GB = 1e9


class PreflightError(IptError):
    """One or more inputs of the stages about to run are known to fail; one line per problem."""


def _exists(path: str) -> bool:
    return Path(path).expanduser().exists()


def _matches(pattern: str) -> bool:
    return bool(glob.glob(os.path.expanduser(pattern), recursive=True))


# ------------------------------------------------------------------------------------------ names and paths
def synthesis_model_problem(cfg: ExperimentConfig) -> str | None:
    """``synthesis.model``: an existing Hugging Face folder (with config.json) or a known name."""
    from data_prep.models import KNOWN_MODELS

    name = cfg.synthesis.model
    path = Path(name).expanduser()
    if path.is_dir():
        return None if (path / "config.json").is_file() else f"synthesis.model = {name!r}: the folder has no config.json"
    if name in KNOWN_MODELS:
        return None
    return (f"synthesis.model = {name!r}: no such folder and not a known name; give a Hugging Face model folder or "
            f"one of: {', '.join(KNOWN_MODELS)}")


def tokenizer_problem(cfg: ExperimentConfig) -> str | None:
    """``tokenize.tokenizer``: an existing file or folder; unset, the synthesizer's (``synthesis.model``) must
    resolve. A ``synthesis.model`` name (e.g. ``smollm2-135m-instruct``) is no tokenizer path: the line says what
    to write."""
    from data_prep.models import KNOWN_MODELS, cache_dir

    name = cfg.tokenize.tokenizer
    if name is None:
        return synthesis_model_problem(cfg)  # the default tokenizer is the synthesizer's
    if _exists(name):
        return None
    if name in KNOWN_MODELS:
        if cfg.synthesis.model == name:
            fix = "leave tokenize.tokenizer unset (the default is the synthesizer's tokenizer)"
        else:
            fix = f"give the folder it is converted to: tokenize.tokenizer={cache_dir() / 'models' / name}"
        return f"tokenize.tokenizer = {name!r} is a synthesis.model name, not a tokenizer file or folder: {fix}"
    return (f"tokenize.tokenizer = {name!r}: no such file or folder (give a Hugging Face folder, a tokenizer.json, a "
            "sentencepiece .model or a tiktoken BPE file)")


def corpus_problems(cfg: ExperimentConfig) -> list[str]:
    """``corpus.paths``: each matches a file or folder (not read for ``pydoc_topics``)."""
    c = cfg.corpus
    if c.source == "pydoc_topics":
        return []
    if not c.paths:
        return [f"corpus.paths is empty: corpus.source = {c.source!r} needs files, folders or globs"]
    return [f"corpus.paths: {p!r} matches no file or folder" for p in c.paths if not _matches(p)]


def format_problems(cfg: ExperimentConfig) -> list[str]:
    g = cfg.format.general_instructions
    return [f"format.general_instructions = {g!r}: no such file"] if g and not Path(g).expanduser().is_file() else []


def checkpoint_problem(path: str | None, key: str) -> str | None:
    """A torch_dist checkpoint folder: a checkpoints folder with ``latest`` or a folder with ``metadata.json``."""
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.is_dir():
        return f"{key} = {path!r}: no such folder"
    if not ((p / "latest").is_file() or (p / "metadata.json").is_file()):
        return f"{key} = {path!r}: not a torch_dist checkpoint (no 'latest' file and no metadata.json)"
    return None


def model_problem(cfg: ExperimentConfig) -> str | None:
    """``model.hf_config`` is an existing folder or config.json; ``model.preset`` and its overrides resolve."""
    from megatron_ipt.training.presets import resolve_preset

    hf = cfg.model.hf_config
    if hf and not _exists(hf):
        return f"model.hf_config = {hf!r}: no such folder or file (a Hugging Face model folder or its config.json)"
    if hf and Path(hf).expanduser().is_dir() and not (Path(hf).expanduser() / "config.json").is_file():
        return f"model.hf_config = {hf!r}: the folder has no config.json"
    try:
        resolve_preset(cfg.model)
    except (IptError, OSError, ValueError, KeyError) as err:
        return str(err).splitlines()[0]
    return None


def train_input_problems(cfg: ExperimentConfig) -> list[str]:
    """The model, ``train.init_from`` (unless the run resumes its own checkpoint) and ``blend.extra`` prefixes."""
    found = [model_problem(cfg)]
    own = cfg.run_path / "train" / "checkpoints" / "latest"
    if not own.is_file():
        found.append(checkpoint_problem(cfg.train.init_from, "train.init_from"))
    for i, c in enumerate(cfg.blend.extra):
        for key, prefix in ((f"blend.extra[{i}].prefix", c.prefix), (f"blend.extra[{i}].valid_prefix", c.valid_prefix)):
            missing = [f"{prefix}{s}" for s in (".bin", ".idx") if prefix and not Path(f"{prefix}{s}").is_file()]
            if missing:
                found.append(f"{key} = {prefix!r}: indexed dataset file missing: {missing[0]}")
    return [p for p in found if p]


def sft_input_problems(cfg: ExperimentConfig) -> list[str]:
    s = cfg.sft
    found = [model_problem(cfg), checkpoint_problem(s.init_from, "sft.init_from")]
    found += [f"sft.data: {p!r} matches no file" for p in s.data if not _matches(p)]
    found += [f"sft.valid_data: {p!r} matches no file" for p in s.valid_data if not _matches(p)]
    if s.tokenizer and not _exists(s.tokenizer):
        found.append(f"sft.tokenizer = {s.tokenizer!r}: no such file or folder")
    elif not s.tokenizer:
        found.append(tokenizer_problem(cfg))
    return [p for p in found if p]


# ------------------------------------------------------------------------------------------ device and resources
def device_problem(requested: str, key: str) -> str | None:
    """``cuda`` without a GPU torch can see."""
    if requested != "cuda":
        return None
    import torch

    return None if torch.cuda.is_available() else f"{key} = 'cuda' but torch sees no GPU here (torch.cuda.is_available() " \
                                                  "is False); use cpu or auto"


def synthesis_device_problems(cfg: ExperimentConfig) -> list[str]:
    import importlib.util

    s = cfg.synthesis
    if s.engine == "vllm":
        return [] if importlib.util.find_spec("vllm") else ["synthesis.engine = 'vllm' but vllm is not installed here"]
    return [p for p in [device_problem(s.device, "synthesis.device")] if p]


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def available_memory_bytes() -> int | None:
    """Memory available to new processes: ``MemAvailable`` of /proc/meminfo, lowered to the cgroup v2 limit left
    (``memory.max - memory.current``) where one is set; None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _training_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def nproc_problem(cfg: ExperimentConfig, device: str) -> str | None:
    """``parallel.nproc_per_node`` more than this machine's GPUs (cuda) or CPU cores (cpu)."""
    n = cfg.parallel.nproc_per_node
    if n <= 1:
        return None
    if device == "cuda":
        import torch

        have, what = torch.cuda.device_count(), "GPUs"
    else:
        have, what = cpu_cores(), "CPU cores available to this process"
    if n <= have:
        return None
    return (f"parallel.nproc_per_node = {n} but this machine has {have} {what}; set it to at most {have}"
            + (" (or pass --no-resource-check to start them anyway)" if device == "cpu" else ""))


def memory_problem(cfg: ExperimentConfig, device: str) -> str | None:
    """On CPU: ``ipt plan``'s estimate (bytes of one process, times ``nproc_per_node``: they share this machine's
    memory) above :func:`available_memory_bytes`. The estimate leaves out the processes' own overhead (about
    1 GB each), so a refusal is never a false alarm of the model's size."""
    if device != "cpu":
        return None
    available = available_memory_bytes()
    if available is None:
        return None
    from megatron_ipt.training import plan
    from megatron_ipt.training.presets import padded_vocab_size, resolve_preset

    try:
        preset = resolve_preset(cfg.model)
    except (IptError, OSError, ValueError, KeyError):
        return None  # model_problem reports it
    n = cfg.parallel.nproc_per_node
    vocab = padded_vocab_size(_vocab_size(cfg, preset.vocab_size), cfg.parallel.tensor_model_parallel_size)
    try:
        per_process = plan.estimate(cfg, preset, world_size=n, vocab_size=vocab, fused_attention=False).total_bytes
    except (ArithmeticError, ValueError):
        return None  # a layout that does not divide: the stage's own layout check names it
    need = per_process * n
    if need <= available:
        return None
    return (f"model.preset = {cfg.model.preset!r}{' (model.hf_config)' if cfg.model.hf_config else ''}: training on "
            f"CPU needs about {need / GB:.1f} GB ({n} process(es) x {per_process / GB:.1f} GB: weights, gradients, "
            f"optimizer, activations; ipt plan) but {available / GB:.1f} GB is available here; use a smaller model, "
            "micro_batch_size or seq_length, or pass --no-resource-check to start anyway")


def _vocab_size(cfg: ExperimentConfig, preset_vocab: int) -> int:
    """The tokenize manifest's vocabulary when the stage finished (what the trainer uses), else the preset's."""
    import json

    try:
        tok = json.loads((cfg.run_path / "tokenized" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
        return max(int(tok), preset_vocab) if cfg.model.hf_config else int(tok)
    except (OSError, ValueError, KeyError, TypeError):
        return preset_vocab


def training_problems(cfg: ExperimentConfig, key: str, *, resources: bool) -> list[str]:
    """Device, then (``resources``) processes and memory, of a training stage (``key``: train.device)."""
    problem = device_problem(cfg.train.device, key)
    if problem:
        return [problem]
    if not resources:
        return []
    device = _training_device(cfg.train.device)
    return [p for p in (nproc_problem(cfg, device), memory_problem(cfg, device)) if p]


# ------------------------------------------------------------------------------------------ entry
def _sft_view(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config as the sft stage trains it (its batch sizes where set)."""
    view = cfg.model_copy(deep=True)
    if cfg.sft.micro_batch_size:
        view.train.micro_batch_size = cfg.sft.micro_batch_size
    if cfg.sft.global_batch_size:
        view.train.global_batch_size = cfg.sft.global_batch_size
    return view


def problems(cfg: ExperimentConfig, stages: list[str], *, force: bool = False, resources: bool = True) -> list[str]:
    """One line per problem of the ``stages`` about to run (pipeline stage names, or ``sft``). ``corpus.paths`` are
    not checked once the corpus stage finished (unless ``force``): it keeps using what it wrote when its inputs are
    gone."""
    from megatron_ipt.pipeline import stage_path

    found: list[str] = []
    for stage in stages:
        if stage == "corpus" and (force or not (stage_path(cfg, stage) / "manifest.json").is_file()):
            found += corpus_problems(cfg)
        elif stage == "synthesize":
            found += [p for p in [synthesis_model_problem(cfg)] if p] + synthesis_device_problems(cfg)
        elif stage == "format":
            found += format_problems(cfg)
        elif stage == "tokenize":
            found += [p for p in [tokenizer_problem(cfg)] if p]
        elif stage == "train":
            found += train_input_problems(cfg) + training_problems(cfg, "train.device", resources=resources)
        elif stage == "sft":
            found += sft_input_problems(cfg) + training_problems(_sft_view(cfg), "train.device", resources=resources)
    return list(dict.fromkeys(found))  # one line per problem, in order


def check(cfg: ExperimentConfig, stages: list[str], *, force: bool = False, resources: bool = True) -> None:
    """Raise :class:`PreflightError` (one line per problem) when :func:`problems` finds any."""
    found = problems(cfg, stages, force=force, resources=resources)
    if found:
        raise PreflightError("\n".join(found))
