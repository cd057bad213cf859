"""Tensor names and row layout of each Hugging Face family against megatron-core's local layer spec.

Dense families (Llama 3 / 3.1 / 3.2, Mistral, Qwen2 / 2.5, Qwen3) share one naming; the mixture-of-experts
families name their router and experts differently (:data:`MOE_NAMES`). Every function is pure: names and
shapes from a :class:`~megatron_ipt.training.presets.ModelPreset` and the config's ``model_type``; the streaming
lives in :mod:`megatron_ipt.hf.convert`.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ipt.training.presets import ModelPreset

# model_type -> (MLP block, router, expert gate, up, down) names inside ``model.layers.i.``
MOE_NAMES: dict[str, tuple[str, str, str, str, str]] = {
    "qwen3_moe": ("mlp", "gate", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("block_sparse_moe", "gate", "w1", "w3", "w2"),
}


def _moe_names(p: ModelPreset, model_type: str) -> tuple[str, str, str, str, str]:
    if model_type not in MOE_NAMES:
        raise ValueError(f"model_type {model_type!r}: no expert naming for a mixture-of-experts model "
                         f"({', '.join(MOE_NAMES)})")
    return MOE_NAMES[model_type]


def hf_shape(name: str, p: ModelPreset) -> tuple[int, ...]:
    """The shape Hugging Face tensor ``name`` has for preset ``p`` (Llama / Mistral / Qwen2 / Qwen3 / Qwen3-MoE /
    Mixtral ``state_dict`` names; ``d`` is ``p.kv_channels``, the head dimension, ``E`` the number of experts and
    ``Fe`` an expert's inner size)."""
    h, f, d = p.hidden_size, p.ffn_hidden_size, p.kv_channels
    q, kv = p.num_attention_heads * d, p.num_query_groups * d
    leaf = name.split(".")
    kind, what = leaf[-2], leaf[-1]
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (p.vocab_size, h)
    if kind in ("q_norm", "k_norm"):
        return (d,)
    if kind.endswith("norm"):
        return (h,)
    if p.num_moe_experts and kind == "gate":  # the router
        return (p.num_moe_experts, h)
    if p.num_moe_experts and "experts" in leaf:
        fe = p.expert_ffn_hidden_size
        return (h, fe) if kind in ("down_proj", "w2") else (fe, h)
    rows = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": h, "gate_proj": f, "up_proj": f, "down_proj": h}[kind]
    cols = {"o_proj": q, "down_proj": f}.get(kind, h)
    return (rows,) if what == "bias" else (rows, cols)


def megatron_sources(p: ModelPreset, model_type: str = "llama") -> dict[str, tuple[str, ...]]:
    """megatron parameter name -> the Hugging Face tensors it is built from, in the order ``megatron_to_hf``
    writes them (``model_type``: the Hugging Face config's, which names an MoE model's router and experts)."""
    out = {"embedding.word_embeddings.weight": ("model.embed_tokens.weight",)}
    for i in range(p.num_layers):
        a, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = (a + "input_layernorm.weight",)
        out[m + "self_attention.linear_qkv.weight"] = tuple(a + f"self_attn.{x}_proj.weight" for x in "qkv")
        if p.add_qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = tuple(a + f"self_attn.{x}_proj.bias" for x in "qkv")
        if p.qk_layernorm:
            out[m + "self_attention.q_layernorm.weight"] = (a + "self_attn.q_norm.weight",)
            out[m + "self_attention.k_layernorm.weight"] = (a + "self_attn.k_norm.weight",)
        out[m + "self_attention.linear_proj.weight"] = (a + "self_attn.o_proj.weight",)
        out[m + "pre_mlp_layernorm.weight"] = (a + "post_attention_layernorm.weight",)
        if p.num_moe_experts:
            block, router, gate, up, down = _moe_names(p, model_type)
            out[m + "mlp.router.weight"] = (f"{a}{block}.{router}.weight",)
            for j in range(p.num_moe_experts):
                e, me = f"{a}{block}.experts.{j}.", f"{m}mlp.experts.local_experts.{j}."
                out[me + "linear_fc1.weight"] = (f"{e}{gate}.weight", f"{e}{up}.weight")
                out[me + "linear_fc2.weight"] = (f"{e}{down}.weight",)
        else:
            out[m + "mlp.linear_fc1.weight"] = (a + "mlp.gate_proj.weight", a + "mlp.up_proj.weight")
            out[m + "mlp.linear_fc2.weight"] = (a + "mlp.down_proj.weight",)
    out["decoder.final_layernorm.weight"] = ("model.norm.weight",)
    if not p.tie_word_embeddings:
        out["output_layer.weight"] = ("lm_head.weight",)
    return out


def hf_names(p: ModelPreset, model_type: str = "llama") -> list[str]:
    """The Hugging Face tensor names of preset ``p``, in the order ``megatron_to_hf`` writes them."""
    return [n for sources in megatron_sources(p, model_type).values() for n in sources]


@dataclass(frozen=True)
class Rows:
    """Rows ``start:stop`` (dim 0) of Hugging Face tensor ``name``; ``name`` None: zero rows (vocabulary padding)."""

    name: str | None
    start: int
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.start


def row_plan(mname: str, p: ModelPreset, padded_vocab: int, model_type: str = "llama") -> list[Rows]:
    """Megatron parameter ``mname`` as the concatenation, along dim 0, of these row ranges (all sharing the
    Hugging Face tensors' trailing dims). QKV: per query group ``[q heads of the group, k, v]``; ``linear_fc1``
    (dense or one expert's): ``[gate; up]``; embeddings / output layer: the vocabulary, then zero rows up to
    ``padded_vocab``."""
    hf = megatron_sources(p, model_type)[mname]
    if mname.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        d, g = p.kv_channels, p.num_query_groups
        per = p.num_attention_heads // g
        q, k, v = hf
        plan = []
        for j in range(g):
            plan += [Rows(q, j * per * d, (j + 1) * per * d), Rows(k, j * d, (j + 1) * d), Rows(v, j * d, (j + 1) * d)]
        return plan
    plan = [Rows(n, 0, hf_shape(n, p)[0]) for n in hf]
    if mname in ("embedding.word_embeddings.weight", "output_layer.weight") and padded_vocab > p.vocab_size:
        plan.append(Rows(None, p.vocab_size, padded_vocab))
    return plan


def slice_plan(plan: list[Rows], start: int, stop: int) -> list[Rows]:
    """The row ranges that make up rows ``start:stop`` of the stacked tensor ``plan`` describes."""
    out, offset = [], 0
    for r in plan:
        lo, hi = max(start, offset), min(stop, offset + r.count)
        if lo < hi:
            out.append(Rows(r.name, r.start + lo - offset, r.start + hi - offset))
        offset += r.count
    return out
