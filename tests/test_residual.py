"""Instruction residuals on tiny real Llama models saved by transformers (sharded safetensors)."""

from __future__ import annotations

import json
import os
import platform
import re
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from megatron_ipt.hf import residual as r
from megatron_ipt.cli import main
from megatron_ipt.hf.safetensors_stream import ModelWeights, PlannedTensor, ShardedWriter, WeightsError

transformers = pytest.importorskip("transformers")


def _config(vocab=96, tie=False):
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=tie)


def _model(path, seed, dtype=torch.float32, shard="20KB", vocab=96, tie=False, like=None):
    """A random tiny Llama saved as sharded safetensors; ``like`` perturbs another model instead of a fresh init."""
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(_config(vocab, tie))
    if like is not None:
        src = transformers.LlamaForCausalLM.from_pretrained(like, dtype=torch.float32)
        sd = src.state_dict()
        with torch.no_grad():
            for k, v in m.state_dict().items():
                if k in sd and sd[k].shape == v.shape:
                    v.copy_(sd[k] + 0.01 * torch.randn_like(sd[k]))
                elif k in sd:  # grown vocabulary: keep the shared rows close
                    v[: sd[k].shape[0]].copy_(sd[k])
    m.to(dtype).save_pretrained(path, max_shard_size=shard)
    return path


def _state(path):
    return {k: v for k, v in _load(path).items()}


def _load(path):
    w = ModelWeights(path)
    out = {n: w.read_rows(n).clone() for n in w.names()}
    w.close()
    return out


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    d = tmp_path_factory.mktemp("trio")
    base = _model(d / "base", 0)
    instruct = _model(d / "instruct", 1, like=base, shard="30KB")
    cpt = _model(d / "cpt", 2, like=base, shard="45KB")
    return base, instruct, cpt


def test_inputs_are_sharded_differently(trio):
    shard_sets = [sorted({ModelWeights(p).tensors[n].file.name for n in ModelWeights(p).names()}) for p in trio]
    assert all(len(s) > 2 for s in shard_sets)
    maps = [json.loads((p / "model.safetensors.index.json").read_text())["weight_map"] for p in trio]
    assert maps[0] != maps[1] != maps[2]


def test_residual_matches_reference_and_loads_in_transformers(trio, tmp_path):
    base, instruct, cpt = trio
    rep = r.add_instruction_residual(base, instruct, cpt, tmp_path / "out", alpha=1.0, max_shard_bytes=40_000)
    b, i, c, o = _state(base), _state(instruct), _state(cpt), _state(tmp_path / "out")
    assert set(o) == set(c) and rep.tensors == len(c)
    for k in c:
        assert torch.equal(o[k], c[k] + (i[k] - b[k])), k
    # written with our streaming writer, read by the reference library and by transformers
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    for name, fname in index["weight_map"].items():
        with safe_open(tmp_path / "out" / fname, framework="pt") as f:
            assert torch.equal(f.get_tensor(name), o[name])
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    manifest = json.loads((tmp_path / "out" / r.RESIDUAL_MANIFEST).read_text())
    assert manifest["alpha"] == 1.0 and set(manifest["inputs"]) == {"base", "instruct", "cpt"}
    assert (tmp_path / "out" / "config.json").read_text() == (instruct / "config.json").read_text()


def test_identity_and_alpha_zero_give_cpt_back_exactly(trio, tmp_path):
    base, _, cpt = trio
    r.add_instruction_residual(base, base, cpt, tmp_path / "identity")
    r.add_instruction_residual(base, trio[1], cpt, tmp_path / "zero", alpha=0.0)
    c = _state(cpt)
    for name in ("identity", "zero"):
        o = _state(tmp_path / name)
        assert all(torch.equal(o[k], c[k]) for k in c), name


def test_linearity_and_saved_residual_portability(trio, tmp_path):
    base, instruct, cpt = trio
    r.save_instruction_residual(base, instruct, tmp_path / "res")
    r.apply_residual(tmp_path / "res", cpt, tmp_path / "half", alpha=0.5)
    r.apply_residual(tmp_path / "res", tmp_path / "half", tmp_path / "half2", alpha=0.5)
    r.add_instruction_residual(base, instruct, cpt, tmp_path / "full", alpha=1.0)
    full, half2, half = _state(tmp_path / "full"), _state(tmp_path / "half2"), _state(tmp_path / "half")
    for k in full:
        assert torch.allclose(half2[k], full[k], atol=1e-6), k
        assert not torch.equal(half[k], full[k]) or torch.equal(_state(base)[k], _state(instruct)[k])
    # the saved residual applied at alpha 1 equals the direct computation (fp32 residual of fp32 models)
    r.apply_residual(tmp_path / "res", cpt, tmp_path / "applied", alpha=1.0)
    applied = _state(tmp_path / "applied")
    assert all(torch.equal(applied[k], full[k]) for k in full)


def test_bf16_rounds_once_from_fp32(tmp_path):
    base = _model(tmp_path / "b", 0, dtype=torch.bfloat16)
    instruct = _model(tmp_path / "i", 1, like=base, dtype=torch.bfloat16)
    cpt = _model(tmp_path / "c", 2, like=base, dtype=torch.bfloat16, shard="1MB")
    r.add_instruction_residual(base, instruct, cpt, tmp_path / "o", alpha=0.7)
    b, i, c, o = _state(base), _state(instruct), _state(cpt), _state(tmp_path / "o")
    for k in c:
        assert o[k].dtype == torch.bfloat16
        exact = c[k].double() + 0.7 * (i[k].double() - b[k].double())
        assert torch.equal(o[k], exact.float().to(torch.bfloat16)), k  # fp32 compute, one rounding
    # rounding in bf16 at every step (a naive bf16 add) differs on some elements
    k = "model.layers.0.mlp.up_proj.weight"
    naive = c[k] + 0.7 * (i[k] - b[k])
    assert not torch.equal(naive, o[k])


def test_grown_vocabulary_rows_come_from_instruct(tmp_path):
    base = _model(tmp_path / "b", 0, vocab=96)
    instruct = _model(tmp_path / "i", 1, vocab=100, like=base)
    cpt = _model(tmp_path / "c", 2, vocab=96, like=base)
    rep = r.add_instruction_residual(base, instruct, cpt, tmp_path / "o", block_bytes=1000)
    assert set(rep.grown) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert rep.grown["lm_head.weight"] == {"base_rows": 96, "rows": 100}
    b, i, c, o = _state(base), _state(instruct), _state(cpt), _state(tmp_path / "o")
    e = "model.embed_tokens.weight"
    assert o[e].shape == (100, 32)
    assert torch.equal(o[e][:96], c[e] + (i[e][:96] - b[e]))
    assert torch.equal(o[e][96:], i[e][96:])
    # the saved residual carries the grown rows too
    r.save_instruction_residual(base, instruct, tmp_path / "res")
    r.apply_residual(tmp_path / "res", cpt, tmp_path / "o2")
    o2 = _state(tmp_path / "o2")
    assert all(torch.equal(o2[k], o[k]) for k in o)
    transformers.LlamaForCausalLM.from_pretrained(tmp_path / "o")  # config (vocab 100) from the instruct model


def test_tied_embeddings(tmp_path):
    base = _model(tmp_path / "b", 0, tie=True)
    instruct = _model(tmp_path / "i", 1, like=base, tie=True)
    cpt = _model(tmp_path / "c", 2, like=base, tie=True)
    r.add_instruction_residual(base, instruct, cpt, tmp_path / "o")
    o = _state(tmp_path / "o")
    assert "lm_head.weight" not in o
    m = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "o")
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_mismatches_name_the_tensor(trio, tmp_path):
    base, instruct, _ = trio
    wide = _model(tmp_path / "wide", 3, vocab=90)  # fewer rows than the base: not a grown vocabulary
    with pytest.raises(WeightsError, match=r"tensor (model\.embed_tokens|lm_head)\.weight: shapes differ"):
        r.add_instruction_residual(base, instruct, wide, tmp_path / "o")
    tied = _model(tmp_path / "tied", 3, tie=True)
    with pytest.raises(WeightsError, match=r"tensor lm_head\.weight is missing from the continually pre-trained"):
        r.add_instruction_residual(base, instruct, tied, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


def test_output_is_atomic_and_not_overwritten(trio, tmp_path):
    base, instruct, cpt = trio
    (tmp_path / "o").mkdir()
    with pytest.raises(WeightsError, match="exists"):
        r.add_instruction_residual(base, instruct, cpt, tmp_path / "o")
    r.add_instruction_residual(base, instruct, cpt, tmp_path / "o", overwrite=True)
    assert (tmp_path / "o" / r.RESIDUAL_MANIFEST).is_file()


def test_overwrite_swaps_the_output_in_one_step_and_temporary_names_carry_host_and_pid(trio, tmp_path):
    base, instruct, cpt = trio
    host = platform.node().replace("/", "_")
    assert r._Atomic(tmp_path / "o", True).tmp.name == f".o.tmp-{host}-{os.getpid()}"
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "old.txt").write_text("previous output")
    foreign = tmp_path / f".o.tmp-{host}x-{os.getpid()}"  # another node's run with the same pid, in flight
    foreign.mkdir()
    (foreign / "part").write_text("theirs")
    wide = _model(tmp_path / "wide", 3, vocab=90)
    with pytest.raises(WeightsError, match="shapes differ"):  # a failed --overwrite run leaves the old output
        r.add_instruction_residual(base, instruct, wide, tmp_path / "o", overwrite=True)
    assert (tmp_path / "o" / "old.txt").read_text() == "previous output"
    r.add_instruction_residual(base, instruct, cpt, tmp_path / "o", overwrite=True)
    assert (tmp_path / "o" / r.RESIDUAL_MANIFEST).is_file() and not (tmp_path / "o" / "old.txt").exists()
    assert (foreign / "part").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.glob(".o.*")) == [foreign.name]  # no temporary or set-aside folder left


def _raw_safetensors(path, header: dict, data: bytes) -> None:
    """Write a safetensors file byte by byte (a crafted header the library itself would not write)."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


F32x4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


@pytest.mark.parametrize("header,data,message", [
    ({"a": {**F32x4, "dtype": "F8_E9"}}, bytes(16), "tensor a has unsupported dtype F8_E9"),
    ({"a": F32x4}, bytes(8), "the tensors end at byte .* but the file has .* bytes \\(truncated\\)"),
    ({"a": F32x4}, bytes(24), "the tensors end at byte .* \\(trailing data\\)"),
    ({"a": {**F32x4, "data_offsets": [16, 0]}}, bytes(16), "tensor a: data_offsets \\[16, 0\\] is not"),
    ({"a": {**F32x4, "data_offsets": [0, 12]}}, bytes(12), "tensor a: 12 bytes do not hold F32 \\[4\\]"),
    ({"a": {**F32x4, "shape": [-4]}}, bytes(16), "tensor a: shape \\[-4\\] is not"),
    ({"a": F32x4, "b": {**F32x4, "data_offsets": [8, 24]}}, bytes(24), "tensor b: .* overlaps the tensor before it"),
    ({"a": F32x4, "b": {**F32x4, "data_offsets": [20, 36]}}, bytes(36), "tensor b: .* leaves a gap of 4 bytes"),
    ({"a": {**F32x4, "data_offsets": [4, 20]}}, bytes(20), "tensor a: .* leaves a gap of 4 bytes"),
    ({"a": "F32"}, bytes(16), "tensor a: header entry is not an object"),
], ids=["dtype", "truncated", "trailing", "reversed", "size", "shape", "overlap", "gap", "start-gap", "entry"])
def test_a_bad_safetensors_header_is_refused_naming_the_file_and_tensor(tmp_path, header, data, message):
    _raw_safetensors(tmp_path / "model.safetensors", {"__metadata__": {"format": "pt"}, **header}, data)
    with pytest.raises(WeightsError, match="model.safetensors: " + message) as err:
        ModelWeights(tmp_path)
    assert len(str(err.value).splitlines()) == 1


def test_a_header_longer_than_its_file_or_not_an_object_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(WeightsError, match="header length 1000 bytes, file 10 bytes"):
        ModelWeights(tmp_path)
    _raw_safetensors(path, [], b"")
    with pytest.raises(WeightsError, match="header is a JSON list"):
        ModelWeights(tmp_path)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/model.safetensors", ".."])
def test_an_index_naming_a_file_outside_the_model_folder_is_refused(tmp_path, name):
    (tmp_path / "m").mkdir()
    _raw_safetensors(tmp_path / "outside.safetensors", {"a": F32x4}, bytes(16))
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": name}}))
    with pytest.raises(WeightsError, match=f"index.json: tensor a: file '{re.escape(name)}' is not a file name inside"):
        ModelWeights(tmp_path / "m")


def test_writer_rejects_out_of_plan_data(tmp_path):
    w = ShardedWriter(tmp_path, [PlannedTensor("a", torch.float32, (2, 2))], max_shard_bytes=100)
    with pytest.raises(WeightsError, match="written where a was planned"):
        w.write("b", torch.zeros(2, 2))
    w.write("a", torch.ones(1, 2))
    with pytest.raises(WeightsError, match="not completely written"):
        w.close()


def test_cli(trio, tmp_path, capsys):
    base, instruct, cpt = trio
    assert main(["residual", "--base", str(base), "--instruct", str(instruct), "--cpt", str(cpt),
                 "--output", str(tmp_path / "o"), "--alpha", "0.5", "--max-shard-size", "0.00004"]) == 0
    assert "wrote" in capsys.readouterr().out
    o, ref = _state(tmp_path / "o"), load_file  # noqa: F841 - reference reader imported above
    assert len(json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())["weight_map"]) == len(o)
    assert main(["residual", "--base", str(base), "--cpt", str(cpt)]) == 2
    assert "give --base, --instruct" in capsys.readouterr().err
    assert main(["residual", "--residual", str(base), "--cpt", str(cpt), "--output", str(tmp_path / "x")]) == 2
    assert "not a saved instruction residual" in capsys.readouterr().err
