"""The megatron-core seam (``megatron_ipt/training/mcore.py``): version range, field-filtered configs, keyword-only calls."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from megatron_ipt.training import mcore

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_ipt"


def test_the_installed_megatron_core_is_in_the_supported_range():
    assert mcore.is_supported(), mcore.version()
    assert mcore.is_supported("0.16.1") and mcore.is_supported("0.19.2")
    assert not mcore.is_supported("0.16.0") and not mcore.is_supported("0.20.0")


def test_the_declared_range_matches_pyproject():
    text = (PACKAGE.parent / "pyproject.toml").read_text()
    assert f'"megatron-core{mcore.SUPPORTED}"' in text


def test_configs_keep_only_the_fields_the_class_has():
    @dataclasses.dataclass
    class Config:
        a: int = 0
        b: int = 0

    assert mcore.make_config(Config, a=1, b=2, gone_in_this_version=3) == Config(a=1, b=2)


def test_calls_drop_keywords_the_function_does_not_accept():
    def f(*, x, y=0):
        return x, y

    def g(**kwargs):
        return kwargs

    assert mcore.call_with_accepted(f, x=1, y=2, z=3) == (1, 2)
    assert mcore.call_with_accepted(g, x=1, z=3) == {"x": 1, "z": 3}


def test_transformer_config_ignores_fields_of_other_versions():
    config = mcore.transformer_config(num_layers=2, hidden_size=64, num_attention_heads=4,
                                      moe_extended_tp=False, fp8_output_proj=False, use_cpu_initialization=True)
    assert config.num_layers == 2 and config.hidden_size == 64


def test_only_the_seam_imports_megatron_core():
    offenders = []
    paths = sorted(PACKAGE.rglob("*.py"))
    assert len(paths) > 30  # every subpackage is searched
    for path in paths:
        name = path.relative_to(PACKAGE).as_posix()
        if name == "training/mcore.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*(from|import)\s+megatron(\.|\s|$)", line):
                offenders.append(f"{name}:{number}: {line.strip()}")
    assert not offenders, "megatron-core calls must go through megatron_ipt/training/mcore.py:\n" + "\n".join(offenders)


def test_data_prep_never_imports_the_training_side():
    """data_prep meets megatron_ipt through files and manifests; only the plain-Python shared modules may be named."""
    offenders = []
    for path in sorted((PACKAGE.parent / "data_prep").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*(from|import)\s+megatron_ipt\.(training|hf|launch|evaluate)\b", line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, "data_prep must not import the training side:\n" + "\n".join(offenders)


@pytest.mark.parametrize("name", ["save_distributed", "load_distributed", "initialize_model_parallel"])
def test_seam_functions_exist(name):
    assert callable(getattr(mcore, name))
