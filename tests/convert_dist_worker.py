"""Load converted checkpoints into a TP x PP world of gloo processes and save each one's logits and per-token
losses (used by tests/test_convert.py), relaunching itself under torchrun.

    python tests/convert_dist_worker.py TOKENS.pt --tp 2 --pp 2 [--ep 1] --case CKPT HF_FOLDER OUT.pt [--case ...]

``TOKENS.pt``: a [batch, seq] token tensor; labels are the next tokens (``tokens.roll(-1, 1)``); with expert
parallel every data-parallel rank runs the same batch. The rank on the last pipeline stage with tensor- and
data-parallel rank 0 writes ``OUT.pt``: ``{"logits": [b, s, V] (vocabulary
padding cut, gathered over TP), "losses": [b, s], "local_experts": experts held by that rank (0: dense)}``; every rank saves the loaded weights again from this
layout into ``OUT.resaved`` (weights-only torch_dist, like the converter's output).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_ipt.launch.torchrun import relaunch_under_torchrun  # noqa: E402


def run_case(ckpt: str, hf: str, out: str, tokens, layout, tp: int) -> None:
    import torch

    from megatron_ipt.training import checkpoint, mcore
    from megatron_ipt.training.model import build_model
    from megatron_ipt.training.presets import padded_vocab_size, preset_from_hf_config

    ps = mcore.parallel_state()
    preset = preset_from_hf_config(hf)
    batch, seq = tokens.shape
    model = build_model(preset, layout, vocab_size=padded_vocab_size(preset.vocab_size, tp), seq_length=seq,
                        device=torch.device("cpu"))
    checkpoint.load_model_weights(ckpt, model)
    checkpoint.save_model_weights(Path(out).with_suffix(".resaved"), model)  # saved again from this layout
    model.eval()
    position_ids = torch.arange(seq).unsqueeze(0).expand_as(tokens)
    results = {}
    for name, labels in (("logits", None), ("losses", tokens.roll(-1, dims=1))):
        def forward_step(data_iterator, module, labels=labels):
            next(data_iterator)
            output = module(input_ids=tokens, position_ids=position_ids, attention_mask=None, labels=labels)
            return output, lambda o: (o.float().sum() * 0.0, {"out": o.detach().clone()})

        with torch.no_grad():
            outputs = mcore.forward_backward_func()(
                forward_step_func=forward_step, data_iterator=[iter([None])], model=[model], num_microbatches=1,
                seq_length=seq, micro_batch_size=batch, forward_only=True)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            results[name] = outputs[0]["out"]
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        parts = [torch.empty_like(results["logits"]) for _ in range(tp)]
        torch.distributed.all_gather(parts, results["logits"].contiguous(), group=ps.get_tensor_model_parallel_group())
        if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            logits = torch.cat(parts, dim=-1)[..., : preset.vocab_size]
            local_experts = {n.split(".local_experts.")[1].split(".")[0] for n, _ in model.named_parameters()
                             if ".local_experts." in n}
            torch.save({"logits": logits, "losses": results["losses"], "local_experts": len(local_experts)}, out)
    torch.distributed.barrier()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("tokens")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--ep", type=int, default=1, help="expert parallel size (MoE; the world is TP x PP x EP)")
    p.add_argument("--case", nargs=3, action="append", required=True, metavar=("CKPT", "HF", "OUT"))
    args = p.parse_args()
    relaunch_under_torchrun([__file__, *sys.argv[1:]], args.tp * args.pp * args.ep)

    import torch

    from megatron_ipt.training import cpu_backend, parallel
    from megatron_ipt.config import ParallelConfig
    from megatron_ipt.training.presets import preset_from_hf_config

    tokens = torch.load(args.tokens)
    preset = preset_from_hf_config(args.case[0][1])
    with cpu_backend.cpu_backend(enabled=True):
        layout = parallel.setup(
            ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                           expert_model_parallel_size=args.ep),
            torch.device("cpu"), micro_batch_size=tokens.shape[0], global_batch_size=tokens.shape[0] * args.ep,
            num_layers=preset.num_layers, num_attention_heads=preset.num_attention_heads,
            num_query_groups=preset.num_query_groups, num_moe_experts=preset.num_moe_experts, seed=0)
        try:
            for ckpt, hf, out in args.case:
                run_case(ckpt, hf, out, tokens, layout, args.tp)
        finally:
            parallel.teardown()


if __name__ == "__main__":
    main()
