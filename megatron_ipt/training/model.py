"""Build a megatron-core ``GPTModel`` (Llama architecture) from a preset, a layout and a device.

The model code is megatron-core's; this module only maps our config onto ``TransformerConfig`` and
picks the layer spec: Transformer Engine's (``get_gpt_layer_with_transformer_engine_spec``) when the
device is cuda and ``transformer_engine`` imports, else the local spec (``get_gpt_layer_local_spec``),
which is what runs on CPU; the local spec's core attention is PyTorch's ``scaled_dot_product_attention``
unless ``model.attention_backend`` is ``unfused`` (:mod:`megatron_ipt.training.attention`). Every
megatron-core call goes through :mod:`megatron_ipt.training.mcore` (keywords only, ``TransformerConfig`` built
from its actual fields), so the module works across megatron-core versions.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch
import torch.nn.functional as F

from megatron_ipt.training import mcore
from megatron_ipt.training.attention import (AttentionBackendError, resolve_attention_backend,
                                             rotated_key_cache_self_attention, sdpa_core_attention,
                                             with_core_attention, with_self_attention)
from megatron_ipt.training.parallel import Layout
from megatron_ipt.training.presets import ModelPreset


def transformer_engine_available() -> bool:
    """True when the ``transformer_engine`` package can be imported (GPU stacks only)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def transformer_config(preset: ModelPreset, layout: Layout, *, device: torch.device, precision: str,
                       precision_fields: dict | None = None):
    """megatron-core ``TransformerConfig`` for a Llama model: RMSNorm, SwiGLU, no linear biases, GQA.

    On CPU adds the settings CPU needs (``use_cpu_initialization``, no fusions). ``precision`` is
    ``fp32`` or ``bf16``; ``pipeline_dtype`` is set for pipeline parallel runs. ``precision_fields`` (from
    :func:`megatron_ipt.training.precision.precision_fields`: FP8 format, recipe, amax history, bf16 first/last
    layers) are passed through.
    """
    bf16 = precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    on_cpu = device.type == "cpu"
    fused_kernels = not on_cpu and transformer_engine_available()
    kwargs = dict(
        num_layers=preset.num_layers,
        hidden_size=preset.hidden_size,
        ffn_hidden_size=preset.ffn_hidden_size,
        num_attention_heads=preset.num_attention_heads,
        num_query_groups=preset.num_query_groups,
        kv_channels=preset.kv_channels,
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        pipeline_dtype=dtype,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
        context_parallel_size=layout.context_parallel_size,
        sequence_parallel=layout.sequence_parallel,
        normalization="RMSNorm",
        layernorm_epsilon=preset.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=preset.add_qkv_bias,
        qk_layernorm=preset.qk_layernorm,
        # Hugging Face's sliding_window W: the token and the W - 1 before it (megatron-core / TE: (left, right))
        **({"window_size": (preset.sliding_window - 1, 0)} if preset.sliding_window else {}),
        **moe_fields(preset, layout, on_cpu=on_cpu),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=preset.init_method_std,
        bf16=bf16,
        params_dtype=dtype,
        # CPU: weights initialised on the host, no CUDA fused kernels.
        use_cpu_initialization=on_cpu,
        gradient_accumulation_fusion=False,
        # RoPE fusion, persistent LayerNorm and masked-softmax fusion are Transformer Engine / Apex kernels:
        # megatron-core refuses apply_rope_fusion without TE, so a GPU without TE runs them unfused.
        apply_rope_fusion=fused_kernels,
        persist_layer_norm=fused_kernels,
        bias_activation_fusion=not on_cpu,
        bias_dropout_fusion=not on_cpu,
        masked_softmax_fusion=fused_kernels,
    )
    kwargs.update({k: v for k, v in (precision_fields or {}).items() if k != "bf16"})
    return mcore.transformer_config(**kwargs)


def moe_fields(preset: ModelPreset, layout: Layout, *, on_cpu: bool) -> dict:
    """``TransformerConfig`` fields of megatron-core's ``MoELayer`` for an MoE preset (empty for a dense one):
    experts, top-k, expert size, router normalisation, auxiliary load-balancing loss, expert parallel and expert
    tensor parallel sizes. Tokens move with the all-gather dispatcher on CPU (gloo), with the all-to-all dispatcher on a GPU; the experts'
    module (and ``moe_grouped_gemm``) follows the layer spec (:func:`build_model_chunks`)."""
    if not preset.num_moe_experts:
        return {}
    return dict(num_moe_experts=preset.num_moe_experts, moe_router_topk=preset.moe_router_topk,
                moe_ffn_hidden_size=preset.expert_ffn_hidden_size, moe_router_pre_softmax=preset.moe_router_pre_softmax,
                moe_router_load_balancing_type="aux_loss" if preset.moe_aux_loss_coeff else "none",
                moe_aux_loss_coeff=preset.moe_aux_loss_coeff,
                moe_token_dispatcher_type="allgather" if on_cpu else "alltoall",
                expert_model_parallel_size=layout.expert_model_parallel_size,
                expert_tensor_parallel_size=layout.expert_tensor_parallel_size)


def layer_spec(device: torch.device, *, use_transformer_engine: bool | None = None, qk_layernorm: bool = False,
               num_experts: int | None = None, attention_backend: str = "auto", sliding_window: int | None = None):
    """The transformer layer ``ModuleSpec``: TE spec on cuda when TE imports, else the local spec, whose core
    attention ``attention_backend`` picks (``model.attention_backend``: ``auto`` / ``sdpa`` = PyTorch's
    ``scaled_dot_product_attention``, :mod:`megatron_ipt.training.attention`; ``unfused`` = megatron-core's own).

    ``qk_layernorm``: an RMSNorm over each query and key head (Qwen3; torch's ``RMSNorm`` in the local spec).
    ``num_experts``: an MoE layer instead of the MLP (grouped GEMM with TE, ``SequentialMLP`` in the local spec).
    ``use_transformer_engine=True`` on a machine without TE raises RuntimeError (no silent downgrade); ``sdpa`` or
    ``unfused`` with TE raise ``AttentionBackendError`` naming the key. ``sliding_window`` (the preset's): TE's
    attention and the SDPA one apply it; ``unfused`` raises ``AttentionBackendError`` (megatron-core's unfused
    softmax builds its window mask on cuda and drops the padding / document mask).
    """
    if use_transformer_engine is None:
        use_transformer_engine = device.type == "cuda" and transformer_engine_available()
    if use_transformer_engine:
        if device.type != "cuda" or not transformer_engine_available():
            raise RuntimeError("the Transformer Engine layer spec needs a cuda device and transformer_engine installed")
        resolve_attention_backend(attention_backend, "transformer_engine")
        return mcore.transformer_engine_layer_spec(qk_layernorm=qk_layernorm, num_experts=num_experts,
                                                   moe_grouped_gemm=bool(num_experts))
    spec = mcore.local_layer_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm", num_experts=num_experts,
                                  moe_grouped_gemm=False)
    backend = resolve_attention_backend(attention_backend, "local")
    if sliding_window and backend == "unfused":
        raise AttentionBackendError(
            f"model.attention_backend = unfused: megatron-core's unfused attention cannot apply the model's "
            f"sliding_window {sliding_window} with padding or document masks (nor on CPU); use auto or sdpa")
    if backend == "sdpa":  # and the KV cache of generation keeps keys after RoPE
        spec = with_self_attention(with_core_attention(spec, sdpa_core_attention()), rotated_key_cache_self_attention())
    return spec


def build_model(
    preset: ModelPreset,
    layout: Layout,
    *,
    vocab_size: int,
    seq_length: int,
    device: torch.device,
    precision: str = "fp32",
    transformer_impl: str = "auto",
    precision_fields: dict | None = None,
    attention_backend: str = "auto",
) -> torch.nn.Module:
    """Build this rank's pipeline stage of a ``GPTModel`` (RoPE; embeddings tied when the preset says so) on ``device``.

    One module: for a layout without virtual pipeline stages (see :func:`build_model_chunks` for those).
    ``vocab_size`` must already be padded (:func:`megatron_ipt.training.presets.padded_vocab_size`). Needs
    megatron's parallel state initialised. With ``precision="bf16"`` the model is wrapped in
    ``Float16Module`` as Megatron-LM does. Returns the (possibly wrapped) module, not yet DDP-wrapped.
    Raises ValueError for a layout with virtual pipeline stages.
    """
    if layout.virtual_pipeline_model_parallel_size is not None:
        raise ValueError("build_model builds one module; use build_model_chunks with virtual pipeline stages")
    return build_model_chunks(preset, layout, vocab_size=vocab_size, seq_length=seq_length, device=device,
                              precision=precision, transformer_impl=transformer_impl,
                              precision_fields=precision_fields, attention_backend=attention_backend)[0]


def build_model_chunks(
    preset: ModelPreset,
    layout: Layout,
    *,
    vocab_size: int,
    seq_length: int,
    device: torch.device,
    precision: str = "fp32",
    transformer_impl: str = "auto",
    precision_fields: dict | None = None,
    attention_backend: str = "auto",
) -> list[torch.nn.Module]:
    """This rank's model chunks: one ``GPTModel`` per virtual pipeline stage (one without virtual stages).

    Mirrors Megatron-LM's ``get_model``: chunk ``i`` is built with ``vp_stage=i`` (megatron-core >= 0.13
    takes the virtual stage as an argument; the global ``set_virtual_pipeline_model_parallel_rank`` is
    deprecated), so it holds global layers ``i * PP * L + pp_rank * L ... + L - 1`` with ``L = num_layers /
    (PP * VPP)``; the embedding lives in chunk 0 of the first pipeline rank and the output layer in the last
    chunk of the last rank. All chunks share one ``TransformerConfig`` (the schedule reads the first chunk's).
    Same arguments and wrapping as :func:`build_model` (``attention_backend``: ``model.attention_backend``, see
    :func:`layer_spec`); returns the list (length VPP, or 1). With
    ``device=torch.device("meta")`` the modules have the CPU model's structure and no parameter memory (what
    ``megatron_ipt.hf.convert`` needs for the checkpoint's sharded-state-dict layout).
    """
    ps = mcore.parallel_state()
    meta = device.type == "meta"  # structure only (no memory): the CPU model's layers, parameters on meta
    real = torch.device("cpu") if meta else device
    config = transformer_config(preset, layout, device=real, precision=precision, precision_fields=precision_fields)
    if meta:
        config.perform_initialization = False
    use_te = None if transformer_impl == "auto" else transformer_impl == "transformer_engine"
    spec = layer_spec(real, use_transformer_engine=use_te, qk_layernorm=preset.qk_layernorm,
                      num_experts=preset.num_moe_experts, attention_backend=attention_backend,
                      sliding_window=preset.sliding_window)
    if preset.num_moe_experts:  # TE spec: grouped GEMM (TEGroupedMLP); local spec: SequentialMLP
        config.moe_grouped_gemm = use_te if use_te is not None else real.type == "cuda" and transformer_engine_available()
    vpp = layout.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = {} if vpp is None else {"vp_stage": vp_stage}
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = mcore.gpt_model(
                config=config,
                transformer_layer_spec=spec,
                vocab_size=vocab_size,
                max_sequence_length=max(seq_length, preset.max_position_embeddings),
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=vpp is None, vp_stage=vp_stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=vpp is None, vp_stage=vp_stage),
                parallel_output=True,
                share_embeddings_and_output_weights=preset.tie_word_embeddings,
                position_embedding_type="rope",
                rotary_base=int(preset.rotary_base),
                **({"rope_scaling": True, "rope_scaling_factor": preset.rope_scaling_factor}
                   if preset.rope_scaling_factor else {}),
                **stage,
            )
        if not meta:
            model.to(device)
        if config.bf16:
            model = mcore.float16_module(config, model)
        chunks.append(model)
    return chunks


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters held by this rank (shards of tensor-parallel weights count once per shard)."""
    return sum(p.numel() for p in model.parameters())
