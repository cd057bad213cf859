"""Core attention for megatron-core's local layer spec on ``torch.nn.functional.scaled_dot_product_attention``.

Without Transformer Engine, megatron-core's local spec computes attention with ``DotProductAttention``: the full
``[b, heads, sq, sk]`` score matrix in unfused ``baddbmm`` / masked softmax / ``bmm`` ops, with the grouped key/value
heads repeated first. :func:`sdpa_core_attention` returns a subclass of it whose ``forward`` calls PyTorch's
``scaled_dot_product_attention`` (SDPA) instead: flash / memory-efficient kernels on a GPU, a fused flash kernel on
CPU, keys and values of grouped-query attention passed ungrouped (``enable_gqa``). Everything else is the parent's:
constructor, parameters (none), ``sharded_state_dict``, so checkpoints are the same either way and
``isinstance(m, DotProductAttention)`` holds (``megatron_ipt.training.mcore.applies_attention_masks``).

It is plugged in through megatron-core's module spec (:func:`with_core_attention` replaces the ``core_attention``
entry of the local spec's self-attention), no fork. ``model.attention_backend`` selects it
(:func:`resolve_attention_backend`): ``auto`` and ``sdpa`` use it with the local spec, ``unfused`` keeps
megatron-core's own ``DotProductAttention``.

Same results as the parent (tested within 1e-5 in float32, logits and gradients):

- causal self-attention with no mask: ``is_causal=True`` (the parent builds an upper-triangular mask);
- a boolean ``attention_mask`` (``[b or 1, 1, sq, sk]``, True = masked: padding, document masks of
  ``reset_attention_mask``, the KV-cached batch's left padding) is applied as it is, as the parent's
  ``masked_fill`` does; one query row with every key masked (a left-padding position) attends to every key
  instead (the parent spreads it evenly; SDPA kernels could return NaN or 0 there) - its output is never used;
- one query with no mask (KV-cached decoding, ``sq == 1``): no mask, as the parent;
- dropout ``attention_dropout`` in training, under megatron's CUDA RNG tracker as the parent (other random draws,
  so not the same dropped entries);
- ``softmax_scale`` (default ``1 / sqrt(head dim)``) as SDPA's ``scale``;
- sliding-window attention (``TransformerConfig.window_size = (left, 0)``, set from a Mistral / Mixtral
  ``sliding_window`` W as ``(W - 1, 0)``): query ``i`` sees keys ``i - left <= j <= i``, positions counted
  bottom-right aligned (the last query is the last key, as in KV-cached decoding), combined with any given mask
  (:func:`sliding_window_mask`). The parent cannot stand in here: it builds its window mask on ``cuda`` and
  drops the given padding / document mask (``fused_softmax.forward_torch_softmax``), so the ``unfused`` backend
  refuses windows (:func:`megatron_ipt.training.model.layer_spec`).

Cases SDPA cannot express run the parent's unfused ``forward``, with the same result: a window open to the
right, an off-by-one or learnable softmax offset, ``apply_query_key_layer_scaling``, a non-boolean mask, a causal
call with ``sq != sk`` and no mask, attention bias or packed sequences (the parent refuses the last two).

The same backend also swaps the self-attention module for :func:`rotated_key_cache_self_attention`'s subclass of
megatron-core's ``SelfAttention``, which keeps the KV cache of static-batch generation (``StaticInferenceContext``)
with RoPE already applied to the keys: megatron-core stores keys before RoPE and rotates every cached key again at
every decoding step, in every layer (its ``flash_decode`` option rotates before caching but decodes with a
CUDA-only kernel). Training and any forward without an inference context are the parent's, untouched.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import torch
import torch.nn.functional as F

from megatron_ipt.errors import IptError
from megatron_ipt.training import mcore

BACKENDS = ("auto", "sdpa", "unfused")


class AttentionBackendError(IptError, ValueError):
    """``model.attention_backend`` that cannot be used with the run's layer implementation; names the key."""


def resolve_attention_backend(backend: str, transformer_impl: str) -> str | None:
    """``sdpa`` or ``unfused`` for ``model.attention_backend`` with the resolved ``model.transformer_impl``
    (``local`` or ``transformer_engine``); None with Transformer Engine, whose spec brings its own fused attention.
    ``auto``: ``sdpa`` with the local spec. Raises AttentionBackendError for ``sdpa`` / ``unfused`` with
    Transformer Engine and for an unknown value."""
    if backend not in BACKENDS:
        raise AttentionBackendError(f"model.attention_backend = {backend!r}: use one of {', '.join(BACKENDS)}")
    if transformer_impl == "transformer_engine":
        if backend != "auto":
            raise AttentionBackendError(
                f"model.attention_backend = {backend} applies to megatron-core's local layer spec; with "
                "model.transformer_impl transformer_engine use auto (Transformer Engine's own fused attention)")
        return None
    return "unfused" if backend == "unfused" else "sdpa"


def with_core_attention(spec, core_attention: type):
    """A copy of a GPT layer ``ModuleSpec`` (``get_gpt_layer_local_spec``'s) whose self-attention builds
    ``core_attention`` (a ``DotProductAttention`` drop-in: same constructor and ``forward`` arguments)."""
    attention = spec.submodules.self_attention
    attention = replace(attention, submodules=replace(attention.submodules, core_attention=core_attention))
    return replace(spec, submodules=replace(spec.submodules, self_attention=attention))


def with_self_attention(spec, self_attention: type):
    """A copy of a GPT layer ``ModuleSpec`` whose self-attention module is ``self_attention`` (a subclass of the
    spec's own, same constructor and submodules); the spec itself where its module is not a superclass of it."""
    attention = spec.submodules.self_attention
    if not (isinstance(attention.module, type) and issubclass(self_attention, attention.module)):
        return spec
    return replace(spec, submodules=replace(spec.submodules, self_attention=replace(attention, module=self_attention)))


def rotated_key_cache_self_attention() -> type:
    """megatron-core's ``SelfAttention`` with the static-batch KV cache holding keys after RoPE.

    megatron-core's ``_adjust_key_value_for_inference`` (static batching) writes the new keys into the cache
    before RoPE and returns the whole cache with the rotary embedding of every cached position, which
    ``Attention.forward`` then applies to all of them: per decoding step, ``cos`` / ``sin`` and a rotation of
    ``[positions, b, groups, d]`` per layer, growing with the context. The subclass rotates only the new keys
    (their positions ``offset .. offset + n``, with the same ``apply_rotary_pos_emb`` call, YaRN scale and
    config the parent's forward uses) before they are cached, together with the queries (the same positions:
    one call on both, concatenated over heads), and returns no rotary embedding, so ``forward`` rotates
    nothing more. The attention scores are the same up to float rounding (RoPE is elementwise per
    position); the ids of greedy generation are the same (``tests/test_attention.py``).

    Falls back to the parent's path, unchanged: outside generation (no inference context: training, scoring),
    with a dynamic-batching context, with ``flash_decode`` (the parent rotates before caching there), with
    context parallelism, without RoPE in this layer, or where this megatron-core version lacks the helpers.
    Parameters and ``sharded_state_dict`` are the parent's: checkpoints are the same."""
    return _rotated_key_cache_class()


def sdpa_core_attention() -> type:
    """The ``DotProductAttention`` subclass that computes attention with ``scaled_dot_product_attention``
    (this module's docstring says what it covers). Built once per process from the installed megatron-core."""
    return _sdpa_class()


def sdpa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                   *, causal: bool, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention in megatron's layout: ``query`` ``[sq, b, heads, d]``, ``key`` / ``value`` ``[sk, b, groups, d]``
    (``heads`` a multiple of ``groups``; not repeated: SDPA's ``enable_gqa``), ``attention_mask`` boolean,
    broadcastable to ``[b, heads, sq, sk]``, True = masked (rows masked everywhere attend to every key). ``causal``
    applies the causal mask (top-left aligned: only meaningful with ``sq == sk`` and no mask). Returns
    ``[sq, b, heads * d]``, contiguous."""
    sq, b, heads, d = query.shape
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads or groups, s, d], views
    attend = None
    if attention_mask is not None:
        attend = ~attention_mask
        attend = attend | ~attend.any(dim=-1, keepdim=True)  # a fully masked row: NaN or 0 in SDPA kernels
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout_p, is_causal=causal,
                                             scale=scale, enable_gqa=heads != key.size(2))
    return context.permute(2, 0, 1, 3).reshape(sq, b, heads * d)  # [b, heads, sq, d] -> [sq, b, heads * d]


def sliding_window_mask(sq: int, sk: int, left: int, device=None) -> torch.Tensor:
    """Boolean ``[sq, sk]``, True = masked: query ``i`` sits at key position ``sk - sq + i`` (bottom-right
    aligned) and sees the keys ``j`` with ``pos - left <= j <= pos`` (``left = W - 1`` for a Hugging Face
    ``sliding_window`` W: ``pos - W < j <= pos``, transformers' ``sliding_window_overlay``); ``left < 0``: no
    lower bound (causal only)."""
    pos = torch.arange(sk - sq, sk, device=device).unsqueeze(1)
    key = torch.arange(sk, device=device).unsqueeze(0)
    masked = key > pos
    return masked | (key < pos - left) if left >= 0 else masked


@lru_cache(maxsize=1)
def _sdpa_class() -> type:
    base = mcore.dot_product_attention_class()

    class SDPADotProductAttention(base):
        """megatron-core's ``DotProductAttention`` computed by ``scaled_dot_product_attention`` (see
        :mod:`megatron_ipt.training.attention`). ``forward(query [sq, b, np, hn], key / value [sk, b, ng, hn],
        attention_mask [b, 1, sq, sk] bool or None, ...)`` -> ``[sq, b, np * hn]``, as the parent."""

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            # The parent ignores attn_mask_type too: its softmax follows the mask type given at construction.
            sq, sk = query.size(0), key.size(0)
            causal = self.attn_mask_type.name == "causal" and attention_mask is None and sq > 1
            # the parent resolves the layer's window (window_attn_skip_freq) into its softmax
            window = getattr(self.scale_mask_softmax, "window_size", self.config.window_size)
            if (window is not None and window[1] == 0
                    and (attention_mask is None or attention_mask.dtype == torch.bool)):  # causal band + given mask
                band = sliding_window_mask(sq, sk, window[0], device=query.device)
                attention_mask = band if attention_mask is None else attention_mask | band
                causal, window = False, None
            if (attention_bias is not None or packed_seq_params is not None or window is not None
                    or getattr(self, "softmax_offset", None) is not None or self.config.apply_query_key_layer_scaling
                    or (attention_mask is not None and attention_mask.dtype != torch.bool) or (causal and sq != sk)):
                return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                       attention_bias=attention_bias, packed_seq_params=packed_seq_params)
            dropout_p = self.attention_dropout.p if self.training else 0.0
            if dropout_p > 0.0 and not self.config.sequence_parallel:
                with mcore.cuda_rng_tracker().fork():  # as the parent: dropout draws from the model-parallel RNG
                    return sdpa_attention(query, key, value, attention_mask, causal=causal, scale=self.softmax_scale,
                                          dropout_p=dropout_p)
            return sdpa_attention(query, key, value, attention_mask, causal=causal, scale=self.softmax_scale,
                                  dropout_p=dropout_p)

    SDPADotProductAttention.__module__ = __name__
    SDPADotProductAttention.__qualname__ = "SDPADotProductAttention"
    return SDPADotProductAttention


@lru_cache(maxsize=1)
def _rotated_key_cache_class() -> type:
    mcore_attention = mcore.attention_module()
    rotate = getattr(mcore_attention, "apply_rotary_pos_emb", None)
    yarn_scale = getattr(mcore_attention, "_yarn_get_concentration_factor_from_config", None)

    class RotatedKeyCacheSelfAttention(mcore_attention.SelfAttention):
        """``SelfAttention`` whose static-batch KV cache holds keys after RoPE (see
        :func:`megatron_ipt.training.attention.rotated_key_cache_self_attention`)."""

        def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb, *args,
                                            **kwargs):
            if not self._rotates_before_cache(inference_context, rotary_pos_emb):
                return super()._adjust_key_value_for_inference(inference_context, query, key, value, rotary_pos_emb,
                                                               *args, **kwargs)
            q_pos_emb, k_pos_emb = rotary_pos_emb  # [max_sequence_length, 1, 1, d] each
            start, n = inference_context.sequence_len_offset, key.size(0)
            scale = getattr(self, "_yarn_concentration_factor", None)
            scale = yarn_scale(self.config) if scale is None else scale

            def rope(t, freqs):
                return rotate(t, freqs[start:start + n], config=self.config, mscale=scale,
                              cp_group=self.pg_collection.cp)

            if q_pos_emb is k_pos_emb and query.size(0) == n and query.shape[1] == key.shape[1]:
                # queries and new keys sit at the same positions: one rotation of both ([n, b, heads + groups, d])
                heads = query.size(2)
                both = rope(torch.cat((query, key), dim=2), k_pos_emb)
                query, key = both[:, :, :heads], both[:, :, heads:]
            else:
                query, key = rope(query, q_pos_emb), rope(key, k_pos_emb)
            query, key, value, _, *rest = super()._adjust_key_value_for_inference(
                inference_context, query, key, value, None, *args, **kwargs)
            return (query, key, value, None, *rest)  # rotated: forward applies no rotary embedding

        def _rotates_before_cache(self, inference_context, rotary_pos_emb) -> bool:
            return (inference_context is not None and rotate is not None and yarn_scale is not None
                    and getattr(inference_context, "is_static_batching", lambda: False)()
                    and isinstance(rotary_pos_emb, tuple) and rotary_pos_emb[1] is not None
                    and not self.config.flash_decode and self.config.context_parallel_size == 1
                    and not self.config.apply_rope_fusion and hasattr(self, "pg_collection"))

    RotatedKeyCacheSelfAttention.__module__ = __name__
    RotatedKeyCacheSelfAttention.__qualname__ = "RotatedKeyCacheSelfAttention"
    return RotatedKeyCacheSelfAttention
