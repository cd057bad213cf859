"""``ipt plan``: will a layout fit in GPU memory? Per-GPU bytes of the largest pipeline stage, before submitting.

    ipt plan examples/llama3-70b-cpt.yaml [--set key=value ...] [--world-size 64] [--gpu-memory-gb 80]

Prints, for one rank of the most loaded pipeline stage: parameters, weight bytes, gradient bytes, optimizer-state
bytes, activation bytes of the micro-batches in flight, the logits, and the total; ends with ``fits: yes (X GB of
G GB)`` (exit 0) or ``fits: no (...)`` (exit 3). Config problems that need no GPU (layout divisibility, recompute and
overlap rules, the model preset or ``hf_config``) are reported together, one line each (exit 2).

The model: megatron-core's Llama ``GPTModel`` as :mod:`megatron_ipt.training.model` builds it.

- **Weights**: every parameter tensor of the stage (QKV, projection, SwiGLU fc1/fc2, two RMSNorm weights per layer;
  word embeddings on the first stage, final norm and output layer on the last, a copy of tied embeddings on the last
  stage when PP > 1), column/row-parallel matrices divided by TP; 2 bytes each in bf16, 4 in fp32. A
  mixture-of-experts layer holds its router (``E x h``, not split) and ``E / EP`` whole experts, each matrix divided
  by the expert tensor parallel size (every expert counts here; FLOPs count the top-k active ones). With the
  distributed optimizer the weights live in megatron-core's contiguous parameter buffer, padded as it pads
  (``param_and_grad_buffer.py``: every parameter starts at a multiple of 64 elements, every bucket ends at a multiple
  of lcm(DP, 128)).
- **Gradients**: the DDP gradient buffer, same elements and padding, 4 bytes each with ``grad_reduce_in_fp32`` (or
  fp32), else 2.
- **Optimizer states**: Adam's two moments in fp32 plus, in bf16, an fp32 main copy of the weights: 8 or 12 bytes per
  parameter; with the distributed optimizer one DP shard of the padded buffer per rank (Rajbhandari et al. 2020,
  ZeRO stage 1; Megatron-LM's ``theoretical_memory_usage.py`` counts 6 + 12 / DP bytes per parameter the same way);
  with EP > 1 the experts sit in a buffer of their own, sharded over the expert data parallel ranks,
  world / (ETP * EP * PP).
- **Activations**: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", Table 2
  and section 4, per layer and micro-batch of ``s`` tokens (``s = seq_length / CP``), batch ``b``, generalised from
  multi-head attention with a 4h GeLU MLP to grouped-query attention (``a`` query heads, ``g`` key/value groups of
  ``d`` channels) and SwiGLU (``f`` = ffn_hidden_size; fc1 produces 2f), without dropout (Llama trains with none):
  the two norms' inputs and outputs 8sbh; Q, K, V and the attention output 2sb(2ad + 2gd); the attention scores
  and softmax 4as²b unless the attention is fused (Transformer Engine) or recomputed (selective ``core_attn``); the
  MLP's fc1 output and fc2 input 6sbf (``mlp`` recompute keeps only its input); an MoE layer instead keeps its
  routed tokens' permuted inputs and fc1 / fc2 activations (``_activation_bytes_per_layer``; balanced routing). With FP8 the GEMM inputs after the
  norms and before fc2 are Transformer Engine's 1-byte copies (norms 6sbh, MLP 5sbf). Everything is divided by TP except
  the norm terms, which only sequence parallel divides. Full recompute keeps only the input of each recompute unit
  (2sbh, /TP with sequence parallel) plus one unit's activations while it is recomputed. The first pipeline stage holds
  ``min(PP, micro-batches)`` micro-batches in flight (1F1B), times ``1 + (PP-1)/(PP·VPP)`` with virtual stages
  (Narayanan et al. 2021, as Megatron-LM's report).
- **Logits** (last stage): ``s·b·V/TP`` logits in the activation precision plus the fp32 copy megatron-core's
  vocab-parallel cross entropy works on (6 bytes per logit in bf16, 8 in fp32).

Not counted: the CUDA context and NCCL buffers (about 1-3 GB per GPU), allocator fragmentation, Transformer Engine
workspaces and FP8 weight copies; leave that much headroom below ``fits: yes``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field

GB = 1e9
EXIT_DOES_NOT_FIT = 3


@dataclass
class Plan:
    """Bytes per GPU of the most loaded pipeline stage (one rank of it)."""

    stage: str
    parameters: int
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    logits_bytes: int
    in_flight_microbatches: float
    details: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return (self.weight_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes
                + self.logits_bytes)


def layer_parameter_numels(p, tp: int) -> list[int]:
    """Numels of one transformer layer's non-expert parameter tensors on one TP rank, in registration order (``p``:
    a ``ModelPreset``): input norm, QKV (+ bias), Qwen3's per-head query / key norms, projection, pre-MLP norm, then
    fc1 (gate and up) and fc2 for a dense MLP, or the router (``E x h``, not split) for an MoE layer."""
    d, a, g, h, f = p.kv_channels, p.num_attention_heads, p.num_query_groups, p.hidden_size, p.ffn_hidden_size
    qkv = (a + 2 * g) * d
    numels = ([h, h * qkv // tp] + ([qkv // tp] if p.add_qkv_bias else []) + ([d, d] if p.qk_layernorm else [])
              + [a * d * h // tp, h])
    if p.num_moe_experts:
        return numels + [p.num_moe_experts * h]
    return numels + [h * 2 * f // tp, f * h // tp]


def layer_expert_numels(p, *, ep: int, etp: int) -> list[int]:
    """Numels of one MoE layer's expert tensors on one rank: ``E / EP`` local experts (megatron-core's
    ``SequentialMLP``), each fc1 ``2 Fe / ETP x h`` and fc2 ``h x Fe / ETP``; empty for a dense preset."""
    if not p.num_moe_experts:
        return []
    fe, h = p.expert_ffn_hidden_size, p.hidden_size
    return [2 * fe * h // etp, fe * h // etp] * (p.num_moe_experts // ep)


def stage_parameter_numels(p, *, vocab: int, tp: int, pp: int, vpp: int | None, first: bool, last: bool) -> list[int]:
    """Numels of every non-expert parameter tensor one rank of a pipeline stage holds (all its model chunks);
    the experts are :func:`stage_expert_numels`."""
    chunks = vpp or 1
    layers = p.num_layers // (pp * chunks)
    numels: list[int] = []
    for chunk in range(chunks):
        pre = first and chunk == 0
        post = last and chunk == chunks - 1
        if pre:
            numels.append(vocab * p.hidden_size // tp)
        for _ in range(layers):
            numels += layer_parameter_numels(p, tp)
        if post:
            numels.append(p.hidden_size)  # final norm
            if not p.tie_word_embeddings or not pre:  # the output layer, or the last stage's copy of tied embeddings
                numels.append(vocab * p.hidden_size // tp)
    return numels


def stage_expert_numels(p, *, pp: int, ep: int, etp: int) -> list[int]:
    """Numels of the expert tensors one rank of a pipeline stage holds (every layer of an MoE preset is MoE)."""
    return layer_expert_numels(p, ep=ep, etp=etp) * (p.num_layers // pp)


def buffer_numel(numels: list[int], *, distributed_optimizer: bool, dp: int, bucket_size: int | None) -> int:
    """Elements of megatron-core's DDP buffer for these parameters (``ParamAndGradBuffer``: parameters taken in
    reverse order; with the distributed optimizer each starts at a multiple of 64 and each bucket ends at a multiple
    of lcm(DP, 128))."""
    if not distributed_optimizer:
        return sum(numels)
    pad = lambda n, k: -(-n // k) * k  # noqa: E731
    divisor = math.lcm(dp, 128)
    start = bucket_start = 0
    end = 0
    for n in reversed(numels):
        start = pad(start, 64)
        end = start + n
        if bucket_size is not None and end - bucket_start >= bucket_size:
            end = bucket_start = pad(end, divisor)
        start = end
    return pad(end, divisor)


def _activation_bytes_per_layer(p, *, s: int, b: int, tp: int, sp: bool, fused_attention: bool,
                                modules: set[str], bytes_per: int, fp8: bool, etp: int = 1) -> int:
    """Korthikanti et al. 2022 generalised to GQA and SwiGLU (module docstring); selective ``modules`` dropped.
    ``bytes_per``: bytes of an activation (2 in bf16, 4 in fp32); with ``fp8`` the inputs of the GEMMs that follow a
    norm (QKV, fc1) and of fc2 are kept as Transformer Engine's 1-byte FP8 copies. An MoE layer (balanced routing,
    no token dropping): the ``t = s b / (TP if SP)`` tokens of the rank, gathered over the ETP x EP ranks and routed
    to the local experts, are ``ETP t k`` rows; each keeps its permuted input (h) and its fc1 output / fc2 input
    (3 Fe / ETP), so ``ETP t k h`` plus ``3 t k Fe`` elements (the router's logits, ``t E``, are left out)."""
    d, a, g, h, f = p.kv_channels, p.num_attention_heads, p.num_query_groups, p.hidden_size, p.ffn_hidden_size
    gemm_in = 1 if fp8 else bytes_per
    norms = (2 * bytes_per + 2 * gemm_in) * s * b * h // (tp if sp else 1)  # two norms: input and output each
    attention = bytes_per * s * b * (2 * a * d + 2 * g * d) // tp  # Q, K, V and the attention output
    scores = 0 if fused_attention or "core_attn" in modules else 2 * bytes_per * a * s * s * b // tp
    mlp = 0 if "mlp" in modules else (2 * bytes_per + gemm_in) * s * b * f // tp  # fc1 output (2f), fc2 input (f)
    if p.num_moe_experts and "mlp" not in modules:
        t, k, fe = s * b // (tp if sp else 1), p.moe_router_topk, p.expert_ffn_hidden_size
        mlp = gemm_in * etp * t * k * p.hidden_size + (2 * bytes_per + gemm_in) * t * k * fe
    return norms + attention + scores + mlp


def estimate(cfg, preset, *, world_size: int, vocab_size: int, fused_attention: bool) -> Plan:
    """The :class:`Plan` of ``cfg`` (an ``ExperimentConfig``) for ``preset`` on ``world_size`` GPUs; ``vocab_size``
    padded as the trainer pads it; ``fused_attention``: Transformer Engine's attention (no score matrices kept).
    The most loaded of :func:`estimate_stages`."""
    return max(estimate_stages(cfg, preset, world_size=world_size, vocab_size=vocab_size,
                               fused_attention=fused_attention).values(), key=lambda x: x.total_bytes)


def job_device(cfg) -> str:
    """The device type the planned job will run on: ``cpu`` only when ``train.device`` says so (``auto`` plans
    for the GPUs of the cluster, not for the machine that runs ``ipt plan``)."""
    return "cpu" if cfg.train.device == "cpu" else "cuda"


def estimate_stages(cfg, preset, *, world_size: int, vocab_size: int, fused_attention: bool) -> dict[str, Plan]:
    """One :class:`Plan` per distinct pipeline stage: ``only`` (PP = 1), or ``first`` and ``last``."""
    from megatron_ipt.training import scale
    from megatron_ipt.training.precision import with_resolved_precision

    cfg = with_resolved_precision(cfg, job_device(cfg))
    par, t = cfg.parallel, cfg.train
    tp, pp, cp, vpp = (par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size,
                       par.virtual_pipeline_model_parallel_size)
    dp = max(world_size // (tp * pp * cp), 1)
    ep, etp = par.expert_model_parallel_size, par.expert_tensor_parallel_size or tp
    edp = max(world_size // (etp * ep * pp), 1)  # expert data parallel: the distributed optimizer's expert shards
    bf16 = t.precision == "bf16"
    weight_b, grad_b = (2 if bf16 else 4), (4 if scale.grad_reduce_in_fp32(cfg) or not bf16 else 2)
    bucket = (par.bucket_size or max(40_000_000, 1_000_000 * dp)) if par.overlap_grad_reduce else None
    stages = {"first": (True, pp == 1), "last": (pp == 1, True)} if pp > 1 else {"only": (True, True)}
    s, b = cfg.model.seq_length // cp, t.micro_batch_size
    microbatches = t.global_batch_size // (b * dp)
    per_chunk = preset.num_layers // (pp * (vpp or 1))
    layers = preset.num_layers // pp
    modules = set(t.recompute_modules or scale.DEFAULT_RECOMPUTE_MODULES) if t.recompute == "selective" else set()
    act_bytes = 2 if bf16 else 4
    per_layer = _activation_bytes_per_layer(preset, s=s, b=b, tp=tp, sp=par.sequence_parallel,
                                            fused_attention=fused_attention, modules=modules, bytes_per=act_bytes,
                                            fp8=t.fp8 is not None, etp=etp)
    layer_input = act_bytes * s * b * preset.hidden_size // (tp if par.sequence_parallel else 1)
    if t.recompute == "full":
        n = scale.recompute_num_layers(cfg, preset.num_layers)
        if t.recompute_method == "uniform":  # one input per unit of n layers; one unit rebuilt at a time
            stored, transient = (layers // n) * layer_input, n * per_layer
        else:  # block: n layers per chunk keep their input only, the others everything
            kept = per_chunk - min(n, per_chunk)
            stored, transient = (vpp or 1) * (min(n, per_chunk) * layer_input + kept * per_layer), per_layer
    else:
        stored, transient = layers * per_layer, 0
    in_flight = min(pp, microbatches) if vpp is None else pp * (1 + (pp - 1) / (pp * vpp))
    embedding_out = act_bytes * s * b * preset.hidden_size // (tp if par.sequence_parallel else 1)
    activation = int(in_flight * (stored + embedding_out)) + transient
    plans = []
    for name, (first, last) in stages.items():
        numels = stage_parameter_numels(preset, vocab=vocab_size, tp=tp, pp=pp, vpp=vpp, first=first, last=last)
        experts = stage_expert_numels(preset, pp=pp, ep=ep, etp=etp)
        if ep == 1:  # megatron-core keeps experts in the dense buffer unless EP > 1 (their allreduce attribute)
            numels, experts = numels + experts, []
        distopt = par.use_distributed_optimizer
        buffer = buffer_numel(numels, distributed_optimizer=distopt, dp=dp, bucket_size=bucket)
        expert_buffer = buffer_numel(experts, distributed_optimizer=distopt, dp=edp, bucket_size=bucket) if experts else 0
        params = sum(numels) + sum(experts)
        optimizer_per_param = 12 if bf16 else 8
        optimizer = (optimizer_per_param * (buffer // dp + expert_buffer // edp) if distopt
                     else optimizer_per_param * params)
        weights = weight_b * (buffer + expert_buffer if distopt else params)
        buffer += expert_buffer
        logits = (6 if bf16 else 8) * s * b * vocab_size // tp if last else 0
        plans.append(Plan(stage=name, parameters=params, weight_bytes=weights, gradient_bytes=grad_b * buffer,
                          optimizer_bytes=optimizer, activation_bytes=activation if first else int(stored + transient),
                          logits_bytes=logits, in_flight_microbatches=in_flight if first else 1,
                          details={"data_parallel_size": dp, "microbatches": microbatches,
                                   "activation_bytes_per_layer": per_layer, "buffer_numel": buffer}))
    return {p.stage: p for p in plans}


# ------------------------------------------------------------------------------------------------ CLI
def problems(cfg, *, world_size: int) -> tuple[list[str], object | None]:
    """Every check that needs no GPU, all at once: the model (preset or ``hf_config``), the layout's divisibility
    rules, the precision rules and the recompute / overlap rules for the configured device. Returns (one line per
    problem, the resolved preset or None)."""
    from megatron_ipt.errors import IptError
    from megatron_ipt.training import parallel, scale
    from megatron_ipt.training.precision import precision_fields, resolve_transformer_impl
    from megatron_ipt.training.presets import resolve_preset

    found: list[str] = []
    try:
        preset = resolve_preset(cfg.model)
    except (IptError, OSError, ValueError, KeyError) as err:
        return [f"model: {err}"], None
    device = job_device(cfg)
    te = device == "cuda" and cfg.model.transformer_impl != "local"  # a GPU stack ships Transformer Engine
    try:
        parallel.check_layout(cfg.parallel, world_size=world_size, micro_batch_size=cfg.train.micro_batch_size,
                              global_batch_size=cfg.train.global_batch_size, seq_length=cfg.model.seq_length,
                              **parallel.model_fields(preset))
    except IptError as err:
        found += [line.strip() for line in str(err).splitlines()[1:]]
    try:
        impl = resolve_transformer_impl(cfg.model.transformer_impl, device, te)
        precision_fields(cfg.train, impl, device, te, preset.num_layers, cfg.parallel.pipeline_model_parallel_size)
    except IptError as err:
        found.append(str(err))
    found += scale.problems(cfg, num_layers=preset.num_layers, device_type=device, te_available=te)
    return found, preset


def for_run(cfg, preset, *, world_size: int, vocab_size: int, fused_attention: bool) -> dict:
    """The estimate of a starting run as plain data (GB), for the train manifest and the start-up line."""
    p = estimate(cfg, preset, world_size=world_size, vocab_size=vocab_size, fused_attention=fused_attention)
    fields = ("weight_bytes", "gradient_bytes", "optimizer_bytes", "activation_bytes", "logits_bytes", "total_bytes")
    return {"stage": p.stage, "parameters": p.parameters,
            **{k.replace("_bytes", "_gb"): round(getattr(p, k) / GB, 3) for k in fields}}


def report(plan: Plan, gpu_memory_gb: float) -> tuple[str, bool]:
    """The printed plan and whether it fits."""
    gb = lambda n: f"{n / GB:8.2f} GB"  # noqa: E731
    lines = [f"per GPU, {plan.stage} pipeline stage (the most loaded); data parallel {plan.details['data_parallel_size']}, "
             f"{plan.details['microbatches']} micro-batches per iteration",
             f"  parameters     {plan.parameters / 1e9:8.3f} B",
             f"  weights        {gb(plan.weight_bytes)}",
             f"  gradients      {gb(plan.gradient_bytes)}",
             f"  optimizer      {gb(plan.optimizer_bytes)}",
             f"  activations    {gb(plan.activation_bytes)}  ({plan.in_flight_microbatches:g} micro-batches in flight)",
             f"  logits         {gb(plan.logits_bytes)}",
             f"  total          {gb(plan.total_bytes)}"]
    fits = plan.total_bytes <= gpu_memory_gb * GB
    lines.append(f"fits: {'yes' if fits else 'no'} ({plan.total_bytes / GB:.1f} GB of {gpu_memory_gb:g} GB)")
    return "\n".join(lines), fits


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="Estimate per-GPU memory of the config's layout and check it before submitting.",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="experiment YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--world-size", type=int, default=None,
                   help="GPUs of the job (default: parallel.nproc_per_node)")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU in GB (default 80)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from megatron_ipt.config import load_config
    from megatron_ipt.training.presets import padded_vocab_size

    cfg = load_config(args.config, args.overrides)
    world_size = args.world_size or cfg.parallel.nproc_per_node
    found, preset = problems(cfg, world_size=world_size)
    if found:
        for line in found:
            print(f"ipt plan: {line}", file=sys.stderr)
        return 2
    vocab = padded_vocab_size(preset.vocab_size, cfg.parallel.tensor_model_parallel_size)
    fused = cfg.train.device != "cpu" and cfg.model.transformer_impl != "local"
    plan = estimate(cfg, preset, world_size=world_size, vocab_size=vocab, fused_attention=fused)
    text, fits = report(plan, args.gpu_memory_gb)
    print(text)
    return 0 if fits else EXIT_DOES_NOT_FIT
