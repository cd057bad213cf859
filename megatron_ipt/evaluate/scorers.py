"""Models that give logits for a token sequence: a megatron-core checkpoint of an experiment (CPU backend on
a CPU, world size 1) or a Hugging Face folder (transformers). Both: ``logits(ids) -> [len(ids), vocab]``,
``logits_batch([ids, ...]) -> [[len(ids), vocab], ...]`` (one forward over the right-padded batch),
``generate(ids, max_new_tokens, stop_id) -> new ids`` (greedy) and ``generate_batch([ids, ...], ...)`` (greedy,
the prompts left-padded into one batch; the same ids as ``generate`` on each)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from megatron_ipt.training import checkpoint, cpu_backend, mcore, parallel
from megatron_ipt.config import ExperimentConfig, ParallelConfig
from megatron_ipt.errors import IptError
from megatron_ipt.training.precision import resolve_precision


class MegatronScorer:
    """The experiment's model (``cfg.model``; vocabulary from the tokenize manifest, padded as in training),
    with the weights of ``checkpoint_path`` (a checkpoints folder with ``latest``, or an ``iter_*`` folder), or
    the untrained initialisation the training run started from (same seed) when it is None. Logits are cut
    back to the unpadded vocabulary, so padding rows (zero in a converted checkpoint) take no probability.
    Use as a context manager (sets up and tears down a one-process world). Raises IptError when the
    checkpoint does not match the model config, naming the checkpoint."""

    def __init__(self, cfg: ExperimentConfig, vocab_size: int, checkpoint_path: str | Path | None) -> None:
        self.cfg, self.vocab_size, self.checkpoint_path = cfg, vocab_size, checkpoint_path
        self.iteration = None
        self.no_kv_cache: str | None = None  # why greedy generation runs without a KV cache (None: it uses one)
        self.no_batched_kv_cache: str | None = None  # why generate_batch runs one prompt at a time (None: batched)
        # why KV-cached decoding steps run under the CPU backend's function mode (None: without it, see _kv_forward)
        self.cpu_mode_in_decode: str | None = None

    def __enter__(self) -> "MegatronScorer":
        from megatron_ipt.training.model import build_model
        from megatron_ipt.training.presets import padded_vocab_size, resolve_preset

        self.device = parallel.resolve_device(self.cfg.train.device)
        self._ctx = cpu_backend.cpu_backend(enabled=self.device.type == "cpu")
        self._ctx.__enter__()
        try:
            preset = resolve_preset(self.cfg.model)
            layout = parallel.setup(ParallelConfig(), self.device, micro_batch_size=1, global_batch_size=1,
                                    seed=self.cfg.train.seed, **parallel.model_fields(preset))
            vocab = max(self.vocab_size, preset.vocab_size) if self.cfg.model.hf_config else self.vocab_size
            self.model_vocab = vocab
            # A checkpoint padded for TP > 1 (128 x TP rows) loads too: megatron-core allows the embedding and
            # output layer shapes to differ in their padding rows.
            model = build_model(preset, layout, vocab_size=padded_vocab_size(vocab, 1),
                                seq_length=self.cfg.model.seq_length, device=self.device,
                                precision=resolve_precision(self.cfg.train.precision, self.device.type),
                                attention_backend=self.cfg.model.attention_backend)
            if self.checkpoint_path is not None:
                try:
                    folder = checkpoint.load_model_weights(self.checkpoint_path, model,
                                                           trust=self.cfg.train.trust_checkpoint)
                except FileNotFoundError as e:
                    raise IptError(str(e)) from None
                except IptError:  # a refused checkpoint (checkpoint_trust): its own line
                    raise
                except (Exception, CheckpointException) as e:  # megatron's own message is long: keep its first line
                    raise IptError(f"{self.checkpoint_path}: does not match the model config ({self.cfg.model.preset}, "
                                   f"seq {self.cfg.model.seq_length}): {checkpoint.load_error_reason(e)}") from None
                self.iteration = int(folder.name[5:]) if folder.name.startswith("iter_") else None
            self.model = getattr(model, "module", model).eval()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def logits(self, ids: list[int]) -> torch.Tensor:
        """``[len(ids), vocab]`` logits (unpadded vocabulary, float32 on CPU): :meth:`logits_batch` of one row."""
        return self.logits_batch([ids])[0]

    def logits_batch(self, batch: list[list[int]]) -> list[torch.Tensor]:
        """``[logits(ids) for ids in batch]`` from one forward: the rows right-padded (with id 0) to the longest,
        each cut back to its own length (``[len(ids), vocab]``, unpadded vocabulary, float32 on CPU, converted
        row by row so a GPU holds one float32 row at a time). Causal attention: the padding after a row never
        reaches its earlier positions, so each row's logits equal batch 1's up to float rounding of the batched
        matmuls. Memory: ``len(batch) x longest x vocab`` logits in the model's dtype, plus the rows in float32."""
        if not batch:
            return []
        longest = max(len(ids) for ids in batch)
        tokens = torch.tensor([ids + [0] * (longest - len(ids)) for ids in batch], device=self.device)
        pos = torch.arange(longest, device=self.device).expand(len(batch), -1)
        with torch.no_grad():
            logits = self.model(input_ids=tokens, position_ids=pos, attention_mask=None)
        # padding rows of the vocabulary are no tokens
        return [logits[i, : len(ids), : self.model_vocab].float().cpu() for i, ids in enumerate(batch)]

    def kv_step(self, max_sequence_length: int) -> Callable[[list[int]], torch.Tensor] | None:
        """A fresh KV cache for one sequence of up to ``max_sequence_length`` tokens, as a step function for
        :func:`~megatron_ipt.evaluate.generate.greedy_generate_cached`: ``step(new_ids)`` runs the model on the
        tokens not fed yet (positions continue from the previous call) and returns the logits of the last one
        (``[vocab]``, unpadded vocabulary, float32 on CPU). :meth:`kv_batch_step` with one row. None, with the
        reason in ``self.no_kv_cache``, where this megatron-core version or model cannot cache (no inference
        context; a pipeline stage without both the embedding and the output layer). ``step`` raises ValueError
        past ``max_sequence_length``."""
        step = self.kv_batch_step(1, max_sequence_length)
        return None if step is None else (lambda new_ids: step([new_ids])[0])

    def kv_batch_step(self, batch_size: int, max_sequence_length: int
                      ) -> Callable[[list[list[int]]], torch.Tensor] | None:
        """A fresh KV cache for ``batch_size`` sequences of up to ``max_sequence_length`` tokens each (the longest
        prompt plus the new tokens), as a step function for
        :func:`~megatron_ipt.evaluate.generate.greedy_generate_batch`: ``step(rows)`` runs the model on each row's
        tokens not fed yet and returns the logits of each row's last one (``[rows, vocab]``, unpadded
        vocabulary, float32 on CPU). The first call feeds the prompts, of any lengths: they are left-padded to the
        longest (id 0), and the padding keys are masked out of every later query by a boolean ``attention_mask``
        (``[b, 1, sq, sk]``, True = masked, causal included); later calls feed the same number of tokens per row.

        megatron-core's ``StaticInferenceContext`` keeps one ``sequence_len_offset`` for the whole batch and takes
        the rotary angles from the cache position, so row i's tokens sit ``pad_i`` positions later than alone;
        RoPE scores depend only on the distance between query and key, so with the padding masked each row
        attends as it would alone (up to float rounding). ``position_ids`` are each row's own (0 at its first
        token), for models with learned absolute position embeddings. The mask needs megatron-core's own
        attention (:func:`megatron_ipt.training.mcore.applies_attention_masks`); :meth:`generate_batch` checks that.
        None, with the reason in ``self.no_kv_cache``, where this megatron-core version or model cannot cache.
        ``step`` raises ValueError past ``max_sequence_length`` or with more rows than ``batch_size``."""
        if not (getattr(self.model, "pre_process", True) and getattr(self.model, "post_process", True)):
            self.no_kv_cache = "the model is one pipeline stage"
            return None
        kwargs = mcore.kv_cache_forward_kwargs(self.model.forward, max_batch_size=batch_size,
                                               max_sequence_length=max_sequence_length)
        if kwargs is None:
            self.no_kv_cache = f"megatron-core {mcore.version()} has no static inference context"
            return None
        context = kwargs.get("inference_context", kwargs.get("inference_params"))
        pads: list[int] = []  # left padding of each row, set by the first call

        def step(rows: list[list[int]]) -> torch.Tensor:
            start = context.sequence_len_offset
            if not 0 < len(rows) <= batch_size:
                raise ValueError(f"KV cache for {batch_size} rows: cannot feed {len(rows)}")
            if start == 0:
                pads[:] = [max(len(r) for r in rows) - len(r) for r in rows]
                rows = [[0] * p + list(r) for p, r in zip(pads, rows)]
            elif len(rows) != len(pads) or len({len(r) for r in rows}) != 1:
                raise ValueError("after the prompts, feed every row of the batch the same number of tokens")
            width = len(rows[0])
            if start + width > max_sequence_length:
                raise ValueError(f"KV cache holds {max_sequence_length} tokens: cannot feed {width} "
                                 f"more after {start}")
            if start and hasattr(context, "enable_decode_mode"):
                context.enable_decode_mode()  # every prompt token is cached
            shift = torch.tensor(pads).unsqueeze(1)
            pos = (torch.arange(start, start + width).unsqueeze(0) - shift).clamp(min=0).to(self.device)
            mask = None  # no padding: megatron's causal mask (prefill) or none (one token per row)
            if any(pads):
                is_pad = torch.arange(start + width).unsqueeze(0) < shift  # [b, sk]
                later = torch.ones(width, start + width, dtype=torch.bool).triu(start + 1)  # key after query
                mask = (later.unsqueeze(0) | is_pad.unsqueeze(1)).unsqueeze(1).to(self.device)
            tokens = torch.tensor(rows, device=self.device)
            with torch.inference_mode():  # the cache's tensors are inference tensors: every step runs in this mode
                logits = self._kv_forward(start > 0, input_ids=tokens, position_ids=pos, attention_mask=mask, **kwargs)
                logits = logits[:, -1, : self.model_vocab].float().cpu()
            context.sequence_len_offset = start + width
            return logits.clone()  # a normal tensor for the caller (in-place updates of inference tensors fail)

        return step

    def _kv_forward(self, decoding: bool, **kwargs) -> torch.Tensor:
        """``self.model(**kwargs)``; a decoding step (``decoding``: the prompt is cached) on the CPU backend runs
        with its function mode suspended (:func:`~megatron_ipt.training.cpu_backend.suspended`: about a quarter
        less CPU per token on a small model), as megatron-core names no cuda device there; the prefill keeps the
        mode (it allocates the cache on ``torch.cuda.current_device()``). Should a megatron-core version need the
        mode in a decoding step, the step fails without it and is rerun with it (it writes the same cache rows:
        the caller advances the offset only after), and so are later steps; ``self.cpu_mode_in_decode`` says why."""
        if decoding and self.cpu_mode_in_decode is None and cpu_backend.is_active():
            try:
                with cpu_backend.suspended():
                    return self.model(**kwargs)
            except Exception as e:  # noqa: BLE001 - a cuda device named in decoding: rerun under the mode
                self.cpu_mode_in_decode = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return self.model(**kwargs)

    def generate(self, ids: list[int], max_new_tokens: int, stop_id: int | None = None) -> list[int]:
        """Greedy continuation of ``ids`` with megatron-core's KV cache (:meth:`kv_step`: the prompt once, then
        one token per step). Where the cache is unavailable or fails, says why once on stderr and runs the
        uncached loop (the whole sequence every step) from the start, so the output is the same."""
        from megatron_ipt.evaluate.generate import greedy_generate, greedy_generate_cached

        if self.no_kv_cache is None:
            step = self.kv_step(len(ids) + max_new_tokens)
            if step is not None:
                try:
                    return greedy_generate_cached(step, ids, max_new_tokens, stop_id)
                except Exception as e:  # noqa: BLE001 - any failure of the cache: the uncached loop below
                    self.no_kv_cache = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"ipt eval: greedy generation without a KV cache ({self.no_kv_cache}): every step reruns the "
                  "whole sequence", file=sys.stderr)
        return greedy_generate(self.logits, ids, max_new_tokens, stop_id)

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int,
                       stop_id: int | None = None) -> list[list[int]]:
        """Greedy continuations of several prompts decoded together over one KV cache (:meth:`kv_batch_step`:
        left padding, padding keys masked): the same ids as :meth:`generate` on each prompt alone. Where the
        batch cannot be cached that way (no cache; attention other than megatron-core's own, which may ignore a
        per-row mask; a failure), says why once on stderr and runs :meth:`generate` per prompt."""
        from megatron_ipt.evaluate.generate import greedy_generate_batch

        if len(prompts) > 1 and self.no_kv_cache is None and self.no_batched_kv_cache is None:
            if not mcore.applies_attention_masks(self.model):
                self.no_batched_kv_cache = "the model's attention is not megatron-core's DotProductAttention"
            else:
                step = self.kv_batch_step(len(prompts), max(len(p) for p in prompts) + max_new_tokens)
                if step is not None:
                    try:
                        return greedy_generate_batch(step, prompts, max_new_tokens, stop_id)
                    except Exception as e:  # noqa: BLE001 - any failure of the batched cache: one at a time
                        self.no_batched_kv_cache = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if self.no_batched_kv_cache is not None:
                print(f"ipt eval: greedy generation one prompt at a time ({self.no_batched_kv_cache})",
                      file=sys.stderr)
        return [self.generate(p, max_new_tokens, stop_id) for p in prompts]

    def __exit__(self, *exc) -> None:
        parallel.teardown()
        self._ctx.__exit__(None, None, None)


class HFScorer:
    """A Hugging Face causal LM folder through transformers (float32 on CPU, the config's dtype on cuda).
    ``vocab_size``: the experiment tokenizer's; IptError naming the folder when the model has fewer rows."""

    def __init__(self, folder: str | Path, device: str = "cpu", vocab_size: int | None = None) -> None:
        self.folder, self.device, self.vocab_size, self.iteration = Path(folder), device, vocab_size, None

    def __enter__(self) -> "HFScorer":
        from transformers import AutoModelForCausalLM

        if not (self.folder / "config.json").is_file():
            raise IptError(f"{self.folder}: not a Hugging Face model folder (no config.json)")
        dtype = torch.float32 if self.device == "cpu" else "auto"
        self.model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=dtype).to(self.device).eval()
        rows = self.model.get_output_embeddings().weight.shape[0]
        if self.vocab_size is not None and rows < self.vocab_size:
            raise IptError(f"{self.folder}: vocabulary of {rows} tokens is smaller than the experiment tokenizer's "
                           f"{self.vocab_size}: a model for another tokenizer")
        return self

    def logits(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.model(torch.tensor([ids], device=self.device)).logits[0].float().cpu()

    def logits_batch(self, batch: list[list[int]]) -> list[torch.Tensor]:
        """``[logits(ids) for ids in batch]`` from one forward: right-padded (id 0, ``attention_mask`` 0 there),
        each row cut back to its own length (``[len(ids), vocab]``, float32 on CPU)."""
        if not batch:
            return []
        longest = max(len(ids) for ids in batch)
        tokens = torch.tensor([ids + [0] * (longest - len(ids)) for ids in batch], device=self.device)
        mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in batch], device=self.device)
        with torch.no_grad():
            logits = self.model(tokens, attention_mask=mask).logits
        return [logits[i, : len(ids)].float().cpu() for i, ids in enumerate(batch)]

    def generate(self, ids: list[int], max_new_tokens: int, stop_id: int | None = None) -> list[int]:
        """Greedy continuation of ``ids`` (transformers ``generate``, ``do_sample=False``), without ``stop_id``."""
        tokens = torch.tensor([ids], device=self.device)
        with torch.no_grad():
            out = self.model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=stop_id, pad_token_id=stop_id)
        new = out[0, len(ids):].tolist()
        return new[: new.index(stop_id)] if stop_id in new else new

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int,
                       stop_id: int | None = None) -> list[list[int]]:
        """Greedy continuations of several prompts in one transformers ``generate``: left-padded with ``stop_id``
        (0 without one) under ``attention_mask`` 0, so each row's positions count from its first token; the same
        ids as :meth:`generate` on each prompt alone, up to float rounding of the batched matmuls."""
        if not prompts or max_new_tokens < 1:
            return [[] for _ in prompts]
        pad = 0 if stop_id is None else stop_id
        longest = max(len(p) for p in prompts)
        tokens = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        with torch.no_grad():
            out = self.model.generate(tokens, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=stop_id, pad_token_id=pad)
        rows = [row[longest:] for row in out.tolist()]
        return [new[: new.index(stop_id)] if stop_id in new else new for new in rows]

    def __exit__(self, *exc) -> None:
        del self.model
