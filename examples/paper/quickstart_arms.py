"""The papers' arms at quickstart scale on CPU, end to end, with one comparison table and plot.

    python examples/paper/quickstart_arms.py [--root runs/quickstart-arms] [--quickstart runs/quickstart]

Runs, with ``examples/paper/quickstart-arms.yaml`` (its head explains the design), the ``ipt`` commands a user
would run, each printed before it runs; every command reuses what a previous run finished, so a rerun after a
crash picks up where it stopped:

1. the quickstart's corpus and synthesis (copied from ``runs/quickstart`` when it has them, else synthesized),
   formatted with 28 of the 36 demo general instructions (the last 8 are held out) and tokenized;
2. ``release-base``: the tiny model pre-trained on the raw text; ``release-instruct``: it, instruction-tuned;
3. from release-base, the same number of tokens of *Vanilla PT* (raw + general instructions alone) and
   *Instruct PT* (instruction-augmented chains with the general instructions mixed in), as in Instruction
   Pre-Training (Cheng et al., arXiv 2406.14491, Table 3);
4. on the arm with the lower reading-comprehension answer NLL: *CPT -> SFT* against *CPT + instruction residual*
   (Jindal et al., arXiv 2410.10739: cpt + (instruct - base), through Hugging Face folders);
5. every model scored on the held-out documents (raw and pair NLL, ``ipt eval --task perplexity``), reading
   comprehension on them (answer NLL, ``ipt eval``) and the 8 held-out instructions (response NLL).

Writes ``ROOT/arms.json``, ``ROOT/arms.md`` and ``ROOT/arms.png``, and prints the table and the time taken.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "paper" / "quickstart-arms.yaml"
GENERAL = REPO / "examples" / "data" / "general_instructions.jsonl"
HELDOUT_INSTRUCTIONS = 8
COLUMNS = {"raw": ("perplexity", "raw_nll"), "pairs": ("perplexity", "pairs_nll"),
           "rc": ("rc", "answer_nll"), "instructions": ("instructions", "answer_nll")}
HEADERS = {"raw": "held-out raw NLL", "pairs": "held-out pairs NLL", "rc": "RC answer NLL",
           "instructions": "instruction response NLL"}


def ipt(*args: str | Path) -> None:
    """Run one ``ipt`` command (printed first); a failure stops the script with its exit status."""
    cmd = [str(a) for a in args]
    print("$ ipt " + " ".join(cmd), flush=True)
    rc = subprocess.call([sys.executable, "-m", "megatron_ipt.cli", *cmd], cwd=REPO)
    if rc != 0:
        sys.exit(f"quickstart_arms: 'ipt {' '.join(cmd)}' exited with status {rc}")


def arm_sets(root: Path, arm: str) -> list[str]:
    """The ``--set`` overrides every command on ``arm`` gets: its run folder and the general-instruction files
    under ``root`` (the config names the default root's)."""
    train = root / "general-train.jsonl"
    return ["--set", f"name={arm}", "--set", f"run_dir={root}/{{name}}", "--set", f"format.general_instructions={train}",
            "--set", f"sft.data=[{json.dumps(str(train))}]"]


def split_general(root: Path) -> None:
    """The demo general instructions: the last 8 question/response records held out as a task JSONL (empty
    text, the instruction as question, the response as answer); the other 28 (question/response records and
    conversations) for training: format mixes them in, SFT tunes on them."""
    records = [r for r in map(json.loads, GENERAL.read_text().splitlines()) if "question" in r or "conversations" in r]
    held = [r for r in records if "question" in r][-HELDOUT_INSTRUCTIONS:]
    train = [r for r in records if r not in held]
    files = {"general-train.jsonl": [json.dumps(r) for r in train],
             "instructions-heldout.jsonl": [json.dumps({"id": r["id"], "text": "", "question": r["question"],
                                                         "answer": r["response"]}) for r in held]}
    for name, lines in files.items():
        path, text = root / name, "\n".join(lines) + "\n"
        if not path.is_file() or path.read_text() != text:
            tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)


def prepare_data(root: Path, quickstart: Path) -> Path:
    """``ROOT/data``: corpus and synthesis copied from the quickstart's run (when it finished them and ROOT/data
    has none), then formatted and tokenized by ``ipt run --until tokenize``."""
    data = root / "data"
    for stage in ("corpus", "synthesis"):
        if (quickstart / stage / "manifest.json").is_file() and not (data / stage).exists():
            data.mkdir(parents=True, exist_ok=True)
            shutil.copytree(quickstart / stage, data / f".{stage}.copying")
            os.replace(data / f".{stage}.copying", data / stage)
    ipt("run", CONFIG, *arm_sets(root, "data"), "--until", "tokenize")
    return data


def link_tokenized(root: Path, arm: str) -> None:
    """Each arm's run folder reads the shared tokenized data (a link, as domain-vanilla-pt.yaml does)."""
    (root / arm).mkdir(parents=True, exist_ok=True)
    link = root / arm / "tokenized"
    if not link.exists():
        link.symlink_to(Path("..") / "data" / "tokenized")


def general_share(data: Path) -> float:
    """The general instructions' share of train_ipt's tokens: vanilla-pt blends train_general at this share."""
    counts = json.loads((data / "tokenized" / "manifest.json").read_text())["counts"]
    return counts["train_general"]["tokens"] / counts["train_ipt"]["tokens"]


def evaluate(root: Path, label: str, arm: str, source: list[str]) -> dict:
    """Score one model (``source``: ``--checkpoint DIR`` or ``--hf DIR``) on the four held-out measures."""
    out = root / "results"
    cases = {"perplexity": ["--task", "perplexity"], "rc": ["--data", root / "data" / "synthesis" / "pairs.jsonl"],
             "instructions": ["--data", root / "instructions-heldout.jsonl"]}
    for task, args in cases.items():
        path = out / f"{label}-{task}.json"
        if not path.is_file():
            ipt("eval", CONFIG, *arm_sets(root, arm), *source, *args, "--name", label, "--output", path)
    return {task: json.loads((out / f"{label}-{task}.json").read_text())["metrics"] for task in cases}


def hf_reference(root: Path) -> Path:
    """A Hugging Face folder (config.json + the run's tokenizer) describing the tiny preset, for the export."""
    from megatron_ipt.config import load_config
    from megatron_ipt.evaluate.hf_export import preset_reference
    from megatron_ipt.pipeline import tokenizer_path
    from megatron_ipt.training.presets import resolve_preset

    folder = root / "hf" / "reference"
    if not (folder / "config.json").is_file():
        cfg = load_config(CONFIG)
        vocab = json.loads((root / "data" / "tokenized" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
        preset_reference(resolve_preset(cfg.model), folder, vocab_size=vocab, tokenizer=tokenizer_path(cfg))
    return folder


def to_hf(root: Path, checkpoints: Path, name: str) -> Path:
    dst = root / "hf" / name
    if not (dst / "config.json").is_file():
        ipt("convert", "megatron-to-hf", checkpoints, dst, "--hf-config-from", hf_reference(root), "--overwrite")
    return dst


def table(rows: dict[str, dict]) -> str:
    lines = ["| model | " + " | ".join(HEADERS.values()) + " |", "|---" * (len(HEADERS) + 1) + "|"]
    for label, metrics in rows.items():
        cells = [f"{metrics[task][key]:.3f}" for task, key in COLUMNS.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(4 * len(COLUMNS), 3.6))
    for ax, (col, (task, key)) in zip(axes, COLUMNS.items()):
        labels = list(rows)
        ax.barh(labels, [rows[label][task][key] for label in labels], color="tab:blue")
        ax.set_title(HEADERS[col] + " (lower is better)", fontsize=9)
        ax.invert_yaxis()
        ax.tick_params(labelsize=8)
    fig.suptitle("Instruction Pre-Training arms at quickstart scale (tiny model on CPU: noisy)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/quickstart-arms", help="where the arms' run folders go")
    parser.add_argument("--quickstart", default="runs/quickstart", help="the quickstart run to take synthesis from")
    args = parser.parse_args(argv)
    root, started, times = (REPO / args.root), time.time(), {}
    root.mkdir(parents=True, exist_ok=True)

    def step(name: str, fn, *a):
        t = time.time()
        result = fn(*a)
        times[name] = times.get(name, 0.0) + time.time() - t
        return result

    split_general(root)
    data = step("data", prepare_data, root, REPO / args.quickstart)
    for arm in ("release-base", "vanilla-pt", "instruct-pt"):
        link_tokenized(root, arm)
    base_ckpt = root / "release-base" / "train" / "checkpoints"
    share = general_share(data)
    step("train", ipt, "train", CONFIG, *arm_sets(root, "release-base"), "--set", "blend.raw_weight=1.0",
         "--set", "blend.instruct_weight=0.0")
    step("sft", ipt, "sft", CONFIG, *arm_sets(root, "release-base"), "--set", f"sft.init_from={base_ckpt}")
    step("train", ipt, "train", CONFIG, *arm_sets(root, "vanilla-pt"), "--set", f"blend.raw_weight={1 - share!r}",
         "--set", f"blend.general_weight={share!r}", "--set", "blend.instruct_weight=0.0",
         "--set", f"train.init_from={base_ckpt}")
    step("train", ipt, "train", CONFIG, *arm_sets(root, "instruct-pt"), "--set", f"train.init_from={base_ckpt}")
    rows = {}
    for label, arm, folder in (("release-base", "release-base", "train"), ("release-instruct", "release-base", "sft"),
                               ("vanilla-pt", "vanilla-pt", "train"), ("instruct-pt", "instruct-pt", "train")):
        rows[label] = step("eval", evaluate, root, label, arm, ["--checkpoint", root / arm / folder / "checkpoints"])
    better = min(("vanilla-pt", "instruct-pt"), key=lambda a: rows[a]["rc"]["answer_nll"])
    step("sft", ipt, "sft", CONFIG, *arm_sets(root, better), "--set", f"sft.init_from={root / better / 'train' / 'checkpoints'}")
    rows[f"{better} -> SFT"] = step("eval", evaluate, root, f"{better}-sft", better,
                                    ["--checkpoint", root / better / "sft" / "checkpoints"])
    hf = {name: step("convert", to_hf, root, ckpt, name) for name, ckpt in (
        ("release-base", base_ckpt), ("release-instruct", root / "release-base" / "sft" / "checkpoints"),
        (better, root / better / "train" / "checkpoints"))}
    residual = root / "hf" / f"{better}+residual"
    if not (residual / "residual_manifest.json").is_file():
        step("residual", ipt, "residual", "--base", hf["release-base"], "--instruct", hf["release-instruct"],
             "--cpt", hf[better], "--output", residual, "--overwrite")
    rows[f"{better} + residual"] = step("eval", evaluate, root, f"{better}-residual", better, ["--hf", residual])

    elapsed = time.time() - started
    record = {"config": str(CONFIG.relative_to(REPO)), "better_cpt_arm": better, "general_share": share,
              "models": rows, "seconds": {k: round(v, 1) for k, v in times.items()}, "total_seconds": round(elapsed, 1),
              "cpus": os.cpu_count(), "load_average_1min_at_end": round(os.getloadavg()[0], 2)}
    (root / "arms.json").write_text(json.dumps(record, indent=2) + "\n")
    text = table(rows)
    (root / "arms.md").write_text(text + "\n")
    plot(rows, root / "arms.png")
    print(text)
    print(f"better CPT arm by RC answer NLL: {better}; took {elapsed / 60:.1f} min "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in times.items())}); wrote {root / 'arms.json'}, arms.md, arms.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
