"""The temporary Hugging Face export behind `ipt eval --harness` on a Megatron checkpoint (no lm-eval needed):
where its config and tokenizer come from, that it holds the checkpoint's model, and that it is removed on exit
and on error."""

from __future__ import annotations

import shutil

import pytest
import torch
from fixtures_eval import tiny_export

from megatron_ipt.evaluate import hf_export
from megatron_ipt.evaluate.hf_export import ExportError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_tokenizer_dir):
    """A random 1-layer Llama with the tiny tokenizer (Hugging Face) and its `ipt convert hf-to-megatron` checkpoint."""
    from megatron_ipt.hf import convert

    root = tmp_path_factory.mktemp("export")
    tiny_export(root / "hf", tiny_tokenizer_dir)
    convert.hf_to_megatron(root / "hf", root / "mg")
    return root


def test_reference_folder_order_and_errors(converted, tmp_path):
    mg, hf = converted / "mg", converted / "hf"
    assert hf_export.reference_folder(mg) == mg / "hf"  # stored by hf-to-megatron next to the checkpoint
    assert hf_export.reference_folder(mg / "iter_0000000") == mg / "hf"
    assert hf_export.reference_folder(mg, model_hf_config=str(hf / "config.json")) == hf
    assert hf_export.reference_folder(mg, hf, model_hf_config=str(tmp_path)) == hf  # --hf-config-from first
    with pytest.raises(ExportError, match=f"^{tmp_path}: no Hugging Face config to export it with: pass --hf-"):
        hf_export.reference_folder(tmp_path)
    with pytest.raises(ExportError, match=f"^{tmp_path}: no config.json \\(model.hf_config must be"):
        hf_export.reference_folder(mg, model_hf_config=str(tmp_path))


def test_export_holds_the_checkpoint_and_is_removed_on_exit_and_on_error(converted, tmp_path):
    ids = torch.tensor([[1, 5, 9, 300, 2]])
    with torch.no_grad():
        expected = transformers.AutoModelForCausalLM.from_pretrained(converted / "hf").eval()(ids).logits
    with hf_export.exported(converted / "mg", reference=converted / "hf", work_dir=tmp_path / "work") as e:
        assert e.folder.parent.parent == tmp_path / "work" and e.folder.parent.name.startswith(".hf-export-")
        assert e.iteration == 0 and e.checkpoint == converted / "mg" / "iter_0000000" and e.dtype == "float32"
        assert (e.folder / "tokenizer.json").is_file() and len(e.reference_config_sha256) == 64
        with torch.no_grad():
            got = transformers.AutoModelForCausalLM.from_pretrained(e.folder).eval()(ids).logits
        assert torch.equal(got, expected)
    assert list((tmp_path / "work").iterdir()) == []
    with pytest.raises(RuntimeError, match="boom"):
        with hf_export.exported(converted / "mg", reference=converted / "hf", work_dir=tmp_path / "work"):
            raise RuntimeError("boom")
    assert list((tmp_path / "work").iterdir()) == []


def test_a_config_written_from_the_model_preset_exports_the_same_model(converted, tmp_path, tiny_tokenizer_dir):
    """No Hugging Face folder at all: config.json from the experiment's preset and tokenizer, same logits."""
    from megatron_ipt.training.presets import PRESETS, preset_from_hf_config

    preset = preset_from_hf_config(converted / "hf")
    ref = hf_export.preset_reference(preset, tmp_path / "ref", vocab_size=512, tokenizer=tiny_tokenizer_dir)
    assert preset_from_hf_config(ref) == preset and (ref / "tokenizer.json").is_file()
    # RoPE scaling, QKV bias, QK-norm, head_dim and tied embeddings read back too
    for name in ("llama3.1-8b", "qwen2.5-7b", "qwen3-0.6b", "llama3.2-1b", "mistral-7b", "qwen3-30b-a3b", "mixtral-8x7b"):
        hf_export.preset_reference(PRESETS[name], tmp_path / name, vocab_size=1000, tokenizer=tiny_tokenizer_dir)
    ids = torch.tensor([[1, 5, 9, 300, 2]])
    with torch.no_grad():
        expected = transformers.AutoModelForCausalLM.from_pretrained(converted / "hf").eval()(ids).logits
    with hf_export.exported(converted / "mg", reference=None, work_dir=tmp_path / "w", preset=preset,
                            vocab_size=512, tokenizer_dir=tiny_tokenizer_dir) as e:
        assert e.reference is None
        with torch.no_grad():
            got = transformers.AutoModelForCausalLM.from_pretrained(e.folder).eval()(ids).logits
        assert torch.equal(got, expected)
    with pytest.raises(ExportError, match="no Hugging Face config to export the checkpoint with and the "
                                          r"experiment's tokenizer \(None\)"):
        hf_export.preset_reference(preset, tmp_path / "x", vocab_size=512, tokenizer=None)
    assert list((tmp_path / "w").iterdir()) == []


def test_tokenizer_from_the_experiment_when_the_reference_has_none(converted, tmp_path, tiny_tokenizer_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(converted / "hf" / "config.json", bare / "config.json")
    with hf_export.exported(converted / "mg", reference=bare, work_dir=tmp_path / "w",
                            tokenizer_dir=tiny_tokenizer_dir) as e:
        assert (e.folder / "tokenizer.json").is_file()
    with pytest.raises(ExportError, match=f"^{bare}: no tokenizer files"):
        with hf_export.exported(converted / "mg", reference=bare, work_dir=tmp_path / "w"):
            pass
    assert list((tmp_path / "w").iterdir()) == []
    with pytest.raises(ExportError, match=f"^{tmp_path}: not a torch_dist checkpoint"):
        with hf_export.exported(tmp_path, reference=bare, work_dir=tmp_path / "w"):
            pass
