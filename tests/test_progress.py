"""data_prep.progress: plain periodic lines when the output is not a terminal, a rich bar when it is."""

import io

from data_prep.progress import StageProgress, format_seconds


def test_redirected_output_gets_periodic_lines_and_a_last_line():
    out = io.StringIO()
    with StageProgress("synthesize", 10, "prompts", rates={"generated tokens": 0}, stream=out, interval=0.0) as p:
        for _ in range(10):
            p.advance(1, generated_tokens=50)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # one per advance (interval 0); close does not repeat the 10/10 line
    assert lines[0].startswith("synthesize: 1/10 prompts (10%) | ")
    assert "generated tokens/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("synthesize: 10/10 prompts (100%)") and "ETA" not in lines[-1]
    assert "\x1b" not in out.getvalue()  # no terminal control codes in a log file


def test_close_prints_the_last_line_once_when_the_last_advance_did_not():
    out = io.StringIO()
    with StageProgress("tokenize", 3, "files", stream=out, interval=3600) as p:
        p.advance(3)
    assert out.getvalue().count("tokenize: 3/3 files (100%)") == 1


def test_lines_wait_for_the_interval():
    out = io.StringIO()
    p = StageProgress("tokenize", 1000, "documents", stream=out, interval=3600)
    for _ in range(1000):
        p.advance()
    assert out.getvalue() == ""
    p.close()
    p.close()
    assert out.getvalue().count("\n") == 1


def test_resumed_work_counts_as_done_but_not_as_speed():
    out = io.StringIO()
    p = StageProgress("synthesize", 100, "prompts", done=60, stream=out, interval=0.0)
    assert "prompts/s" not in p.line() and "ETA" not in p.line()
    p.advance(10)
    assert p.line().startswith("synthesize: 70/100 prompts (70%)") and "ETA" in p.line()


def test_a_terminal_gets_a_rich_bar_and_no_lines():
    out = io.StringIO()
    p = StageProgress("residual", 4, "tensors", stream=out, terminal=True, interval=0.0)
    p.advance(4)
    p.close()
    assert "synthesize" not in out.getvalue() and "4/4" in out.getvalue()
    assert "residual: 4/4" not in out.getvalue()  # the bar's columns, not the plain line


def test_disabled_reports_nothing():
    out = io.StringIO()
    with StageProgress("eval", 3, "examples", stream=out, enabled=False, interval=0.0) as p:
        p.advance(3)
    assert out.getvalue() == ""


def test_byte_units_and_durations():
    p = StageProgress("residual", 3_000_000_000, "", stream=io.StringIO(), byte_units=True, interval=3600)
    p.advance(1_500_000_000)
    assert p.line().startswith("residual: 1.50 GB/3.00 GB (50%) | ")
    assert [format_seconds(s) for s in (9, 75, 3725)] == ["9s", "1m15s", "1h02m"]


def test_library_bars_are_off_only_while_output_is_redirected(monkeypatch):
    import os
    import sys

    from transformers.utils import logging as hf_logging

    from data_prep.progress import library_bars_when_terminal

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert hf_logging.is_progress_bar_enabled()
    with library_bars_when_terminal(io.StringIO()):  # not a terminal
        assert not hf_logging.is_progress_bar_enabled() and os.environ["TQDM_DISABLE"] == "1"
    assert hf_logging.is_progress_bar_enabled() and "TQDM_DISABLE" not in os.environ

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    with library_bars_when_terminal(Terminal()):
        assert hf_logging.is_progress_bar_enabled() and "TQDM_DISABLE" not in os.environ
    assert sys.stderr is not None


def test_loading_a_model_with_redirected_output_draws_no_bar(tmp_path, capfd):
    from fixtures_synth import save_tiny_llama

    from data_prep.engines import TransformersEngine

    path = save_tiny_llama(tmp_path / "m")
    capfd.readouterr()
    TransformersEngine(path, device="cpu")
    assert "Loading weights" not in capfd.readouterr().err
