"""The documentation stays true to the code: the generated configuration reference is current, every relative
Markdown link in README.md and docs/ resolves (file and #anchor), every config key is documented, and
nothing in the repository points at files outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from megatron_ipt.cli import main
from megatron_ipt.config import ExperimentConfig
from megatron_ipt.config_reference import _model_of, reference_markdown

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: inline code marks and link targets dropped, lower case, characters other
    than letters, digits, spaces, '-' and '_' removed, each space a '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of ``page``, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(page.read_text()):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = github_slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(page: Path) -> list[str]:
    links = []
    for line in _prose_lines(page.read_text()):
        line = re.sub(r"`[^`]*`", "", line)  # links inside inline code are not links
        links += [t for t in LINK.findall(line) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]
    return links


def test_committed_configuration_reference_matches_the_config_models():
    page = ROOT / "docs" / "configuration.md"
    assert page.is_file(), "docs/configuration.md is missing: run `ipt config --reference`"
    assert page.read_text() == reference_markdown(), \
        "docs/configuration.md is stale: run `ipt config --reference` and commit the result"


def test_ipt_config_reference_writes_the_page(tmp_path, capsys):
    out = tmp_path / "configuration.md"
    assert main(["config", "--reference", str(out)]) == 0
    text = out.read_text()
    assert text == reference_markdown()
    for section in ("corpus", "synthesis", "format", "tokenize", "blend", "model", "parallel", "train"):
        assert f"\n## {section}\n" in text
    assert "| `train_iters` | int | `300` |" in text
    assert main(["config", "--reference", "-"]) == 0
    assert capsys.readouterr().out.endswith(text)


def test_ipt_config_reference_into_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    assert main(["config", "--reference", str(tmp_path / "no-such-dir" / "configuration.md")]) == 2
    assert "no folder" in capsys.readouterr().err


def test_every_config_key_has_a_description():
    missing, queue = [], [("", ExperimentConfig)]
    while queue:
        path, model = queue.pop()
        for key, field in model.model_fields.items():
            sub = _model_of(field.annotation)
            if sub is not None:
                queue.append((f"{path}{key}.", sub))
            elif not field.description:
                missing.append(path + key)
    assert not missing, f"config keys without description=: {missing}"


def test_readme_reads_in_five_minutes():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move details into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_experiment_yaml_snippets_in_the_docs_validate(tmp_path):
    """A ```yaml block whose top-level keys are all experiment keys is a config fragment: it must load."""
    import yaml

    from megatron_ipt.config import load_config

    checked = 0
    for page in PAGES:
        for block in re.findall(r"```ya?ml\n(.*?)```", page.read_text(), re.S):
            data = yaml.safe_load(block)
            if isinstance(data, dict) and data and set(data) <= set(ExperimentConfig.model_fields):
                path = tmp_path / "snippet.yaml"
                path.write_text(block)
                load_config(path)  # raises ConfigError naming the key
                checked += 1
    assert checked >= 1


def test_github_slug_matches_githubs_rules():
    assert github_slug("Supported versions") == "supported-versions"
    assert github_slug("The `ipt` command") == "the-ipt-command"
    assert github_slug("blend.per_split.train[] / valid[] / test[]") == "blendper_splittrain--valid--test"
    assert github_slug("Checkpoints: resume & preemption") == "checkpoints-resume--preemption"


def test_nothing_points_outside_the_repository():
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    outside = re.compile("|".join(["shared" + "/notes", "shared" + "/design", r"\.\./" + "shared", "/work" + "/shared"]))
    hits = []
    for name in files.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        hits += [f"{name}:{i}" for i, line in enumerate(text.splitlines(), 1) if outside.search(line)]
    assert not hits, f"references to files outside the repository: {hits}"
