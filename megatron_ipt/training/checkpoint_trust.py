"""Scan a torch_dist checkpoint's pickles before anything unpickles them: only data classes may be named.

Loading a torch_dist checkpoint unpickles parts of it: ``.metadata`` (``pickle.load`` in torch's
``FileSystemReader``), ``common.pt`` and the sharded objects stored as bytes inside the ``*.distcp`` files (the RNG
states, TransformerEngine extra state; ``torch.load(weights_only=False)``). A pickle can name any importable
callable and have it called while it loads (``__reduce__``), so a crafted checkpoint runs code. :func:`scan` reads
those pickles with a :class:`pickle.Unpickler` whose ``find_class`` resolves only the names in :data:`ALLOWED`
(plus torch's dtype / layout / memory-format / storage names), and raises :class:`UntrustedCheckpointError` naming
the first other one, before megatron-core or torch open the folder. Nothing the pickle names outside the list is
imported or called; tensors in ``torch.save`` files are not materialised (their storages are never read), except
two pickles hidden in tensor data, which are scanned too: TransformerEngine's FP8 extra state (a pickle in a
uint8 tensor, ``pickle.loads``-ed by TE on load) and tensors pickled with plain pickle (a nested legacy
``torch.save`` file, ``torch.load``-ed with ``weights_only=False``).

The list was built from checkpoints this project's trainer writes with megatron-core 0.16.1 (model, optimizer,
scheduler, RNG states; data and expert parallel; converted checkpoints) and from the classes torch's
``torch.distributed.checkpoint`` metadata modules define (what 0.19.2 writes too: its ``.metadata`` is torch's
``Metadata``; megatron-core's ``MCoreMetadata`` / ``MCoreSavePlan`` are empty placeholder classes older versions
pickled). ``train.trust_checkpoint: true`` / ``--trust-checkpoint`` skips the scan (:func:`check`).
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path
from typing import IO, Any

from megatron_ipt.errors import UntrustedCheckpointError

TRUST_HINT = "pass --trust-checkpoint (train.trust_checkpoint: true) only if you trust whoever wrote it"

# "module.name" a checkpoint's pickles may name. Data containers and constructors with no side effects only.
ALLOWED = frozenset({
    # torch.distributed.checkpoint's metadata (.metadata): every class of its metadata and planner modules
    # (_DATA_CLASS_MODULES), and the storage location records of its file system writer
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    "torch.distributed.checkpoint.filesystem._StoragePrefix",
    "torch.distributed._shard.sharded_tensor.metadata.TensorProperties",
    "torch.distributed._shard.sharded_tensor.metadata.MEM_FORMAT_ENCODING",
    "torch.distributed._shard.metadata.ShardMetadata",
    "megatron.core.dist_checkpointing.strategies.torch.MCoreMetadata",
    "megatron.core.dist_checkpointing.strategies.torch.MCoreSavePlan",
    # torch values
    "torch.Size", "torch.device", "torch.serialization._get_layout",
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    "torch.storage.UntypedStorage", "torch.storage.TypedStorage",
    # numpy arrays, scalars and dtypes (RNG states), numpy 1 and 2 module names
    *(f"{m}.{n}" for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")),
    "numpy.ndarray", "numpy.dtype",
    # containers and plain values
    "collections.OrderedDict", "collections.defaultdict", "builtins.set", "builtins.frozenset", "builtins.slice",
    "builtins.range", "builtins.complex", "builtins.bytearray", "builtins.bytes", "builtins.int", "builtins.float",
    "builtins.bool", "builtins.str", "builtins.tuple", "builtins.list", "builtins.dict", "_codecs.encode",
    "copyreg._reconstructor", "builtins.object", "argparse.Namespace", "pathlib.PosixPath", "pathlib.PurePosixPath",
})

# Modules of torch's checkpoint format that define only data classes, enums and abstract planners: any class defined
# there is allowed (a later torch version may add one to its .metadata).
_DATA_CLASS_MODULES = frozenset({"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner"})
# Resolved to this stub in the scan: tensors are not rebuilt (their storages are never read).
_TENSOR_REBUILDS = frozenset(n for n in ALLOWED if n.startswith("torch._utils._rebuild"))
# A tensor pickled with plain pickle (TransformerEngine's extra state) carries its storage as a nested legacy
# torch.save file, which torch.load(weights_only=False) reads: scanned in turn.
# megatron-core 0.19+ replaces it by its own weights_only loader (megatron.core.safe_globals.safe_load_from_bytes,
# set on import), so its checkpoints name that one: the nested file is scanned the same way.
_NESTED_SAVES = ("torch.storage._load_from_bytes", "megatron.core.safe_globals.safe_load_from_bytes")
_RENAMED_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # protocol-2 pickles (torch.save's)
# TransformerEngine keeps its FP8 state as a pickle inside a uint8 tensor (``*._extra_state`` sharded objects) and
# unpickles it with plain pickle.loads on load: the recipe dataclasses and enums are what it holds.
_TE_RECIPES = "transformer_engine.common.recipe."


def _not_materialised(*_args: Any, **_kwargs: Any) -> None:
    return None


def _is_torch_value(module: str, name: str) -> bool:
    """``torch.float32`` / ``torch.strided`` / ``torch.contiguous_format`` / ``torch.FloatStorage``-like names."""
    if module != "torch" or name.startswith("_"):
        return False
    import torch

    value = getattr(torch, name, None)
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
        return True
    return isinstance(value, type) and name.endswith("Storage")


class _Scanner(pickle.Unpickler):
    """An unpickler that resolves only allowed names; ``where`` names the file (and item) in errors. With
    ``storages``, torch.save's storage references are accepted (not read) and listed in :attr:`storages`."""

    def __init__(self, stream: IO[bytes], where: str, *, storages: bool, extra_state: bool) -> None:
        super().__init__(stream)
        self.where, self.accept_storages, self.extra_state = where, storages, extra_state
        self.storages: list[tuple[str, str]] = []  # (storage type name, key)

    def find_class(self, module: str, name: str) -> Any:
        module = _RENAMED_MODULES.get(module, module)
        full = f"{module}.{name}"
        if full in _TENSOR_REBUILDS:
            return _not_materialised
        if full in _NESTED_SAVES:
            return lambda data, *_: scan_torch_save(bytes(data), f"{self.where} (a pickled tensor)",
                                                    extra_state=self.extra_state)
        if full in ALLOWED or _is_torch_value(module, name) or (self.extra_state and full.startswith(_TE_RECIPES)):
            return super().find_class(module, name)
        if module in _DATA_CLASS_MODULES and not name.startswith("__"):
            value = super().find_class(module, name)
            if isinstance(value, type) and value.__module__ == module:
                return value
        raise UntrustedCheckpointError(
            f"{self.where}: refusing to load this checkpoint: its pickle names {full!r}, not one of the data classes "
            f"a torch_dist checkpoint holds (unpickling it could run code); {TRUST_HINT}")

    def persistent_load(self, pid: Any) -> Any:
        # torch.save's storages: ('storage', storage type, key, location, numel[, view]); the type went through
        # find_class.
        if self.accept_storages and isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage":
            self.storages.append((getattr(pid[1], "__name__", str(pid[1])), str(pid[2])))
            return None
        raise UntrustedCheckpointError(f"{self.where}: refusing to load this checkpoint: unexpected persistent id "
                                       f"{str(pid)[:80]!r} in its pickle; {TRUST_HINT}")


def _unpickle(stream: IO[bytes], where: str, *, storages: bool = False, extra_state: bool = False) -> _Scanner:
    """Run one pickle of ``stream`` through :class:`_Scanner`; returns the scanner (its ``result``, storages).
    ``extra_state``: a TransformerEngine extra state, which may also name TE's recipe classes."""
    scanner = _Scanner(stream, where, storages=storages, extra_state=extra_state)
    try:
        scanner.result = scanner.load()
    except UntrustedCheckpointError:
        raise
    except Exception as e:  # truncated or malformed pickle: refuse rather than let torch try
        raise UntrustedCheckpointError(f"{where}: refusing to load this checkpoint: its pickle cannot be read "
                                       f"({type(e).__name__}: {str(e)[:120]}); {TRUST_HINT}") from None
    return scanner


def scan_torch_save(data: bytes, where: str, *, extra_state: bool = False) -> None:
    """Scan one ``torch.save`` output: the zip format (every ``*.pkl`` member; with ``extra_state``, a
    ``*._extra_state`` sharded object, also the pickle TransformerEngine keeps in a uint8 tensor), or the legacy
    format's five consecutive pickles (torch's own nested tensors use it). A tar-format (torch < 0.4) file is
    refused."""
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for member in archive.namelist():
                if not member.endswith(".pkl"):
                    continue
                scanner = _unpickle(io.BytesIO(archive.read(member)), f"{where} ({member})", storages=True,
                                    extra_state=extra_state)
                if not extra_state:
                    continue
                prefix = member[: -len("data.pkl")] if member.endswith("data.pkl") else ""
                for kind, key in scanner.storages:
                    if kind in ("ByteStorage", "UntypedStorage") and f"{prefix}data/{key}" in archive.namelist():
                        blob = archive.read(f"{prefix}data/{key}")
                        if blob:
                            _unpickle(io.BytesIO(blob), f"{where} (pickle in extra-state tensor)", extra_state=True)
        return
    if tarfile.is_tarfile(io.BytesIO(data)):
        raise UntrustedCheckpointError(f"{where}: refusing to load this checkpoint: a tar-format torch.save file "
                                       f"is not scanned; {TRUST_HINT}")
    stream = io.BytesIO(data)  # legacy: magic number, protocol, sys info, the object, its storage keys; raw data
    for part in range(5):
        _unpickle(stream, f"{where} (legacy torch.save part {part + 1})", storages=part == 3, extra_state=extra_state)


def _bytes_items(directory: Path, metadata: Any) -> list[tuple[str, Path, int, int]]:
    """``(key, file, offset, length)`` of every bytes item (a ``torch.save`` d sharded object) in the checkpoint."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    where = directory / ".metadata"
    if not isinstance(metadata, Metadata):
        raise UntrustedCheckpointError(f"{where}: refusing to load this checkpoint: holds a "
                                       f"{type(metadata).__name__}, not torch's checkpoint Metadata; {TRUST_HINT}")
    items = []
    for index, info in (metadata.storage_data or {}).items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        name = str(info.relative_path)
        if Path(name).name != name or name in ("", ".", ".."):
            raise UntrustedCheckpointError(f"{where}: refusing to load this checkpoint: item {index.fqn!r} is stored "
                                           f"outside the folder ({name!r})")
        if getattr(info, "transform_descriptors", None):
            raise UntrustedCheckpointError(f"{where}: refusing to load this checkpoint: item {index.fqn!r} is stored "
                                           f"transformed ({info.transform_descriptors}), which is not scanned; "
                                           f"{TRUST_HINT}")
        items.append((index.fqn, directory / name, int(info.offset), int(info.length)))
    return items


def _check_backend(directory: Path) -> None:
    """Refuse a checkpoint whose ``metadata.json`` names a sharded backend other than torch_dist (megatron-core
    would load it with that backend's reader, which this scan does not cover)."""
    path = directory / "metadata.json"
    try:
        backend = json.loads(path.read_text()).get("sharded_backend") if path.is_file() else None
    except (OSError, ValueError, AttributeError) as e:
        raise UntrustedCheckpointError(f"{path}: refusing to load this checkpoint: unreadable ({e})") from None
    if backend not in (None, "torch_dist"):
        raise UntrustedCheckpointError(f"{path}: refusing to load this checkpoint: sharded_backend {backend!r} is "
                                       f"not scanned (only torch_dist is); {TRUST_HINT}")


def scan(directory: str | Path) -> int:
    """Scan every pickle a torch_dist load of ``directory`` would unpickle: ``.metadata``, each bytes item it
    lists (read from its ``*.distcp`` file at its offset), and every ``*.pt`` file in the folder (``common.pt``,
    per-object files). Returns the number of pickled parts scanned. Raises UntrustedCheckpointError (one line,
    naming the file and the refused ``module.name``) on the first name outside :data:`ALLOWED`, a malformed
    pickle, a bytes item stored outside the folder, or a ``metadata.json`` naming another backend than torch_dist."""
    directory = Path(directory)
    _check_backend(directory)
    count = 0
    if (directory / ".metadata").is_file():
        with open(directory / ".metadata", "rb") as f:
            metadata = _unpickle(f, str(directory / ".metadata")).result
        count += 1
        for key, path, offset, length in _bytes_items(directory, metadata):
            with open(path, "rb") as f:
                f.seek(offset)
                scan_torch_save(f.read(length), f"{path} (item {key!r})",
                                extra_state=key.split("/", 1)[0].endswith("_extra_state"))
            count += 1
    for path in sorted(directory.rglob("*.pt")):
        if path.is_file():
            scan_torch_save(path.read_bytes(), str(path))
            count += 1
    return count


def check(directory: str | Path, *, trust: bool) -> None:
    """:func:`scan` ``directory`` unless ``trust`` (``train.trust_checkpoint`` / ``--trust-checkpoint``)."""
    if not trust:
        scan(directory)
