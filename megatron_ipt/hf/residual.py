"""Instruction residuals: ``theta_cpt + alpha * (theta_instruct - theta_base)``, streamed.

After continually pre-training a base model on new (domain, instruction-augmented) data, adding the
difference between the instruct and the base model of the same release gives back instruction following
without instruction tuning (Jindal et al., *Balancing Continuous Pre-Training and Instruction Fine-Tuning*,
arXiv 2410.10739, §3: "instruction residual" = theta_instruct - theta_base, added to the CPT model with
weight 1.0; residuals port across bases of the same ancestor).

Everything is streamed row block by row block (``block_bytes``, 64 MiB by default) through
:mod:`megatron_ipt.hf.safetensors_stream`: shard boundaries may differ between the inputs, and peak memory is a
few blocks, not a model. Arithmetic is in float32; each output tensor is stored in the CPT model's dtype
(rounded once). The output folder is written under a temporary name (``.NAME.tmp-HOST-PID``) and put in place
when complete; ``--overwrite`` swaps an existing output out in one step.

Rules:
- the three inputs must have the same tensor names and shapes, else WeightsError naming the tensor;
- a vocabulary grown in the instruct model (more rows in ``embed_tokens`` / ``lm_head`` than the base, other
  dimensions equal; the CPT model must have the base's rows): the shared rows get the residual, the extra
  rows are the instruct model's own, and the grown tensors are reported;
- tied embeddings need nothing special: a tensor absent from all three is absent from the output;
- config, tokenizer, generation config and chat template come from the instruct model (they describe its
  vocabulary and chat format);
- a saved residual (``save_residual``) is a folder of the same shape holding ``instruct - base`` (float32 by
  default: exact for bf16 inputs; ``bfloat16`` halves the size at one extra rounding) with the instruct
  model's non-weight files, so it can be applied to several CPT models later (:func:`apply_residual`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from data_prep import atomic
from megatron_ipt.hf.safetensors_stream import (INDEX, ModelWeights, PlannedTensor, ShardedWriter, WeightsError,
                                             read_header, row_blocks)

RESIDUAL_MANIFEST = "residual_manifest.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ResidualReport:
    """What a residual run did: tensors written, grown vocabulary rows, dtype notes, sizes and speed."""

    output: str
    alpha: float
    tensors: int = 0
    grown: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> {"base_rows", "rows"}
    dtype_notes: list[str] = field(default_factory=list)
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    inputs: dict[str, dict] = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        """Input bytes read per second of wall time, in GB/s (1e9 bytes)."""
        return self.bytes_read / 1e9 / self.seconds if self.seconds else 0.0


def folder_fingerprint(weights: ModelWeights) -> dict:
    """A cheap fingerprint of a model folder: SHA-256 over every shard's safetensors header and size (names,
    dtypes, shapes, offsets), plus ``config.json``. It identifies the checkpoint's layout and file set, not
    every byte of its data: content hashing a 140 GB model would take longer than the residual itself."""
    h = hashlib.sha256()
    for path in weights.files:
        header, start = read_header(path)
        h.update(path.name.encode())
        h.update(json.dumps(header, sort_keys=True).encode())
        h.update(str(path.stat().st_size).encode())
    cfg = weights.folder / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    return {"path": str(weights.folder.resolve()), "header_sha256": h.hexdigest(), "files": len(weights.files),
            "bytes": weights.total_bytes()}


def _copy_model_files(src: Path, dst: Path) -> list[str]:
    """Copy the non-weight files (config, tokenizer, generation config, chat template) of a model folder."""
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name not in (INDEX, RESIDUAL_MANIFEST):
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied


def _check_same_tensors(ref: ModelWeights, other: ModelWeights, what: str) -> None:
    missing = [n for n in ref.names() if n not in other]
    extra = [n for n in other.names() if n not in ref]
    if missing or extra:
        name = (missing or extra)[0]
        where = f"missing from the {what} model" if missing else f"only in the {what} model"
        raise WeightsError(f"tensor {name} is {where} ({other.folder}); the models must share tensor names "
                           f"({len(missing)} missing, {len(extra)} extra)")


def _grown_rows(name: str, base, instruct, cpt) -> int | None:
    """Rows of the base when the instruct model's vocabulary grew this tensor; None when shapes match.
    Raises WeightsError for any other shape difference."""
    if base.shape == instruct.shape == cpt.shape:
        return None
    if (len(base.shape) >= 1 and base.shape == cpt.shape and len(instruct.shape) == len(base.shape)
            and instruct.shape[1:] == base.shape[1:] and instruct.shape[0] > base.shape[0]):
        return base.shape[0]
    raise WeightsError(f"tensor {name}: shapes differ (base {list(base.shape)}, instruct {list(instruct.shape)}, "
                       f"cpt {list(cpt.shape)}); only a vocabulary grown in the instruct model is allowed")


class _Atomic:
    """Write into ``.<out>.tmp-HOST-PID`` beside ``out``; on success put it at ``out`` (an existing ``out``, with
    ``overwrite``, is swapped out in one step and then removed: :func:`data_prep.atomic.replace_dir`); on failure
    remove the temporary folder, leaving ``out`` as it was. Host and pid keep two writers on a shared file system
    (another node, the same pid) out of each other's temporary folders."""

    def __init__(self, out: Path, overwrite: bool) -> None:
        self.out = out
        if out.exists() and not overwrite:
            raise WeightsError(f"{out} exists; choose another output folder or pass --overwrite")
        host = platform.node().replace("/", "_") or "host"
        self.tmp = out.with_name(f".{out.name}.tmp-{host}-{os.getpid()}")
        self.aside = out.with_name(f".{out.name}.old-{host}-{os.getpid()}")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)  # left by a killed run of this process id on this host
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        atomic.replace_dir(self.tmp, self.out, aside=self.aside)


def _run(out: Path, sources: dict[str, ModelWeights], meta_from: Path, plan: list[PlannedTensor],
         compute: Callable[[str, int, int], torch.Tensor], report: ResidualReport, max_shard_bytes: int,
         overwrite: bool, manifest: dict, progress: bool) -> ResidualReport:
    start = time.perf_counter()
    with _Atomic(out, overwrite) as tmp:
        writer = ShardedWriter(tmp, plan, max_shard_bytes, metadata={"producer": "megatron-ipt residual"})
        bar = _progress(progress, sum(t.nbytes for t in plan))
        for t in plan:
            info_rows = t.shape[0] if t.shape else 1
            step = max(1, manifest["block_bytes"] // max(1, t.nbytes // max(1, info_rows)))
            for r0 in range(0, info_rows, step):
                block = compute(t.name, r0, min(info_rows, r0 + step))
                writer.write(t.name, block)
                if bar:
                    bar.advance(block.numel() * block.element_size())
            report.tensors += 1
        shards = writer.close()
        if bar:
            bar.close()
        copied = _copy_model_files(meta_from, tmp)
        report.bytes_read = sum(w.total_bytes() for w in sources.values())
        report.bytes_written = writer.total_bytes
        report.seconds = time.perf_counter() - start
        manifest.update({"tensors": report.tensors, "grown_vocabulary": report.grown, "dtype_notes": report.dtype_notes,
                         "shards": shards, "files_from_instruct": copied, "bytes_read": report.bytes_read,
                         "bytes_written": report.bytes_written, "seconds": round(report.seconds, 3),
                         "gb_per_s": round(report.gb_per_s, 3)})
        (tmp / RESIDUAL_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    for w in sources.values():
        w.close()
    return report


def _progress(enabled: bool, total: int):
    """Bytes written so far: a rich bar on a terminal, periodic lines otherwise; None when not ``enabled``."""
    if not enabled:
        return None
    from data_prep.progress import StageProgress

    return StageProgress("residual", total, "", byte_units=True)


def _rows(name: str, r0: int, r1: int, limit: int | None, shared: Callable[[int, int], torch.Tensor],
          grown_source: ModelWeights, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``r0:r1`` of output tensor ``name`` in ``dtype``: ``shared(a, b)`` (float32 arithmetic) for rows every
    input has, ``grown_source``'s own rows from ``limit`` on (a vocabulary grown in the instruct model)."""
    if limit is not None and r0 >= limit:
        return grown_source.read_rows(name, r0, r1).to(dtype)
    hi = r1 if limit is None else min(r1, limit)
    block = shared(r0, hi).to(dtype)
    if hi < r1:
        block = torch.cat([block, grown_source.read_rows(name, hi, r1).to(dtype)])
    return block


def _dtype_notes(name: str, infos: dict) -> list[str]:
    dtypes = {k: v.dtype for k, v in infos.items()}
    return [f"{name}: dtypes differ {dtypes}"] if len(set(dtypes.values())) > 1 else []


def add_instruction_residual(base: str | Path, instruct: str | Path, cpt: str | Path, output: str | Path,
                             alpha: float = 1.0, save_residual: str | Path | None = None,
                             residual_dtype: str = "float32", max_shard_bytes: int = 5 * 10**9,
                             block_bytes: int = 64 * 2**20, overwrite: bool = False,
                             progress: bool = False) -> ResidualReport:
    """Write ``cpt + alpha * (instruct - base)`` (a Hugging Face folder) to ``output``; optionally also the
    residual ``instruct - base`` to ``save_residual`` (in ``residual_dtype``).

    Inputs are Hugging Face folders with safetensors weights. Per tensor and row block: float32 arithmetic,
    stored in the CPT tensor's dtype. Raises WeightsError for differing names or shapes (naming the tensor),
    an existing output (unless ``overwrite``), or unreadable weights."""
    src = {k: ModelWeights(p) for k, p in (("base", base), ("instruct", instruct), ("cpt", cpt))}
    _check_same_tensors(src["base"], src["instruct"], "instruct")
    _check_same_tensors(src["base"], src["cpt"], "continually pre-trained")
    report = ResidualReport(output=str(output), alpha=alpha)
    plan: list[PlannedTensor] = []
    grown: dict[str, int] = {}
    for name in src["cpt"].names():
        infos = {k: w.tensors[name] for k, w in src.items()}
        rows = _grown_rows(name, infos["base"], infos["instruct"], infos["cpt"])
        if rows is not None:
            grown[name] = rows
            report.grown[name] = {"base_rows": rows, "rows": infos["instruct"].shape[0]}
        report.dtype_notes += _dtype_notes(name, infos)
        plan.append(PlannedTensor(name, infos["cpt"].torch_dtype, infos["instruct"].shape))

    def compute(name: str, r0: int, r1: int) -> torch.Tensor:
        def shared(a: int, b: int) -> torch.Tensor:
            delta = src["instruct"].read_rows(name, a, b).float() - src["base"].read_rows(name, a, b).float()
            return src["cpt"].read_rows(name, a, b).float() + alpha * delta

        return _rows(name, r0, r1, grown.get(name), shared, src["instruct"], src["cpt"].tensors[name].torch_dtype)

    manifest = {"kind": "cpt + alpha * (instruct - base)", "alpha": alpha, "block_bytes": block_bytes,
                "inputs": {k: folder_fingerprint(w) for k, w in src.items()}}
    report.inputs = manifest["inputs"]
    if save_residual is not None:
        save_instruction_residual(base, instruct, save_residual, residual_dtype, max_shard_bytes, block_bytes,
                                  overwrite, progress)
        manifest["saved_residual"] = str(save_residual)
    return _run(Path(output), src, Path(instruct), plan, compute, report, max_shard_bytes, overwrite, manifest,
                progress)


def save_instruction_residual(base: str | Path, instruct: str | Path, output: str | Path,
                              residual_dtype: str = "float32", max_shard_bytes: int = 5 * 10**9,
                              block_bytes: int = 64 * 2**20, overwrite: bool = False,
                              progress: bool = False) -> ResidualReport:
    """Write the residual ``instruct - base`` as a Hugging Face-shaped folder (weights in ``residual_dtype``,
    the instruct model's config and tokenizer files, a manifest). Rows of a vocabulary grown in the instruct
    model hold the instruct model's own values; the manifest's ``grown_vocabulary`` says from which row."""
    if residual_dtype not in _DTYPE_NAMES:
        raise WeightsError(f"residual dtype must be one of {sorted(_DTYPE_NAMES)}, not {residual_dtype!r}")
    dtype = _DTYPE_NAMES[residual_dtype]
    src = {"base": ModelWeights(base), "instruct": ModelWeights(instruct)}
    _check_same_tensors(src["base"], src["instruct"], "instruct")
    report = ResidualReport(output=str(output), alpha=1.0)
    plan, grown = [], {}
    for name in src["instruct"].names():
        b, i = src["base"].tensors[name], src["instruct"].tensors[name]
        rows = _grown_rows(name, b, i, b)
        if rows is not None:
            grown[name] = rows
            report.grown[name] = {"base_rows": rows, "rows": i.shape[0]}
        report.dtype_notes += _dtype_notes(name, {"base": b, "instruct": i})
        plan.append(PlannedTensor(name, dtype, i.shape))

    def compute(name: str, r0: int, r1: int) -> torch.Tensor:
        def shared(a: int, b: int) -> torch.Tensor:
            return src["instruct"].read_rows(name, a, b).float() - src["base"].read_rows(name, a, b).float()

        return _rows(name, r0, r1, grown.get(name), shared, src["instruct"], dtype)

    manifest = {"kind": "instruct - base", "residual_dtype": residual_dtype, "block_bytes": block_bytes,
                "inputs": {k: folder_fingerprint(w) for k, w in src.items()}}
    report.inputs = manifest["inputs"]
    return _run(Path(output), src, Path(instruct), plan, compute, report, max_shard_bytes, overwrite, manifest,
                progress)


def apply_residual(residual: str | Path, cpt: str | Path, output: str | Path, alpha: float = 1.0,
                   max_shard_bytes: int = 5 * 10**9, block_bytes: int = 64 * 2**20, overwrite: bool = False,
                   progress: bool = False) -> ResidualReport:
    """Write ``cpt + alpha * residual`` for a residual saved by :func:`save_instruction_residual`; rows of a
    grown vocabulary are copied from the residual (they are the instruct model's values). Stored in the CPT
    model's dtypes; config and tokenizer files come from the residual folder (the instruct model's).
    Raises WeightsError when the folder has no residual manifest or names or shapes differ."""
    residual = Path(residual)
    mpath = residual / RESIDUAL_MANIFEST
    try:
        rmanifest = json.loads(mpath.read_text())
        if rmanifest.get("kind") != "instruct - base":
            raise KeyError("kind")
    except (OSError, json.JSONDecodeError, KeyError):
        raise WeightsError(f"{mpath}: not a saved instruction residual (write one with --save-residual)") from None
    src = {"residual": ModelWeights(residual), "cpt": ModelWeights(cpt)}
    _check_same_tensors(src["residual"], src["cpt"], "continually pre-trained")
    grown = {k: v["base_rows"] for k, v in rmanifest.get("grown_vocabulary", {}).items()}
    report = ResidualReport(output=str(output), alpha=alpha)
    plan = []
    for name in src["cpt"].names():
        r, c = src["residual"].tensors[name], src["cpt"].tensors[name]
        rows = grown.get(name)
        ok = r.shape == c.shape if rows is None else (r.shape[1:] == c.shape[1:] and c.shape[0] == rows)
        if not ok:
            raise WeightsError(f"tensor {name}: residual shape {list(r.shape)} does not fit cpt shape {list(c.shape)}")
        if rows is not None:
            report.grown[name] = {"base_rows": rows, "rows": r.shape[0]}
        plan.append(PlannedTensor(name, c.torch_dtype, r.shape))

    def compute(name: str, r0: int, r1: int) -> torch.Tensor:
        def shared(a: int, b: int) -> torch.Tensor:
            return src["cpt"].read_rows(name, a, b).float() + alpha * src["residual"].read_rows(name, a, b).float()

        return _rows(name, r0, r1, grown.get(name), shared, src["residual"], src["cpt"].tensors[name].torch_dtype)

    manifest = {"kind": "cpt + alpha * residual", "alpha": alpha, "block_bytes": block_bytes,
                "residual": {"path": str(residual.resolve()), "inputs": rmanifest.get("inputs"),
                             "residual_dtype": rmanifest.get("residual_dtype")},
                "inputs": {k: folder_fingerprint(w) for k, w in src.items()}}
    report.inputs = manifest["inputs"]
    return _run(Path(output), src, residual, plan, compute, report, max_shard_bytes, overwrite, manifest, progress)


__all__ = ["add_instruction_residual", "save_instruction_residual", "apply_residual", "ResidualReport",
           "WeightsError", "row_blocks"]
