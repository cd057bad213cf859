"""A torch_dist checkpoint's pickles are scanned before any load: a crafted one is refused and its payload never runs.

The real checkpoint is one the trainer writes (model, optimizer, scheduler, RNG states, common.pt) on this leg's
megatron-core; tests/test_crossversion.py resumes checkpoints of both supported versions, through the same scan.
"""

from __future__ import annotations

import io
import pickle
import re
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from megatron_ipt.cli import main
from megatron_ipt.errors import UntrustedCheckpointError
from megatron_ipt.training import checkpoint, checkpoint_trust

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import make_tokenized_dir, tiny_config  # noqa: E402


OPEN = f"'{open.__module__}.open'"  # how pickle names open: io.open on Python 3.11, _io.open on 3.12


class _Payload:
    """Unpickling this creates ``marker`` (``open(marker, "w")``): what a crafted checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    return make_tokenized_dir(tmp_path_factory.mktemp("tokenized"), train_docs=60, heldout_docs=6)


@pytest.fixture(scope="module")
def real(tokenized, tmp_path_factory):
    """A checkpoints folder the trainer wrote (1 iteration: model, optimizer, scheduler, RNG, common.pt)."""
    from megatron_ipt.training.train import train_stage

    out = tmp_path_factory.mktemp("real")
    train_stage(tiny_config(train_iters=1, eval_iters=1), tokenized, out, "fp-trust")
    return out / "checkpoints"


def _copy(real: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of ``real`` (checkpoints folder) and the path of its iter folder."""
    root = tmp_path / "checkpoints"
    shutil.copytree(real, root)
    return root, checkpoint.resolve_checkpoint_dir(root)


def _crafted(real: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of ``real`` whose ``.metadata`` unpickles to the payload; returns (checkpoints folder, marker)."""
    root, folder = _copy(real, tmp_path)
    marker = tmp_path / "payload-ran"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    return root, marker


def test_a_checkpoint_the_trainer_wrote_passes_the_scan(real):
    folder = checkpoint.resolve_checkpoint_dir(real)
    # .metadata, common.pt and the sharded objects stored as bytes in the .distcp files (RNG states, extra states)
    assert checkpoint_trust.scan(folder) >= 3


def test_a_crafted_metadata_is_refused_by_train_init_from_and_its_payload_never_runs(real, tokenized, tmp_path):
    from megatron_ipt.training.train import train_stage

    root, marker = _crafted(real, tmp_path)
    cfg = tiny_config(train_iters=1, eval_iters=1, init_from=str(root))
    with pytest.raises(UntrustedCheckpointError) as err:
        train_stage(cfg, tokenized, tmp_path / "run", "fp-crafted")
    message = str(err.value)
    assert OPEN in message and ".metadata" in message and "--trust-checkpoint" in message
    assert len(message.splitlines()) == 1
    assert not marker.exists()


def test_every_load_path_scans_first(real, tmp_path):
    root, marker = _crafted(real, tmp_path)
    with pytest.raises(UntrustedCheckpointError):  # train.init_from / sft.init_from / eval's scorer
        checkpoint.load_model_weights(root, model=None)
    with pytest.raises(UntrustedCheckpointError):  # resume
        checkpoint.load_checkpoint(root, None, None, None)
    assert not marker.exists()


def test_convert_and_eval_refuse_a_crafted_checkpoint_in_one_line(real, tmp_path, capsys):
    from megatron_ipt.evaluate.scorers import MegatronScorer

    root, marker = _crafted(real, tmp_path)
    assert main(["convert", "megatron-to-hf", str(root), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert OPEN in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(UntrustedCheckpointError, match=re.escape(OPEN)):
        with MegatronScorer(tiny_config(), 250, root):
            pass
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_trust_checkpoint_skips_the_scan(real, tmp_path, tiny_tokenizer_dir):
    from megatron_ipt.evaluate.hf_export import preset_reference
    from megatron_ipt.training.presets import resolve_preset

    root, marker = _crafted(real, tmp_path)
    checkpoint_trust.check(checkpoint.resolve_checkpoint_dir(root), trust=True)  # no scan, nothing unpickled
    assert not marker.exists()
    # --trust-checkpoint reaches the loader: torch's FileSystemReader unpickles the crafted .metadata as it is, so
    # the payload runs (and the conversion then fails on what it returned)
    reference = preset_reference(resolve_preset(tiny_config().model), tmp_path / "ref", vocab_size=250,
                                 tokenizer=tiny_tokenizer_dir)
    with pytest.raises(AttributeError):
        main(["convert", "megatron-to-hf", str(root), str(tmp_path / "hf"), "--hf-config-from", str(reference),
              "--trust-checkpoint"])
    assert marker.exists()


def _torch_save(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _replace_bytes_item(real: Path, tmp_path: Path, key_part: str, payload: bytes) -> Path:
    """A copy of ``real`` whose first bytes item with ``key_part`` in its key reads ``payload`` from a new .distcp
    file (its .metadata rewritten to point there); returns the iter folder."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    _, folder = _copy(real, tmp_path)
    meta = pickle.loads((folder / ".metadata").read_bytes())
    info = next(s for i, s in meta.storage_data.items()
                if isinstance(meta.state_dict_metadata[i.fqn], BytesStorageMetadata) and key_part in i.fqn)
    (folder / "__9_0.distcp").write_bytes(payload)
    info.relative_path, info.offset, info.length = "__9_0.distcp", 0, len(payload)
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    return folder


def test_a_crafted_common_pt_or_sharded_object_is_refused(real, tmp_path):
    marker = tmp_path / "payload-ran"
    _, folder = _copy(real, tmp_path / "a")
    (folder / "common.pt").write_bytes(_torch_save({"iteration": 1, "x": _Payload(marker)}))
    with pytest.raises(UntrustedCheckpointError, match=r"common\.pt.*" + re.escape(OPEN)):
        checkpoint_trust.scan(folder)
    # a sharded object (the RNG states) that is a torch.save'd payload
    folder = _replace_bytes_item(real, tmp_path / "b", "rng_state", _torch_save([_Payload(marker)]))
    with pytest.raises(UntrustedCheckpointError, match=r"__9_0\.distcp \(item 'rng_state.*" + re.escape(OPEN)):
        checkpoint_trust.scan(folder)
    meta = pickle.loads((folder / ".metadata").read_bytes())
    next(s for i, s in meta.storage_data.items() if s.relative_path == "__9_0.distcp").relative_path = "../x.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(UntrustedCheckpointError, match="stored outside the folder"):
        checkpoint_trust.scan(folder)
    assert not marker.exists()


def _extra_state(state) -> bytes:
    """A sharded object as TransformerEngine 2 stores its FP8 state: a pickle inside a uint8 tensor, torch.save'd."""
    return _torch_save([torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)])


def test_the_pickle_inside_a_transformer_engine_extra_state_is_scanned(real, tmp_path):
    marker = tmp_path / "payload-ran"
    fp8 = {"scale_fwd": torch.ones(3), "amax_history_fwd": torch.zeros(4, 3), "extra_fp8_variables": {"num_gemms": 1}}
    folder = _replace_bytes_item(real, tmp_path / "a", "_extra_state", _extra_state(fp8))
    checkpoint_trust.scan(folder)  # tensors pickled with plain pickle: nested legacy torch.save files, scanned too
    folder = _replace_bytes_item(real, tmp_path / "b", "_extra_state", _extra_state({**fp8, "x": _Payload(marker)}))
    with pytest.raises(UntrustedCheckpointError, match=r"_extra_state.*extra-state tensor\): .*" + re.escape(OPEN)):
        checkpoint_trust.scan(folder)
    assert not marker.exists()


def test_legacy_torch_save_files_are_scanned_and_malformed_pickles_refused(tmp_path):
    marker = tmp_path / "payload-ran"
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer, _use_new_zipfile_serialization=False)
    checkpoint_trust.scan_torch_save(buffer.getvalue(), "legacy.pt")
    buffer = io.BytesIO()
    torch.save({"w": _Payload(marker)}, buffer, _use_new_zipfile_serialization=False)
    with pytest.raises(UntrustedCheckpointError, match=r"legacy\.pt \(legacy torch.save part 4\).*" + re.escape(OPEN)):
        checkpoint_trust.scan_torch_save(buffer.getvalue(), "legacy.pt")
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"a": 1})[:-3])
    with pytest.raises(UntrustedCheckpointError, match="cannot be read"):
        checkpoint_trust.scan(tmp_path)
    assert not marker.exists()


def test_ipt_eval_refuses_a_crafted_checkpoint_and_trust_checkpoint_passes_the_scan(real, tmp_path, tiny_tokenizer_dir,
                                                                                     capsys):
    from test_eval_batching import eval_experiment

    root, marker = _crafted(real, tmp_path)
    config, task = eval_experiment(tmp_path, tiny_tokenizer_dir)
    args = ["eval", str(config), "--checkpoint", str(root), "--data", str(task), "--output", str(tmp_path / "r.json")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ipt eval: error: ") and OPEN in err and len(err.strip().splitlines()) == 1, err
    assert not marker.exists()
    # trusted: megatron-core unpickles the crafted .metadata (the payload runs), then fails on what it got
    assert main(args + ["--trust-checkpoint"]) == 2
    assert marker.exists() and "does not match the model config" in capsys.readouterr().err


def test_only_data_classes_of_the_checkpoint_modules_are_allowed(tmp_path):
    from torch.distributed.checkpoint.metadata import StorageMeta

    checkpoint_trust.scan_torch_save(_torch_save({"m": StorageMeta()}), "ok.pt")
    planner = "torch.distributed.checkpoint.planner"
    for module, name in ((planner, "dataclass"), (planner, "Enum"), ("os", "system"), ("builtins", "eval"),
                         ("builtins", "getattr"), ("builtins", "__import__"), ("subprocess", "Popen")):
        data = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n."  # GLOBAL module.name, STOP
        with pytest.raises(UntrustedCheckpointError, match=f"'{module}.{name}'"):
            checkpoint_trust._unpickle(io.BytesIO(data), "crafted")


def test_a_checkpoint_of_another_sharded_backend_is_refused(real, tmp_path):
    _, folder = _copy(real, tmp_path)
    (folder / "metadata.json").write_text('{"sharded_backend": "zarr", "sharded_backend_version": 1}')
    with pytest.raises(UntrustedCheckpointError, match="metadata.json: .*sharded_backend 'zarr' is not scanned"):
        checkpoint_trust.scan(folder)
