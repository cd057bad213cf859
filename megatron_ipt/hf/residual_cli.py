"""``ipt residual``: add an instruction residual to a continually pre-trained model (see megatron_ipt.hf.residual)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Instruction residuals (Jindal et al., arXiv 2410.10739): after continually pre-training a base model, add
the difference between the instruct and the base model of the same release to get an up-to-date instruct
model without instruction tuning:

    output = cpt + alpha * (instruct - base)

All three are Hugging Face folders with (sharded) safetensors weights. Tensors are streamed in row blocks
(peak memory a few blocks, whatever the model size; shard boundaries may differ between the inputs),
computed in float32 and stored in the CPT model's dtype. Config, tokenizer and chat template come from the
instruct model. The output folder gets a residual_manifest.json (input fingerprints, alpha, grown rows).

examples:
  ipt residual --base Llama-3-8B --instruct Llama-3-8B-Instruct --cpt runs/med/hf --output runs/med/hf-instruct
  ipt residual --base B --instruct I --save-residual llama3-8b-residual            # save instruct - base once
  ipt residual --residual llama3-8b-residual --cpt runs/law/hf --output runs/law/hf-instruct --alpha 0.8
"""


def add_parser(sub) -> None:
    p = sub.add_parser("residual", help="Add an instruction residual (instruct - base) to a continually "
                       "pre-trained model, streamed tensor by tensor.", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="the base model the CPT run started from (HF folder)")
    p.add_argument("--instruct", help="the instruct model of the same release (HF folder)")
    p.add_argument("--cpt", help="the continually pre-trained base model (HF folder, e.g. from ipt convert megatron-to-hf)")
    p.add_argument("--residual", help="a residual saved earlier with --save-residual (instead of --base/--instruct)")
    p.add_argument("--output", help="output HF folder (must not exist unless --overwrite)")
    p.add_argument("--alpha", type=float, default=1.0, help="scale of the residual (default 1.0, as in the paper)")
    p.add_argument("--save-residual", metavar="DIR", help="also (or only, without --cpt) save instruct - base here")
    p.add_argument("--residual-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of a saved residual: float32 is exact for bf16 models; bfloat16 halves the size "
                   "at one extra rounding (default float32)")
    p.add_argument("--max-shard-size", type=float, default=5.0, metavar="GB",
                   help="largest output shard in GB (1e9 bytes; default 5, as save_pretrained)")
    p.add_argument("--block-mb", type=int, default=64, help="row block read per tensor step, MiB (default 64)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(handler=run)


def run(args) -> int:
    from megatron_ipt.hf import residual as r
    from megatron_ipt.errors import IptError

    common = dict(max_shard_bytes=int(args.max_shard_size * 1e9), block_bytes=args.block_mb * 2**20,
                  overwrite=args.overwrite, progress=True)
    if args.residual:
        if args.base or args.instruct or args.save_residual:
            raise IptError("--residual replaces --base/--instruct/--save-residual: give one or the other")
        if not (args.cpt and args.output):
            raise IptError("--residual needs --cpt and --output")
        rep = r.apply_residual(args.residual, args.cpt, args.output, alpha=args.alpha, **common)
    elif args.base and args.instruct and args.cpt and args.output:
        rep = r.add_instruction_residual(args.base, args.instruct, args.cpt, args.output, alpha=args.alpha,
                                         save_residual=args.save_residual, residual_dtype=args.residual_dtype, **common)
    elif args.base and args.instruct and args.save_residual and not (args.cpt or args.output):
        rep = r.save_instruction_residual(args.base, args.instruct, args.save_residual, args.residual_dtype, **common)
    else:
        raise IptError("give --base, --instruct, --cpt and --output (optionally --save-residual); or --base, "
                       "--instruct and --save-residual; or --residual, --cpt and --output")
    print(f"wrote {rep.output}: {rep.tensors} tensors, {rep.bytes_written / 1e9:.2f} GB in {rep.seconds:.1f} s "
          f"({rep.gb_per_s:.2f} GB/s read), alpha {rep.alpha}")
    for name, g in rep.grown.items():
        print(f"  grown vocabulary: {name} rows {g['base_rows']}..{g['rows'] - 1} taken from the instruct model")
    for note in rep.dtype_notes[:5]:
        print(f"  note: {note}")
    return 0
