import re
from pathlib import Path

import pytest

from megatron_ipt.config import ConfigError, ExperimentConfig, load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_example_validates():
    cfg = load_config(EXAMPLES / "quickstart.yaml")
    assert cfg.name == "quickstart"
    assert cfg.run_path == Path("runs/quickstart")
    assert cfg.synthesis.model == "smollm2-135m-instruct"


def test_dotted_override_is_parsed_as_yaml_value():
    cfg = load_config(EXAMPLES / "quickstart.yaml", ["train.train_iters=7", "blend.raw_weight=0.25", "corpus.max_documents=null"])
    assert cfg.train.train_iters == 7
    assert cfg.blend.raw_weight == 0.25
    assert cfg.corpus.max_documents is None


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  train_itters: 5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.train_itters'"):
        load_config(p)


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"train.train_iters = 'many'"):
        load_config(None, ["train.train_iters=many"])


def test_out_of_range_value_is_rejected():
    with pytest.raises(ConfigError, match=r"corpus.heldout_fraction"):
        load_config(None, ["corpus.heldout_fraction=1.5"])


def test_zero_blend_weights_are_rejected():
    with pytest.raises(ConfigError, match="blend"):
        load_config(None, ["blend.raw_weight=0", "blend.instruct_weight=0"])


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.train_iters"])


def test_defaults_build_without_file():
    assert isinstance(load_config(None), ExperimentConfig)


def test_the_large_model_examples_validate():
    from pathlib import Path

    from megatron_ipt.config import load_config

    root = Path(__file__).resolve().parents[1] / "examples"
    for name, tp, pp in (("llama3-8b-cpt.yaml", 1, 1), ("llama3-70b-cpt.yaml", 4, 4)):
        cfg = load_config(root / name)
        assert (cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size) == (tp, pp)
        assert cfg.parallel.overlap_grad_reduce and cfg.parallel.overlap_param_gather and cfg.model.seq_length == 8192
        assert cfg.synthesis.engine == "vllm" and cfg.synthesis.rounds == 3
        assert cfg.train.fp8 == "hybrid" and cfg.train.precision == "bf16" and cfg.train.lr_decay_style == "wsd"
        assert cfg.train.init_from and cfg.model.hf_config and cfg.synthesis.prompt_format == "lmops"


@pytest.mark.parametrize("override, message", [
    ("train.adam_beta1=.nan", "train.adam_beta1 = nan: Input should be a finite number"),
    ("train.clip_grad=.inf", "train.clip_grad = inf: Input should be a finite number"),
    ("blend.raw_weight=.inf", "blend.raw_weight = inf: Input should be a finite number"),
    ("train.adam_beta2=1.0", "train.adam_beta2 = 1.0: Input should be less than 1"),
    ("train.adam_beta1=-0.1", "train.adam_beta1 = -0.1: Input should be greater than or equal to 0"),
    ("train.train_iters=true", "train.train_iters = True: Value error, a boolean is not a number here"),
    ("train.lr=false", "train.lr = False: Value error, a boolean is not a number here"),
])
def test_non_finite_out_of_range_and_boolean_numbers_are_refused_naming_the_key(override, message):
    """Issue 16, item 12: these used to be accepted (NaN / inf betas, clip and weights; True as 1 iteration)."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("examples/quickstart.yaml", [override])


def test_a_set_value_for_a_text_field_is_taken_literally():
    cfg = load_config("examples/quickstart.yaml", ["run_dir=/data/my runs #3", "name=2024", "tokenize.tokenizer=null",
                                                   "train.train_iters=7", "corpus.paths=[a.jsonl, b.jsonl]"])
    assert cfg.run_dir == "/data/my runs #3" and cfg.name == "2024" and cfg.tokenize.tokenizer is None
    assert cfg.train.train_iters == 7 and cfg.corpus.paths == ["a.jsonl", "b.jsonl"]
