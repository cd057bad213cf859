"""Streaming access to Hugging Face model folders in the safetensors format, a few rows at a time.

The ``safetensors`` library reads through a memory map and writes a whole state dict at once: fine for a
small model, but for a 70B model the mapped pages of three inputs pile up in the process's resident memory
and a shard must be built in memory before it is written. This module reads and writes the same format
(`safetensors` spec: an 8-byte little-endian header length, a JSON header mapping each tensor name to
``dtype``, ``shape`` and ``data_offsets`` relative to the end of the header, then the raw little-endian
data) with plain positioned reads and sequential writes, so the memory in use is the row block being
processed. Files written here load with ``safetensors`` and ``transformers`` (tested).

- :class:`ModelWeights` indexes a folder (``model.safetensors`` or sharded with
  ``model.safetensors.index.json``): name -> (file, dtype, shape, byte range), and reads row blocks
  (:meth:`ModelWeights.read_rows`), or hands them out file-backed (:meth:`ModelWeights.mmap_rows`,
  :func:`mmap_tensor`) for consumers that take whole tensors, such as megatron's checkpoint writer.
- :class:`ShardedWriter` plans shard files from the tensors' sizes up front (so every header is known
  before any data is written), streams tensor data into them, and writes ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from megatron_ipt.errors import IptError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# safetensors dtype codes <-> torch dtypes (the subset model weights use)
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES = {v: k for k, v in _DTYPES.items()}


class WeightsError(IptError, ValueError):
    """A model folder is missing, unreadable or inconsistent; the message names the file or tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, safetensors dtype code, shape and absolute byte range in the file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def row_bytes(self) -> int:
        """Bytes per index of the first dimension (the whole tensor for a scalar)."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of one safetensors file and the absolute offset where its data starts.

    Raises WeightsError naming the file when it is too short, its header is not a JSON object, or the header
    claims more bytes than the file has."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise WeightsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 * 2**20 or 8 + n > size:
                raise WeightsError(f"{path}: not a safetensors file (header length {n} bytes, file {size} bytes)")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: cannot read the safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (its header is a JSON {type(header).__name__}, "
                           "not an object)")
    return header, 8 + n


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def tensor_infos(path: Path, header: dict, start: int) -> dict[str, TensorInfo]:
    """Validate a safetensors header (:func:`read_header`) as the format requires and the ``safetensors`` library
    checks: a known dtype, a shape of non-negative integers, ``data_offsets`` ``[begin, end]`` whose length is the
    shape's element count x the dtype's size, and the tensors' byte ranges, in offset order, tiling the data section
    from its start to the end of the file (no gap, no overlap, nothing outside the file). Returns name ->
    :class:`TensorInfo` (absolute byte ranges). Raises WeightsError naming the file and the tensor."""
    size = os.path.getsize(path)
    infos: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict):
            raise WeightsError(f"{path}: tensor {name}: header entry is not an object")
        dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if dtype not in _DTYPES:
            raise WeightsError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise WeightsError(f"{path}: tensor {name}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
                or offsets[0] > offsets[1]):
            raise WeightsError(f"{path}: tensor {name}: data_offsets {offsets!r} is not [begin, end] with begin <= end")
        info = TensorInfo(path, dtype, tuple(shape), start + offsets[0], start + offsets[1])
        numel = 1
        for d in info.shape:
            numel *= d
        if numel * _DTYPES[dtype].itemsize != info.nbytes:
            raise WeightsError(f"{path}: tensor {name}: {info.nbytes} bytes do not hold {dtype} {list(info.shape)}")
        infos[name] = info
    position = start
    for name, info in sorted(infos.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != position:
            what = ("overlaps the tensor before it" if info.begin < position
                    else f"leaves a gap of {info.begin - position} bytes before it")
            raise WeightsError(f"{path}: tensor {name}: data_offsets {[info.begin - start, info.end - start]} {what} "
                               "(a safetensors data section is contiguous)")
        position = info.end
    if position != size:
        raise WeightsError(f"{path}: the tensors end at byte {position} but the file has {size} bytes"
                           + (" (truncated)" if position > size else " (trailing data)"))
    return infos


def _shard_names(index: Path) -> list[str]:
    """The file names ``index``'s ``weight_map`` lists: plain names of files in its folder (no folder part, not
    absolute, not ``..``); WeightsError naming the index and the entry otherwise."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{index}: not a safetensors index ({e})") from None
    if not isinstance(weight_map, dict):
        raise WeightsError(f"{index}: not a safetensors index (weight_map is not an object)")
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\x00" in name:
            raise WeightsError(f"{index}: tensor {tensor}: file {name!r} is not a file name inside the model folder")
    return sorted(set(weight_map.values()))


class ModelWeights:
    """The tensors of a Hugging Face model folder (single-file or sharded safetensors), read by row blocks.

    Raises WeightsError when the folder has no safetensors weights, when the index names a missing file or one
    outside the folder, or when a header is invalid (:func:`tensor_infos`: unknown dtype, byte ranges that do not
    match dtype and shape, lie outside the file or are not contiguous)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            files = _shard_names(index)
        elif (self.folder / SINGLE).is_file():
            files = [SINGLE]
        else:
            raise WeightsError(f"{self.folder}: no {SINGLE} or {INDEX} (only safetensors weights are supported)")
        self.tensors: dict[str, TensorInfo] = {}
        self.files: list[Path] = []
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise WeightsError(f"{index}: names {name}, which is missing")
            self.files.append(path)
            header, start = read_header(path)
            self.tensors.update(tensor_infos(path, header, start))
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of the first dimension of tensor ``name`` (the whole tensor by default), read
        with one positioned read into fresh memory (no memory map). Shape ``(stop - start, *shape[1:])``."""
        info = self.tensors[name]
        if not info.shape:
            start, stop, nrows = 0, 1, None
        else:
            stop = info.shape[0] if stop is None else stop
            nrows = stop - start
        begin = info.begin + start * info.row_bytes
        nbytes = (stop - start) * info.row_bytes
        buf = bytearray(nbytes)
        f = self._handles.get(info.file)
        if f is None:
            f = self._handles[info.file] = open(info.file, "rb")
        got = os.preadv(f.fileno(), [buf], begin) if nbytes else 0
        if got != nbytes:
            raise WeightsError(f"{info.file}: tensor {name} is truncated ({got} of {nbytes} bytes read)")
        t = torch.frombuffer(buf, dtype=info.torch_dtype) if nbytes else torch.empty(0, dtype=info.torch_dtype)
        return t.reshape(info.shape if nrows is None else (nrows, *info.shape[1:]))

    def mmap_rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name`` as a tensor backed by the file itself (a private, copy-on-write
        memory map): reading it fills the page cache (clean, reclaimable file pages), not the process's
        anonymous memory. Do not write to it. Shape ``(stop - start, *shape[1:])``."""
        info = self.tensors[name]
        rows = info.shape[0] if info.shape else 1
        stop = rows if stop is None else stop
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        return mmap_tensor(info.file, info.begin + start * info.row_bytes, info.torch_dtype, shape)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()  # type: ignore[attr-defined]
        self._handles.clear()


def mmap_tensor(path: str | Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The bytes ``offset : offset + nbytes`` of file ``path`` as a ``dtype`` tensor of ``shape``, memory-mapped
    copy-on-write (``numpy.memmap`` mode ``c``): its storage holds exactly these bytes, and its pages are
    file pages (page cache), not anonymous memory. Raises WeightsError naming the file when it is too short."""
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    size = os.path.getsize(path)
    if offset + nbytes > size:
        raise WeightsError(f"{path}: {nbytes} bytes at offset {offset} lie beyond the end of the file ({size} bytes)")
    import numpy as np

    raw = np.memmap(path, dtype=np.uint8, mode="c", offset=offset, shape=(nbytes,))
    return torch.from_numpy(raw).view(dtype).reshape(shape)


def row_blocks(info: TensorInfo, block_bytes: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges covering the first dimension in blocks of about ``block_bytes``."""
    rows = info.shape[0] if info.shape else 1
    step = max(1, block_bytes // max(1, info.row_bytes))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


class ShardedWriter:
    """Writes tensors, in the planned order, into ``model-0000i-of-0000n.safetensors`` files of at most
    ``max_shard_bytes`` each (a larger tensor gets a shard of its own) plus ``model.safetensors.index.json``;
    a single shard is named ``model.safetensors`` and needs no index, as ``save_pretrained`` does.

    Use :meth:`write` once per tensor row block, in plan order; :meth:`close` checks that every planned
    byte was written. Raises WeightsError when data arrives out of order or with the wrong dtype/size."""

    def __init__(self, folder: str | Path, plan: list[PlannedTensor], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None) -> None:
        self.folder = Path(folder)
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for t in plan:
            if shards[-1] and size + t.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        n = len(shards)
        self.names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._queue: list[tuple[int, PlannedTensor]] = [(i, t) for i, shard in enumerate(shards) for t in shard]
        self._shards = shards
        self._metadata = {"format": "pt", **(metadata or {})}
        self._file = None
        self._shard = -1
        self._pos = 0  # next tensor in _queue
        self._left = 0  # bytes still expected for the current tensor
        self.total_bytes = sum(t.nbytes for t in plan)

    def _open(self, shard: int) -> None:
        if self._file is not None:
            self._file.close()
        header: dict[str, object] = {"__metadata__": self._metadata}
        offset = 0
        for t in self._shards[shard]:
            header[t.name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the reference writer does
        self._file = open(self.folder / self.names[shard], "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)
        self._shard = shard

    def write(self, name: str, block: torch.Tensor) -> None:
        """Append a row block of tensor ``name`` (blocks of one tensor in row order, tensors in plan order)."""
        if self._left == 0:
            if self._pos >= len(self._queue):
                raise WeightsError(f"tensor {name}: written after every planned tensor")
            shard, planned = self._queue[self._pos]
            if planned.name != name:
                raise WeightsError(f"tensor {name}: written where {planned.name} was planned")
            if shard != self._shard:
                self._open(shard)
            self._left = planned.nbytes
            self._pos += 1
        planned = self._queue[self._pos - 1][1]
        if planned.name != name or block.dtype != planned.dtype:
            raise WeightsError(f"tensor {name}: got {block.dtype} data for planned {planned.name} ({planned.dtype})")
        data = block.contiguous().reshape(-1).view(torch.uint8).numpy()
        nbytes = data.nbytes
        if nbytes > self._left:
            raise WeightsError(f"tensor {name}: more data than its planned shape {list(planned.shape)}")
        self._file.write(data)  # type: ignore[union-attr]
        self._left -= nbytes

    def close(self) -> list[str]:
        """Finish the last shard, write the index (when sharded); returns the shard file names."""
        if self._left or self._pos != len(self._queue):
            missing = self._queue[self._pos][1].name if self._pos < len(self._queue) else self._queue[-1][1].name
            raise WeightsError(f"tensor {missing}: not completely written")
        if self._file is not None:
            self._file.close()
            self._file = None
        if len(self.names) > 1:
            weight_map = {t.name: self.names[i] for i, t in self._queue}
            (self.folder / INDEX).write_text(
                json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2) + "\n")
        return self.names
