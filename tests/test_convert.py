"""Hugging Face <-> Megatron conversion on tiny random Llama / Mistral (with and without sliding window) / Qwen2 /
Qwen3 / Qwen3-MoE / Mixtral models: megatron-core's logits (CPU
backend, fp32) equal transformers' within 1e-4, and HF -> Megatron -> HF is bit-identical."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_ipt.training import checkpoint

from megatron_ipt.hf import convert
from megatron_ipt.cli import main
from megatron_ipt.training.model import build_model
from megatron_ipt.training.presets import padded_vocab_size, preset_from_hf_config
from megatron_ipt.hf.safetensors_stream import ModelWeights

transformers = pytest.importorskip("transformers")

SIZES = dict(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
CASES = {
    "llama3": lambda: transformers.LlamaConfig(**SIZES, rope_theta=500000.0, rms_norm_eps=1e-5),
    "llama3.1-rope-scaling": lambda: transformers.LlamaConfig(
        **SIZES, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}),
    "qwen2-bias": lambda: transformers.Qwen2Config(**SIZES, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "qwen2-tied": lambda: transformers.Qwen2Config(**SIZES, rope_theta=1000000.0, tie_word_embeddings=True),
    # Qwen3: QK-norm, head_dim 24 != 64 / 4, one KV head, tied embeddings (the small sizes)
    "qwen3-qk-norm-head-dim": lambda: transformers.Qwen3Config(
        **{**SIZES, "num_key_value_heads": 1}, head_dim=24, rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3-untied": lambda: transformers.Qwen3Config(**SIZES, head_dim=24, rope_theta=1000000.0),
    # Llama 3.2: tied embeddings, RoPE scaled by 32
    "llama3.2-tied-rope32": lambda: transformers.LlamaConfig(
        **SIZES, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}),
    "mistral": lambda: transformers.MistralConfig(**SIZES, rope_theta=1000000.0, sliding_window=None),
    # Mistral 7B v0.1's sliding-window attention, the window (8) shorter than the 24 tokens compared
    "mistral-sliding-window": lambda: transformers.MistralConfig(**SIZES, sliding_window=8),
    # mixture of experts: 4 experts of 48, top-2; Qwen3-MoE keeps the softmax weights of the top 2 (norm_topk_prob
    # false: megatron's pre-softmax router), Mixtral renormalises them
    "qwen3-moe": lambda: transformers.Qwen3MoeConfig(
        **SIZES, head_dim=24, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=False,
        rope_theta=1000000.0),
    "mixtral": lambda: transformers.MixtralConfig(**{**SIZES, "intermediate_size": 48}, num_local_experts=4,
                                                  num_experts_per_tok=2, rope_theta=1000000.0, sliding_window=None),
    "mixtral-sliding-window": lambda: transformers.MixtralConfig(**{**SIZES, "intermediate_size": 48},
                                                                 num_local_experts=4, num_experts_per_tok=2,
                                                                 sliding_window=5),
}


def hf_model(path, case):
    torch.manual_seed(0)
    cfg = CASES[case]()
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # non-trivial norms and biases, so a swapped tensor cannot pass
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    model.save_pretrained(path, max_shard_size="60KB")
    return model.eval()


def megatron_outputs(ckpt, hf_folder, tokens, vocab_multiple_tp=1):
    """Logits [b, s, V] (padding cut), per-token losses [b, s] (next token as label) and the RoPE inverse
    frequencies [d/2] of the converted checkpoint in a TP=1 megatron-core model (CPU backend, fp32)."""
    preset = preset_from_hf_config(hf_folder)
    with convert.one_process_world(preset) as layout:
        model = build_model(preset, layout, vocab_size=padded_vocab_size(preset.vocab_size, vocab_multiple_tp),
                            seq_length=tokens.shape[1], device=torch.device("cpu"))
        checkpoint.load_model_weights(ckpt, model)
        model.eval()
        with torch.no_grad():
            pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
            logits = model(input_ids=tokens, position_ids=pos, attention_mask=None)
            losses = model(input_ids=tokens, position_ids=pos, attention_mask=None, labels=tokens.roll(-1, dims=1))
        return logits[..., : preset.vocab_size].clone(), losses.clone(), model.rotary_pos_emb.inv_freq.clone()


def megatron_logits(ckpt, hf_folder, tokens):
    return megatron_outputs(ckpt, hf_folder, tokens)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_and_round_trip_is_bit_identical(case, tmp_path):
    model = hf_model(tmp_path / "hf", case)
    manifest = convert.hf_to_megatron(tmp_path / "hf", tmp_path / "mg")
    assert manifest["padded_vocab_size"] == 256 and (tmp_path / "mg" / "latest").read_text().strip() == "0"
    tokens = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits
    got, _, inv_freq = megatron_outputs(tmp_path / "mg", tmp_path / "hf", tokens)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()
    # RoPE (with Llama 3.1 / 3.2 scaling: its effect on 24 positions is below the logits tolerance)
    assert torch.allclose(inv_freq, model.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    convert.megatron_to_hf(tmp_path / "mg", tmp_path / "back")
    back = type(model).from_pretrained(tmp_path / "back")
    a, b = model.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    files = json.loads((tmp_path / "back" / convert.CONVERT_MANIFEST).read_text())["hf_files"]
    assert "config.json" in files


def test_sliding_window_holds_in_kv_cached_and_left_padded_batched_generation(tmp_path):
    """Mistral with an 8-token window: greedy ids from megatron-core's KV cache (the prompt, then one token at a
    time: the window mask aligned to the cache position) and from the left-padded batch over one cache (the
    padding mask and the window together) equal transformers' greedy ids without a cache."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from train_fixtures import tiny_config

    from megatron_ipt.evaluate.scorers import MegatronScorer

    model = hf_model(tmp_path / "hf", "mistral-sliding-window")
    convert.hf_to_megatron(tmp_path / "hf", tmp_path / "mg")
    prompts = [[5, 6, 7], list(range(3, 60, 5)), [150, 17, 17, 90, 4, 4, 199, 1, 33, 8, 120, 60, 61, 2]]
    expected = []
    for prompt in prompts:
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(10):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        expected.append(ids[len(prompt):])
    with MegatronScorer(tiny_config(model__hf_config=str(tmp_path / "hf")), 200, tmp_path / "mg") as scorer:
        single = [scorer.generate(p, 10) for p in prompts]
        batched = scorer.generate_batch(prompts, 10)
        assert scorer.no_kv_cache is None and scorer.no_batched_kv_cache is None
    assert single == expected and batched == expected


def test_unfused_attention_backend_refuses_a_sliding_window():
    from megatron_ipt.training.attention import AttentionBackendError
    from megatron_ipt.training.model import layer_spec

    with pytest.raises(AttentionBackendError, match="^model.attention_backend = unfused: .*sliding_window 8"):
        layer_spec(torch.device("cpu"), attention_backend="unfused", sliding_window=8)
    assert layer_spec(torch.device("cpu"), attention_backend="sdpa", sliding_window=8) is not None

def test_loading_a_checkpoint_prints_no_library_deprecation_warnings(tmp_path):
    """megatron-core's torch_dist load calls torch's deprecated ``load_state_dict`` and ShardedTensor: FutureWarnings
    the user cannot act on, printed on every load unless the seam silences them."""
    import warnings

    hf_model(tmp_path / "hf", "llama3")
    convert.hf_to_megatron(tmp_path / "hf", tmp_path / "mg")
    tokens = torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        megatron_logits(tmp_path / "mg", tmp_path / "hf", tokens)
    assert not [str(w.message) for w in seen if issubclass(w.category, FutureWarning)]


def test_a_conversion_redirected_to_a_log_reports_progress_lines_on_stderr(tmp_path, capfd, monkeypatch):
    """With output going to a file (Slurm, nohup), both directions print plain progress lines on stderr: the
    import counts parameters and announces the checkpoint write, the export counts bytes; progress=False is quiet."""
    monkeypatch.setenv("IPT_PROGRESS_SECONDS", "0")
    hf_model(tmp_path / "hf", "llama3")
    capfd.readouterr()
    convert.hf_to_megatron(tmp_path / "hf", tmp_path / "mg")
    convert.megatron_to_hf(tmp_path / "mg", tmp_path / "back")
    err = capfd.readouterr().err
    assert "convert: 1/" in err and "parameters (100%)" in err
    assert "convert: writing the torch_dist checkpoint" in err
    total = sum(p.numel() * 4 for p in transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").parameters())
    assert f"/{total / 1e3:.2f} kB (100%)" in err or f"/{total / 1e6:.2f} MB (100%)" in err
    convert.megatron_to_hf(tmp_path / "mg", tmp_path / "quiet", progress=False)
    assert "convert:" not in capfd.readouterr().err


def scratch_bytes(model, itemsize):
    """Bytes of the megatron tensors that are not one slice of one Hugging Face tensor: fused QKV (weights and
    biases) and the embedding / output layer (padded from 200 to 256 rows)."""
    sd = model.state_dict()
    qkv = sum(v.numel() for k, v in sd.items() if any(f"self_attn.{x}_proj" in k for x in "qkv"))
    vocab = 256 * model.config.hidden_size * (1 if model.config.tie_word_embeddings else 2)
    return (qkv + vocab) * itemsize


def test_import_maps_plain_tensors_from_the_safetensors_files_and_assembles_only_fused_or_padded_ones(tmp_path):
    model = hf_model(tmp_path / "hf", "qwen2-bias")
    manifest = convert.hf_to_megatron(tmp_path / "hf", tmp_path / "mg")
    assert manifest["scratch_bytes"] == scratch_bytes(model, 4)
    assert not (tmp_path / "mg" / convert.SCRATCH_DIR).exists()


def test_bfloat16_import_casts_every_tensor_once_and_exports_the_rounded_weights(tmp_path):
    model = hf_model(tmp_path / "hf", "qwen2-bias")
    manifest = convert.hf_to_megatron(tmp_path / "hf", tmp_path / "mg", dtype="bfloat16")
    assert manifest["dtype"] == "bfloat16" and manifest["scratch_bytes"] == 2 * (
        sum(p.numel() for p in model.parameters()) + 56 * 64 * 2)  # every tensor cast; 56 padding rows twice
    convert.megatron_to_hf(tmp_path / "mg", tmp_path / "back", dtype="bfloat16")
    back = type(model).from_pretrained(tmp_path / "back", dtype=torch.bfloat16).state_dict()
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert set(back) == set(expected) and all(torch.equal(back[k], expected[k]) for k in back)


def test_tensor_parallel_padding_and_errors(tmp_path, capsys):
    hf_model(tmp_path / "hf", "llama3")
    assert main(["convert", "hf-to-megatron", str(tmp_path / "hf"), str(tmp_path / "mg"),
                 "--tensor-parallel-size", "2"]) == 0
    assert json.loads((tmp_path / "mg" / convert.CONVERT_MANIFEST).read_text())["padded_vocab_size"] == 256
    assert main(["convert", "hf-to-megatron", str(tmp_path / "hf"), str(tmp_path / "mg")]) == 2
    assert "exists" in capsys.readouterr().err
    # a TP size the query groups do not divide could never train: refused (issue 16, item 16)
    groups = json.loads((tmp_path / "hf" / "config.json").read_text())["num_key_value_heads"]
    assert main(["convert", "hf-to-megatron", str(tmp_path / "hf"), str(tmp_path / "mg-tp"),
                 "--tensor-parallel-size", str(groups + 1)]) == 2
    err = capsys.readouterr().err
    assert f"--tensor-parallel-size {groups + 1}:" in err and f"{groups} query groups" in err
    assert "can never train" in err and not (tmp_path / "mg-tp").exists()
    # a tensor missing from the source is named
    (tmp_path / "bad").mkdir()
    for f in (tmp_path / "hf").iterdir():
        (tmp_path / "bad" / f.name).write_bytes(f.read_bytes())
    index = json.loads((tmp_path / "bad" / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (tmp_path / "bad" / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["convert", "hf-to-megatron", str(tmp_path / "bad"), str(tmp_path / "mg2")]) == 2
    assert "model.layers.1.mlp.up_proj.weight is missing" in capsys.readouterr().err
    assert not (tmp_path / "mg2").exists()
    # exporting with a config the checkpoint does not fit names the tensor and leaves no output
    (tmp_path / "cfg3").mkdir()
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "cfg3" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    assert main(["convert", "megatron-to-hf", str(tmp_path / "mg"), str(tmp_path / "out"),
                 "--hf-config-from", str(tmp_path / "cfg3")]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "decoder.layers." in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_continual_pretraining_flow_convert_train_export(family, tmp_path):
    """HF model -> Megatron -> train.init_from (weights only) + model.hf_config -> HF export that loads and
    generates (Llama; Qwen3 with QK-norm, its own head size and tied embeddings; Mistral)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from train_fixtures import VOCAB, make_tokenized_dir, tiny_config

    from megatron_ipt.training.train import train_stage

    torch.manual_seed(0)
    sizes = {**SIZES, "vocab_size": VOCAB}
    cfg = {"llama": lambda: transformers.LlamaConfig(**sizes),
           "qwen3": lambda: transformers.Qwen3Config(**sizes, head_dim=24, tie_word_embeddings=True),
           "mistral": lambda: transformers.MistralConfig(**sizes, sliding_window=None)}[family]()
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "hf")
    convert.hf_to_megatron(tmp_path / "hf", tmp_path / "mg")
    tokenized = make_tokenized_dir(tmp_path / "tokenized", train_docs=60, heldout_docs=4)
    summary = train_stage(tiny_config(train_iters=3, eval_iters=1, init_from=str(tmp_path / "mg"),
                                      model__hf_config=str(tmp_path / "mg" / "hf")), tokenized, tmp_path / "run", "fp")
    assert summary["completed"] and summary["initialized_from"].endswith("iter_0000000")
    assert summary["padded_vocab_size"] == 256
    convert.megatron_to_hf(tmp_path / "run" / "checkpoints", tmp_path / "cpt", hf_config_from=tmp_path / "mg" / "hf")
    before = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "cpt").eval()
    after = model.state_dict()
    assert set(before) == set(after) and type(model).__name__.lower().startswith(family)
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    assert model.generate(torch.tensor([[5, 17, 33]]), max_new_tokens=4, do_sample=False).shape == (1, 7)


@pytest.mark.dist
def test_converted_checkpoint_loads_into_tp2_pp2_with_the_tp1_logits_and_losses(tmp_path):
    """4 gloo processes (TP=2 x PP=2, CPU): torch_dist reshards the converted checkpoint on load; logits and
    per-token losses equal the TP=1 model's within fp32 tolerance (untied Llama, and tied Qwen2 with QKV bias,
    whose output layer on the last stage loads from the embedding; Qwen3 with QK-norm and head_dim != H / heads).
    The weights saved again from that layout
    export to Hugging Face bit-identically (export reads any layout)."""
    import subprocess
    import sys
    from pathlib import Path

    tokens = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(3))
    torch.save(tokens, tmp_path / "tokens.pt")
    cases = ["llama3", "qwen2-tied", "qwen3-untied"]
    argv = []
    for case in cases:
        hf_model(tmp_path / f"{case}-hf", case)
        convert.hf_to_megatron(tmp_path / f"{case}-hf", tmp_path / f"{case}-mg", tensor_model_parallel_size=2)
        argv += ["--case", str(tmp_path / f"{case}-mg"), str(tmp_path / f"{case}-hf"), str(tmp_path / f"{case}.pt")]
    worker = Path(__file__).parent / "convert_dist_worker.py"
    result = subprocess.run([sys.executable, str(worker), str(tmp_path / "tokens.pt"), "--tp", "2", "--pp", "2", *argv],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    for case in cases:
        got = torch.load(tmp_path / f"{case}.pt")
        logits, losses, _ = megatron_outputs(tmp_path / f"{case}-mg", tmp_path / f"{case}-hf", tokens, vocab_multiple_tp=2)
        assert got["logits"].shape == logits.shape and got["losses"].shape == losses.shape
        assert torch.allclose(got["logits"], logits, atol=1e-5, rtol=0), (case, (got["logits"] - logits).abs().max())
        assert torch.allclose(got["losses"], losses, atol=1e-5, rtol=0), (case, (got["losses"] - losses).abs().max())
        # the same weights saved from the TP=2 x PP=2 layout export back to the source bit-identically
        convert.megatron_to_hf(tmp_path / f"{case}.resaved", tmp_path / f"{case}-back", hf_config_from=tmp_path / f"{case}-hf")
        source = ModelWeights(tmp_path / f"{case}-hf")
        back = ModelWeights(tmp_path / f"{case}-back")
        assert set(back.names()) == set(source.names())
        assert all(torch.equal(back.read_rows(n), source.read_rows(n)) for n in source.names())


@pytest.mark.dist
def test_converted_moe_checkpoint_loads_into_ep2_with_the_ep1_logits_and_losses(tmp_path):
    """2 gloo processes with expert parallel 2 (each holds 2 of the 4 Qwen3-MoE experts; the all-gather token
    dispatcher moves tokens between them): logits and per-token losses equal the EP=1 model's, and the weights
    saved again from that layout export to Hugging Face bit-identically."""
    case = "qwen3-moe"
    import subprocess
    import sys
    from pathlib import Path

    tokens = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(3))
    torch.save(tokens, tmp_path / "tokens.pt")
    hf_model(tmp_path / "hf", case)
    convert.hf_to_megatron(tmp_path / "hf", tmp_path / "mg")
    worker = Path(__file__).parent / "convert_dist_worker.py"
    result = subprocess.run([sys.executable, str(worker), str(tmp_path / "tokens.pt"), "--tp", "1", "--pp", "1",
                             "--ep", "2", "--case", str(tmp_path / "mg"), str(tmp_path / "hf"), str(tmp_path / "out.pt")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["local_experts"] == 2
    logits, losses, _ = megatron_outputs(tmp_path / "mg", tmp_path / "hf", tokens)
    assert torch.allclose(got["logits"], logits, atol=1e-5, rtol=0), (got["logits"] - logits).abs().max()
    assert torch.allclose(got["losses"], losses, atol=1e-5, rtol=0), (got["losses"] - losses).abs().max()
    convert.megatron_to_hf(tmp_path / "out.resaved", tmp_path / "back", hf_config_from=tmp_path / "hf")
    source, back = ModelWeights(tmp_path / "hf"), ModelWeights(tmp_path / "back")
    assert set(back.names()) == set(source.names())
    assert all(torch.equal(back.read_rows(n), source.read_rows(n)) for n in source.names())


@pytest.mark.e2e
def test_anonymous_memory_of_a_conversion_is_a_few_tensors_not_the_model(tmp_path):
    """A 316 MB synthetic Llama (8 layers, largest tensor 33 MB), each direction in a fresh process sampled by
    benchmarks/convert_memory.py: the peak anonymous memory above the process's start stays within a few of
    the largest tensors (the whole-model approach needs about 1.7x the model on import, 3x on export)."""
    import argparse
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "convert_memory.py"
    spec = importlib.util.spec_from_file_location("convert_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(layers=8, hidden=1024, ffn=4096, heads=8, kv_heads=4, vocab=16000, shard_mb=100)
    bench.write_model(tmp_path / "hf", args)
    from megatron_ipt.hf.safetensors_stream import ModelWeights

    weights = ModelWeights(tmp_path / "hf")
    model_mb, largest_mb = weights.total_bytes() / 2**20, max(t.nbytes for t in weights.tensors.values()) / 2**20
    assert model_mb > 9 * largest_mb
    for mode, bound in (("import", 4), ("export", 6)):
        run = bench.measure([sys.executable, str(path), "--child", mode, "--data-dir", str(tmp_path)])
        assert run["peak_anon_above_start_mb"] < bound * largest_mb, (mode, run, largest_mb)


@pytest.mark.e2e
def test_real_smollm2_converts_both_ways_bit_identically_with_transformers_logits(tmp_path):
    """SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3, tied embeddings, bf16): HF -> Megatron -> HF is
    bit-identical, and megatron-core's fp32 logits equal transformers' within 1e-4 (measured: 5e-5)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from fixtures_synth import _smollm2_path

    src = _smollm2_path()
    manifest = convert.hf_to_megatron(src, tmp_path / "mg")
    assert manifest["dtype"] == "bfloat16" and manifest["padded_vocab_size"] == 49152
    convert.megatron_to_hf(tmp_path / "mg", tmp_path / "back")
    source, back = ModelWeights(src), ModelWeights(tmp_path / "back")
    assert set(back.names()) == set(source.names())
    assert all(torch.equal(back.read_rows(n), source.read_rows(n)) for n in source.names())
    tokens = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(tokens).logits
    got = megatron_logits(tmp_path / "mg", src, tokens)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()
