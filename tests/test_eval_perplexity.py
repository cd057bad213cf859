"""Held-out perplexity (windows, per component, both scorers), greedy generation on the megatron model, and
`ipt eval --task perplexity` on a trained tiny checkpoint against its initialisation."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from megatron_ipt.cli import main
from megatron_ipt.evaluate import perplexity
from megatron_ipt.evaluate.rc import EvalDataError

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import VOCAB, make_tokenized_dir, tiny_config, write_indexed  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-path tests")


def test_windows_predict_every_token_but_the_first_once():
    assert perplexity.windows(10, 4) == [(0, 5), (4, 9), (8, 10)]
    assert sum(end - start - 1 for start, end in perplexity.windows(10, 4)) == 9
    assert perplexity.windows(5, 4) == [(0, 5)]
    assert perplexity.windows(1, 4) == [] and perplexity.windows(0, 4) == []


def test_window_nll_on_known_logits():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # p(1) = 3/4, then p(0) = 1/2
    assert perplexity.window_nll(logits, torch.tensor([1, 0])) == pytest.approx(-math.log(0.75) - math.log(0.5))


def test_components_and_empty_sets_name_the_file(tmp_path):
    with pytest.raises(EvalDataError, match=f"{tmp_path}: no held-out indexed dataset"):
        perplexity.components(tmp_path)
    write_indexed(tmp_path / "heldout_raw", [np.array([], dtype=np.int32)])
    assert perplexity.components(tmp_path) == {"raw": tmp_path / "heldout_raw"}
    with pytest.raises(EvalDataError, match=r"heldout_raw\.bin: 0 token"):
        perplexity.evaluate_perplexity(None, perplexity.components(tmp_path), 8)


def test_blend_extra_and_per_split_held_out_datasets_are_components(tmp_path):
    from megatron_ipt.config import BlendComponent

    tokenized = make_tokenized_dir(tmp_path / "tokenized", train_docs=2, heldout_docs=2)
    write_indexed(tmp_path / "general_valid", [np.arange(1, 20, dtype=np.int32)])
    extra = [BlendComponent(prefix=str(tmp_path / "general"), weight=0.1, name="general",
                            valid_prefix=str(tmp_path / "general_valid")),
             BlendComponent(prefix=str(tmp_path / "code"), weight=0.1, name="code")]
    assert perplexity.components(tokenized, extra) == {"raw": tokenized / "heldout_raw",
                                                       "pairs": tokenized / "heldout_pairs",
                                                       "general": tmp_path / "general_valid"}
    from megatron_ipt.config import PerSplitBlend, SplitComponent

    general = SplitComponent(prefix=str(tmp_path / "general_valid"))
    per_split = PerSplitBlend(train=[SplitComponent(prefix="train_raw")],
                              valid=[SplitComponent(prefix="heldout_raw"), general], test=[general])
    assert perplexity.components(tokenized, per_split=per_split) == {
        "raw": tokenized / "heldout_raw", "pairs": tokenized / "heldout_pairs",
        "valid.general_valid": tmp_path / "general_valid"}  # each dataset once
    extra[1].valid_prefix = str(tmp_path / "missing")
    with pytest.raises(EvalDataError, match=f"{tmp_path / 'missing'}.bin/.idx: held-out dataset of blend.extra 'code'"):
        perplexity.components(tokenized, extra)


def test_hf_perplexity_equals_the_models_own_loss_on_one_window(tmp_path):
    transformers = pytest.importorskip("transformers")
    from megatron_ipt.evaluate.scorers import HFScorer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    tokens = np.random.default_rng(0).integers(0, VOCAB, 40)
    with HFScorer(tmp_path / "hf") as scorer:
        one = perplexity.component_perplexity(scorer, tokens, seq_length=64)
        split = perplexity.component_perplexity(scorer, tokens, seq_length=13)
        ids = torch.tensor([tokens.tolist()])
        with torch.no_grad():
            loss = float(scorer.model(ids, labels=ids).loss)
        with pytest.raises(EvalDataError, match="x.bin: token id 255 outside the model's vocabulary"):
            perplexity.component_perplexity(scorer, np.array([1, VOCAB + 5]), 8, source="x.bin")
    assert one["windows"] == 1 and one["predicted_tokens"] == 39 and one["nll"] == pytest.approx(loss, rel=1e-5)
    assert one["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert split["windows"] == 3 and split["predicted_tokens"] == 39  # shorter contexts, same tokens predicted


def test_megatron_and_hf_scorers_agree_on_a_checkpoint_padded_for_tensor_parallel_2(tmp_path):
    """A checkpoint saved for TP 2 (vocabulary 300 padded to 512 with zero rows, not TP 1's 384) loads into the
    world-size-1 scorer; with the padding rows cut from its logits, its perplexity equals the Hugging Face original's."""
    transformers = pytest.importorskip("transformers")
    from megatron_ipt.hf import convert
    from megatron_ipt.errors import IptError
    from megatron_ipt.evaluate.scorers import HFScorer, MegatronScorer

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      rope_theta=500000.0, rms_norm_eps=1e-5)
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path / "hf")
    convert.hf_to_megatron(tmp_path / "hf", tmp_path / "mg", tensor_model_parallel_size=2)
    tokenized = make_tokenized_dir(tmp_path / "tokenized", train_docs=2, heldout_docs=6)
    prefixes = perplexity.components(tokenized)
    cfg = tiny_config(model__hf_config=str(tmp_path / "mg" / "hf"))
    with MegatronScorer(cfg, VOCAB, tmp_path / "mg") as scorer:
        megatron = perplexity.evaluate_perplexity(scorer, prefixes, 64)
    with HFScorer(tmp_path / "hf", vocab_size=VOCAB) as scorer:
        hf = perplexity.evaluate_perplexity(scorer, prefixes, 64)
    for key in ("raw_nll", "pairs_nll"):
        assert megatron["metrics"][key] == pytest.approx(hf["metrics"][key], rel=1e-5), key
    with pytest.raises(IptError, match=f"{tmp_path / 'hf'}: vocabulary of 300 tokens is smaller"):
        with HFScorer(tmp_path / "hf", vocab_size=1000):
            pass


def test_megatron_greedy_generation_is_the_argmax_of_its_own_logits():
    from megatron_ipt.evaluate.scorers import MegatronScorer

    with MegatronScorer(tiny_config(), VOCAB, None) as scorer:
        prompt = [5, 6, 7, 8]
        out = scorer.generate(prompt, 6)
        logits = scorer.logits(prompt + out)
    assert len(out) == 6
    assert logits[len(prompt) - 1 : -1].argmax(-1).tolist() == out


def test_rc_free_form_answers_through_the_megatron_model(tiny_tokenizer_dir):
    from data_prep.encoders import load_encoder
    from megatron_ipt.evaluate.run import evaluate_rc
    from megatron_ipt.evaluate.scorers import MegatronScorer

    encoder = load_encoder(tiny_tokenizer_dir)
    docs = [{"id": "a", "text": "The while loop repeats.", "pairs": [{"question": "What repeats?", "answer": "The loop"}]}]
    with MegatronScorer(tiny_config(), encoder.vocab_size, None) as scorer:
        result = evaluate_rc(scorer, encoder, docs, shots=0, max_length=64, max_new_tokens=4)
    (g,) = result["generations"]
    assert g["reference"] == "The loop" and isinstance(g["prediction"], str)
    assert result["metrics"]["exact_match"] == g["exact_match"] and 0.0 <= result["metrics"]["f1"] <= 1.0
    with pytest.raises(EvalDataError, match="must be under half of max_length 64"):
        evaluate_rc(None, encoder, docs, shots=0, max_length=64, max_new_tokens=32)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run folder with the tiny tokenized datasets and 12 training iterations (counting documents)."""
    from megatron_ipt.pipeline import stage_path
    from megatron_ipt.training.train import train_stage

    root = tmp_path_factory.mktemp("run")
    cfg = tiny_config(train_iters=12, eval_iters=1)
    cfg.run_dir = str(root / "run")
    tokenized = make_tokenized_dir(stage_path(cfg, "tokenize"), train_docs=200, heldout_docs=12)
    train_stage(cfg, tokenized, stage_path(cfg, "train"), "fp-eval")
    config = root / "exp.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return config, cfg


def test_trained_checkpoint_has_lower_heldout_perplexity_than_its_initialisation(trained_run, tmp_path, capsys):
    config, cfg = trained_run
    assert main(["eval", str(config), "--task", "perplexity", "--output", str(tmp_path / "trained.json")]) == 0
    assert main(["eval", str(config), "--task", "perplexity", "--init", "--output", str(tmp_path / "init.json")]) == 0
    trained, init = (json.loads((tmp_path / f).read_text()) for f in ("trained.json", "init.json"))
    assert trained["task"] == "heldout_perplexity" and trained["model"]["iteration"] == 12
    assert set(trained["components"]) == {"raw", "pairs"}
    raw = trained["components"]["raw"]
    assert raw["predicted_tokens"] == raw["tokens"] - 1 and raw["windows"] == math.ceil((raw["tokens"] - 1) / 64)
    assert abs(init["metrics"]["raw_nll"] - math.log(VOCAB)) < 0.5  # untrained: about uniform over the vocabulary
    for key in ("raw", "pairs"):
        assert trained["metrics"][f"{key}_nll"] < init["metrics"][f"{key}_nll"] - 0.5
        assert trained["metrics"][f"{key}_perplexity"] == pytest.approx(math.exp(trained["metrics"][f"{key}_nll"]))
    capsys.readouterr()
    assert main(["eval", "compare", str(tmp_path / "init.json"), str(tmp_path / "trained.json")]) == 0
    out = capsys.readouterr().out
    assert "| task | metric | init | " in out and "| heldout_perplexity | raw_perplexity |" in out


def test_a_checkpoint_that_does_not_fit_the_model_config_names_it(trained_run, capsys):
    config, cfg = trained_run
    assert main(["eval", str(config), "--task", "perplexity", "--set", "model.num_layers=3", "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not match the model config" in err and str(cfg.run_path / "train" / "checkpoints") in err
    assert len(err.splitlines()) == 1


def test_windows_scored_in_batches_give_batch_1s_perplexity(tmp_path):
    """8 full windows and a shorter last one, scored 1, 3 and 8 at a time (the last batch padded after its
    short window) by the megatron scorer and by transformers: the same NLL up to float rounding."""
    transformers = pytest.importorskip("transformers")
    from megatron_ipt.evaluate.scorers import HFScorer, MegatronScorer

    tokens = np.random.default_rng(1).integers(0, VOCAB, 200)
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path / "hf")
    for scorer in (MegatronScorer(tiny_config(), VOCAB, None), HFScorer(tmp_path / "hf")):
        with scorer:
            runs = {b: perplexity.component_perplexity(scorer, tokens, 24, batch_size=b) for b in (1, 3, 8)}
            with pytest.raises(ValueError, match="batch size must be at least 1"):
                perplexity.component_perplexity(scorer, tokens, 24, batch_size=0)
        assert runs[1]["windows"] == 9 and runs[1]["predicted_tokens"] == 199
        for b in (3, 8):
            assert runs[b]["predicted_tokens"] == 199
            assert runs[b]["nll"] == pytest.approx(runs[1]["nll"], rel=1e-6), (type(scorer).__name__, b)
