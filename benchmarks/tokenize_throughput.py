"""Tokenization speed and memory: ``data_prep.tokenize`` against the way Megatron-LM's preprocess_data works.

Both tokenize the same JSONL with the same tokenizer and the same number of worker processes:

- ``baseline``: a reimplementation of Megatron-LM ``tools/preprocess_data.py``'s approach (written here, not
  copied): ``multiprocessing.Pool.imap`` over the file's lines with chunksize 25, each worker parsing one JSON
  line and tokenizing one document with the transformers tokenizer, the main process writing each document
  through megatron-core's ``IndexedDatasetBuilder.add_document``;
- ``ours``: ``data_prep.tokenize.tokenize_corpus`` (batched raw lines to workers, batch encoding through the
  tiktoken view of the byte-level BPE, ``data_prep/fast_bpe.py``, bounded in-flight batches, numpy writes);
- ``ours, tokenizers backend``: the same with ``bpe_backend="tokenizers"`` (the reference BPE library), to
  show what the pipeline and what the BPE implementation contribute.

Each run is a fresh Python process; its peak memory is sampled every 0.1 s over the process and its
children (PSS, proportional set size, so pages shared by forked workers count once; RSS summed is reported
too). The outputs of both are compared byte for byte.

Input: real text from Debian's ``python3.11-doc`` (the Python manual as info, split into nodes) and
``linux-doc-6.1`` (kernel documentation, ``.rst.gz``), about 36 MB of text; ``apt-get download`` +
``dpkg-deb -x`` into ``DATA_DIR`` (nothing installed). Input ``xN`` is every document N times over (real text,
repeated), so the 1x and 10x inputs have the same documents, only more of them. Files are cached in ``DATA_DIR``.

    python benchmarks/tokenize_throughput.py --data-dir /tmp/ipt-bench            # x1 and x10 (about 36 and 360 MB)
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEBS = ("python3.11-doc", "linux-doc-6.1")


# ---- input -----------------------------------------------------------------------------------------------


def real_documents(data_dir: Path) -> list[str]:
    """Documents from the two Debian doc packages (downloaded and unpacked once into data_dir)."""
    root = data_dir / "debs"
    root.mkdir(parents=True, exist_ok=True)
    for name in DEBS:
        if not list(root.glob(f"{name}_*.deb")):
            subprocess.run(["apt-get", "download", name], cwd=root, check=True, capture_output=True)
        deb = sorted(root.glob(f"{name}_*.deb"))[-1]
        if not (root / name).is_dir():
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root / name)], check=True)
    docs = []
    for info in sorted(glob.glob(str(root / "python3.11-doc/usr/share/info/python3.11.info*.gz"))):
        docs += gzip.open(info, "rt", encoding="utf-8", errors="replace").read().split("\x1f")
    for rst in sorted(glob.glob(str(root / "linux-doc-6.1/usr/share/doc/linux-doc-6.1/Documentation/**/*.rst.gz"),
                                recursive=True)):
        if "/translations/" not in rst:
            docs.append(gzip.open(rst, "rt", encoding="utf-8", errors="replace").read())
    return [d.strip() for d in docs if len(d.strip()) > 200]


def paragraphs(docs: list[str], min_chars: int = 400) -> list[str]:
    """The same text as shorter documents: each document cut at blank lines into runs of consecutive
    paragraphs of at least ``min_chars`` characters (web-page or forum-post sized records)."""
    out = []
    for doc in docs:
        run = ""
        for para in doc.split("\n\n"):
            run = f"{run}\n\n{para}" if run else para
            if len(run) >= min_chars:
                out.append(run)
                run = ""
        if run.strip():
            out.append(run)
    return out


def build_jsonl(data_dir: Path, copies: int, corpus: str = "docs") -> Path:
    """JSONL of the real documents (``docs``) or of their paragraph runs (``paragraphs``), ``copies`` times over."""
    path = data_dir / f"{corpus}-x{copies}.jsonl"
    if path.is_file():
        return path
    docs = real_documents(data_dir)
    if corpus == "paragraphs":
        docs = paragraphs(docs)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for c in range(copies):
            for i, doc in enumerate(docs):
                f.write(json.dumps({"id": f"{c}-{i}", "text": doc}) + "\n")
    os.replace(tmp, path)
    return path


# ---- the two tokenizers (run in a child process) ------------------------------------------------------------

_TOK = None


def _baseline_init(tokenizer_dir: str) -> None:
    global _TOK
    from transformers import AutoTokenizer

    _TOK = AutoTokenizer.from_pretrained(tokenizer_dir)


def _baseline_encode(line: str):
    """One JSON line -> (token ids with EOD, bytes read): one document per call, as preprocess_data does."""
    text = json.loads(line)["text"]
    ids = _TOK(text, add_special_tokens=False)["input_ids"]
    return ids + [_EOD], len(line)


def run_baseline(inp: Path, out: Path, tokenizer_dir: str, workers: int) -> dict:
    import multiprocessing

    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    global _EOD
    from data_prep.encoders import load_encoder

    enc = load_encoder(tokenizer_dir)
    _EOD = enc.eod_id
    dtype = np.uint16 if enc.vocab_size < 65500 else np.int32
    builder = IndexedDatasetBuilder(f"{out}.bin", dtype=dtype)
    docs = tokens = 0
    with open(inp, encoding="utf-8") as fin:
        pool = multiprocessing.Pool(workers, initializer=_baseline_init, initargs=(tokenizer_dir,))
        for ids, _ in pool.imap(_baseline_encode, fin, 25):
            builder.add_document(torch.IntTensor(ids), [len(ids)])
            docs += 1
            tokens += len(ids)
        pool.close()
        pool.join()
    builder.finalize(f"{out}.idx")
    return {"documents": docs, "tokens": tokens}


def run_ours(inp: Path, out: Path, tokenizer_dir: str, workers: int, bpe_backend: str = "auto") -> dict:
    from data_prep.tokenize import TokenizeOptions, tokenize_corpus

    m = tokenize_corpus([inp], out, tokenizer_dir, TokenizeOptions(workers=workers, min_parallel_bytes=0,
                                                                   bpe_backend=bpe_backend), log=lambda _: None)
    return {"documents": m["documents"], "tokens": m["tokens"], "bpe_backend": m["tokenizer"].get("bpe_backend")}


def child_main(args) -> None:
    t0 = time.perf_counter()
    if args.child == "baseline":
        result = run_baseline(Path(args.input), Path(args.output), args.tokenizer, args.workers)
    else:
        result = run_ours(Path(args.input), Path(args.output), args.tokenizer, args.workers,
                          "tokenizers" if args.child == "ours-tokenizers" else "auto")
    result["seconds"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(result), flush=True)


# ---- driver ----------------------------------------------------------------------------------------------


def measure(which: str, inp: Path, out: Path, tokenizer: str, workers: int) -> dict:
    """Run one tokenizer in a fresh process; sample peak PSS/RSS of it and its children."""
    import psutil

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", which, "--input", str(inp), "--output", str(out),
           "--tokenizer", tokenizer, "--workers", str(workers)]
    import resource

    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    ps = psutil.Process(proc.pid)
    peak_pss = peak_rss = 0
    while proc.poll() is None:
        pss = rss = 0
        try:
            for p in [ps] + ps.children(recursive=True):
                try:
                    mem = p.memory_full_info()
                    pss += mem.pss
                    rss += mem.rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        except psutil.NoSuchProcess:
            break
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(0.1)
    stdout = proc.communicate()[0]
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child and its (joined) workers
    cpu_seconds = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{which} failed on {inp} (exit {proc.returncode})")
    result = json.loads(next(l for l in stdout.splitlines() if l.startswith("RESULT "))[7:])
    result.update(peak_pss_mb=round(peak_pss / 2**20, 1), peak_rss_mb=round(peak_rss / 2**20, 1),
                  tokens_per_s=round(result["tokens"] / result["seconds"]), cpu_seconds=round(cpu_seconds, 2),
                  tokens_per_cpu_s=round(result["tokens"] / cpu_seconds) if cpu_seconds > 0 else None)
    return result


def same_files(a: Path, b: Path) -> bool:
    import filecmp

    return all(filecmp.cmp(f"{a}.{e}", f"{b}.{e}", shallow=False) for e in ("bin", "idx"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="/tmp/ipt-bench", help="cache for the Debian packages, inputs and outputs")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: SmolLM2-135M-Instruct's)")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--copies", default="1,10", help="input sizes as copies of the real corpus (comma-separated)")
    p.add_argument("--baseline-max-copies", type=int, default=10, help="run the baseline only up to this size")
    p.add_argument("--corpus", choices=["docs", "paragraphs"], default="docs",
                   help="docs: whole documents (median ~1,900 characters); paragraphs: the same text cut into runs of "
                   "paragraphs of at least 400 characters")
    p.add_argument("--json", default=None, help="where to save the results (default: DATA_DIR/results.json)")
    p.add_argument("--child", choices=["ours", "ours-tokenizers", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--no-reference-backend", action="store_true",
                   help="skip the third run (ours with bpe_backend tokenizers, the reference BPE library)")
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_main(args)

    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if args.tokenizer is None:
        sys.path.insert(0, str(HERE.parent))
        from data_prep.models import resolve_model

        args.tokenizer = str(resolve_model("smollm2-135m-instruct"))
    rows = []
    for size in [int(s) for s in args.copies.split(",")]:
        inp = build_jsonl(data_dir, size, args.corpus)
        row = {"corpus": args.corpus, "copies": size, "input_bytes": inp.stat().st_size, "workers": args.workers}
        shutil.rmtree(data_dir / f"ours-{size}.shards", ignore_errors=True)  # no resume: time the whole run
        row["ours"] = measure("ours", inp, data_dir / f"ours-{size}", args.tokenizer, args.workers)
        if not args.no_reference_backend:
            shutil.rmtree(data_dir / f"ourstk-{size}.shards", ignore_errors=True)
            row["ours_tokenizers"] = measure("ours-tokenizers", inp, data_dir / f"ourstk-{size}", args.tokenizer,
                                             args.workers)
            row["identical_across_backends"] = same_files(data_dir / f"ours-{size}", data_dir / f"ourstk-{size}")
            os.remove(data_dir / f"ourstk-{size}.bin")
            shutil.rmtree(data_dir / f"ourstk-{size}.shards")
        if size <= args.baseline_max_copies:
            row["baseline"] = measure("baseline", inp, data_dir / f"baseline-{size}", args.tokenizer, args.workers)
            row["speedup"] = round(row["ours"]["tokens_per_s"] / row["baseline"]["tokens_per_s"], 2)
            row["cpu_speedup"] = round(row["ours"]["tokens_per_cpu_s"] / row["baseline"]["tokens_per_cpu_s"], 2)
            row["identical_output"] = same_files(data_dir / f"ours-{size}", data_dir / f"baseline-{size}")
            if "ours_tokenizers" in row:
                row["cpu_speedup_tokenizers_backend"] = round(
                    row["ours_tokenizers"]["tokens_per_cpu_s"] / row["baseline"]["tokens_per_cpu_s"], 2)
            os.remove(data_dir / f"baseline-{size}.bin")
        os.remove(data_dir / f"ours-{size}.bin")
        shutil.rmtree(data_dir / f"ours-{size}.shards")
        rows.append(row)
        print(json.dumps(row), flush=True)

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"tokenize: {Path(args.tokenizer).name}, {args.workers} workers, {os.cpu_count()} cores")
    for col in ("input", "MB", "tokens", "ours tok/s", "baseline tok/s", "speedup", "tok/CPU-s ratio",
                "tok/CPU-s ratio, tokenizers backend", "ours peak PSS",
                "baseline peak PSS",
                "ours peak RSS (sum)", "baseline peak RSS (sum)", "identical"):
        t.add_column(col, justify="right")
    for r in rows:
        o, b = r["ours"], r.get("baseline")
        t.add_row(f"{r['corpus']} x{r['copies']}", f"{r['input_bytes'] / 1e6:,.0f}", f"{o['tokens']:,}",
                  f"{o['tokens_per_s']:,}", f"{b['tokens_per_s']:,}" if b else "-", f"{r['speedup']}x" if b else "-",
                  f"{r['cpu_speedup']}x" if b else "-",
                  f"{r['cpu_speedup_tokenizers_backend']}x" if r.get("cpu_speedup_tokenizers_backend") else "-",
                  f"{o['peak_pss_mb']} MB",
                  f"{b['peak_pss_mb']} MB" if b else "-", f"{o['peak_rss_mb']} MB", f"{b['peak_rss_mb']} MB" if b else "-",
                  str(r.get("identical_output", "-")))
    Console(width=200).print(t)
    out = Path(args.json or data_dir / "results.json")
    out.write_text(json.dumps({"tokenizer": args.tokenizer, "cores": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
