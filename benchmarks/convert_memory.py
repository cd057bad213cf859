"""Peak anonymous memory and time of ``ipt convert`` (both directions) against the whole-model approach.

Ours is :func:`megatron_ipt.hf.convert.hf_to_megatron` / :func:`~megatron_ipt.hf.convert.megatron_to_hf`: a meta-device
model for the structure, file-backed tensor data on import, one parameter at a time on export. The whole-model
approach is what the converter did before (and what a short script does): build the megatron-core
``GPTModel`` in memory (the checkpoint's dtype on import, fp32 on export), copy every tensor into it, then
``dist_checkpointing.save`` / ``load`` it whole.

The synthetic model is Llama-shaped (a ``config.json`` that ``transformers`` would read, random bf16 weights
in several safetensors shards). Each run is a fresh Python process; the parent samples, every 20 ms, the
anonymous memory of that process and of the writer processes megatron forks during a save (the sum of
``Pss_Anon`` from ``/proc/PID/smaps_rollup``, so copy-on-write pages shared after a fork count once), and
reports its peak above the process's own anonymous memory just before the conversion started (imports
done). File pages (the memory-mapped inputs, the page cache of the outputs) are not anonymous memory: the
kernel drops them under pressure, so they are reported (peak RSS, ``ru_maxrss``) but not counted.

    python benchmarks/convert_memory.py --data-dir /tmp/ipt-convert-bench --layers 12   # ~1.4 GB model
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from megatron_ipt.hf.safetensors_stream import ModelWeights, PlannedTensor, ShardedWriter  # noqa: E402

MODES = ("import", "import-whole", "export", "export-whole")


def llama_config(args) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
            "intermediate_size": args.ffn, "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
            "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab, "max_position_embeddings": 4096,
            "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}


def write_model(folder: Path, args) -> None:
    from megatron_ipt.hf.convert import hf_names, hf_shape
    from megatron_ipt.training.presets import preset_from_hf_config

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(llama_config(args), indent=1))
    preset = preset_from_hf_config(folder)
    plan = [PlannedTensor(n, torch.bfloat16, hf_shape(n, preset)) for n in hf_names(preset)]
    w = ShardedWriter(folder, plan, args.shard_mb * 2**20)
    gen = torch.Generator().manual_seed(0)
    for t in plan:
        w.write(t.name, (torch.randn(t.shape, generator=gen) * 0.02).to(torch.bfloat16))
    w.close()


# ------------------------------------------------------------------------------- the runs (children)
def _anon_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def whole_model_import(src: Path, dst: Path) -> None:
    """The previous converter: the GPTModel in memory (bf16 like the checkpoint), filled, saved whole."""
    from megatron_ipt.training import checkpoint
    from megatron_ipt.hf import convert
    from megatron_ipt.training.model import build_model
    from megatron_ipt.training.presets import padded_vocab_size, preset_from_hf_config

    preset = preset_from_hf_config(src)
    vocab = padded_vocab_size(preset.vocab_size, 1)
    weights = ModelWeights(src)
    with convert.one_process_world(preset) as layout:
        model = build_model(preset, layout, vocab_size=vocab, seq_length=4096, device=torch.device("cpu"),
                            precision="bf16")
        with torch.no_grad():
            for name, param in model.module.named_parameters():
                rows = convert.row_plan(name, preset, vocab)
                parts = [weights.read_rows(r.name, r.start, r.stop) if r.name else
                         torch.zeros((r.count, *param.shape[1:]), dtype=param.dtype) for r in rows]
                param.copy_(torch.cat(parts).to(param.dtype))
        dst.mkdir(parents=True)
        checkpoint.save_model_weights(dst, model)


def whole_model_export(src: Path, dst: Path, hf: Path) -> None:
    """The previous exporter: an fp32 GPTModel in memory, the checkpoint loaded whole, tensors written."""
    from megatron_ipt.training import checkpoint
    from megatron_ipt.hf import convert
    from megatron_ipt.training.model import build_model
    from megatron_ipt.training.presets import padded_vocab_size, preset_from_hf_config

    preset = preset_from_hf_config(hf)
    vocab = padded_vocab_size(preset.vocab_size, 1)
    with convert.one_process_world(preset) as layout:
        model = build_model(preset, layout, vocab_size=vocab, seq_length=4096, device=torch.device("cpu"))
        checkpoint.load_model_weights(src, model)
        params = dict(model.named_parameters())
        names = convert.hf_names(preset)
        dst.mkdir(parents=True)
        w = ShardedWriter(dst, [PlannedTensor(n, torch.bfloat16, convert.hf_shape(n, preset)) for n in names], 2**30)
        by_hf = {h: m for m, hs in convert.megatron_sources(preset).items() for h in hs}
        for name in names:
            offset = 0
            for r in convert.row_plan(by_hf[name], preset, vocab):
                if r.name == name:
                    w.write(name, params[by_hf[name]].detach()[offset:offset + r.count].to(torch.bfloat16))
                offset += r.count
        w.close()


def child(args) -> None:
    import megatron.core.dist_checkpointing  # noqa: F401  (imports done before the baseline is taken)
    import megatron.core.models.gpt  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401

    from megatron_ipt.hf import convert  # noqa: F401

    from megatron_ipt.training import model

    d = Path(args.data_dir)
    out = d / f"out-{args.child}"
    shutil.rmtree(out, ignore_errors=True)
    before = _anon_mb()
    t0 = time.perf_counter()
    if args.child == "import":
        convert.hf_to_megatron(d / "hf", out)
    elif args.child == "import-whole":
        whole_model_import(d / "hf", out)
    elif args.child == "export":
        convert.megatron_to_hf(d / "out-import", out)
    else:
        whole_model_export(d / "out-import", out, d / "out-import" / "hf")
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "anon_before_mb": before,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


# ------------------------------------------------------------------------------- sampling (parent)
def _tree_pss_anon_mb(pid: int) -> float:
    """Sum of Pss_Anon over ``pid`` and its descendants (0 for processes that ended meanwhile)."""
    import psutil

    total = 0.0
    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    for proc in procs:
        try:
            for line in Path(f"/proc/{proc.pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss_Anon:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def measure(cmd: list[str]) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"tree": 0.0, "main": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peaks["tree"] = max(peaks["tree"], _tree_pss_anon_mb(proc.pid))
            try:
                peaks["main"] = max(peaks["main"], _anon_mb(proc.pid))
            except OSError:
                pass
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    stdout, stderr = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd}: exit {proc.returncode}\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_anon_mb"] = peaks["tree"]
    result["peak_anon_main_mb"] = peaks["main"]
    result["peak_anon_above_start_mb"] = peaks["tree"] - result["anon_before_mb"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="/tmp/ipt-convert-bench")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-mb", type=int, default=400, help="safetensors shard size of the synthetic model")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="export modes read the checkpoint that 'import' wrote")
    p.add_argument("--keep", action="store_true", help="keep the synthetic model and outputs")
    p.add_argument("--json", default=str(HERE / "results" / "convert_memory.json"))
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    d = Path(args.data_dir)
    if not (d / "hf" / "config.json").is_file():
        write_model(d / "hf", args)
    weights = ModelWeights(d / "hf")
    model_mb = weights.total_bytes() / 2**20
    largest = sorted((t.nbytes for t in weights.tensors.values()), reverse=True)
    rows = {}
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--child", mode, "--data-dir", str(d)]
        rows[mode] = measure(cmd)
        print(f"{mode:>13}: peak anonymous {rows[mode]['peak_anon_above_start_mb']:8.0f} MB above start "
              f"({rows[mode]['peak_anon_mb']:.0f} MB total), peak RSS {rows[mode]['peak_rss_mb']:.0f} MB, "
              f"{rows[mode]['seconds']:.1f} s", flush=True)
    print(f"\nmodel: {model_mb:.0f} MB in {len(set(t.file for t in weights.tensors.values()))} shards, "
          f"{args.layers} layers; largest tensor {largest[0] / 2**20:.0f} MB, second {largest[1] / 2**20:.0f} MB")
    print("| mode | peak anonymous MB above start | x largest tensor | peak RSS MB (incl. file pages) | s |")
    print("| --- | --- | --- | --- | --- |")
    for mode, r in rows.items():
        print(f"| {mode} | {r['peak_anon_above_start_mb']:.0f} | {r['peak_anon_above_start_mb'] * 2**20 / largest[0]:.2f} "
              f"| {r['peak_rss_mb']:.0f} | {r['seconds']:.1f} |")
    result = {"model_mb": round(model_mb, 1), "largest_tensor_mb": round(largest[0] / 2**20, 1),
              "layers": args.layers, "hidden": args.hidden, "ffn": args.ffn, "vocab": args.vocab,
              "runs": rows, "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                        "cpus": __import__("os").cpu_count()},
              "command": " ".join(sys.argv)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    if not args.keep:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
