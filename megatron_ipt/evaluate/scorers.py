"""Models that give logits for a token sequence: a megatron-core checkpoint of an experiment (CPU backend on
a CPU, world size 1) or a Hugging Face folder (transformers). Both: ``logits(ids) -> [len(ids), vocab]`` and
``generate(ids, max_new_tokens, stop_id) -> new ids`` (greedy)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from megatron_ipt import checkpoint, cpu_backend, mcore, parallel
from megatron_ipt.config import ExperimentConfig, ParallelConfig
from megatron_ipt.errors import IptError


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

    def __enter__(self) -> "MegatronScorer":
        from megatron_ipt.model import build_model
        from megatron_ipt.presets import padded_vocab_size, resolve_preset

        self.device = parallel.resolve_device(self.cfg.train.device)
        self._ctx = cpu_backend.cpu_backend(enabled=self.device.type == "cpu")
        self._ctx.__enter__()
        try:
            preset = resolve_preset(self.cfg.model)
            layout = parallel.setup(ParallelConfig(), self.device, micro_batch_size=1, global_batch_size=1,
                                    num_layers=preset.num_layers, num_attention_heads=preset.num_attention_heads,
                                    num_query_groups=preset.num_query_groups, seed=self.cfg.train.seed)
            vocab = max(self.vocab_size, preset.vocab_size) if self.cfg.model.hf_config else self.vocab_size
            self.model_vocab = vocab
            # A checkpoint padded for TP > 1 (128 x TP rows) loads too: megatron-core allows the embedding and
            # output layer shapes to differ in their padding rows.
            model = build_model(preset, layout, vocab_size=padded_vocab_size(vocab, 1),
                                seq_length=self.cfg.model.seq_length, device=self.device, precision=self.cfg.train.precision)
            if self.checkpoint_path is not None:
                try:
                    folder = checkpoint.load_model_weights(self.checkpoint_path, model)
                except FileNotFoundError as e:
                    raise IptError(str(e)) from None
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
        tokens = torch.tensor([ids], device=self.device)
        pos = torch.arange(len(ids), device=self.device).unsqueeze(0)
        with torch.no_grad():
            logits = self.model(input_ids=tokens, position_ids=pos, attention_mask=None)[0]
        return logits[:, : self.model_vocab].float().cpu()  # padding rows are no tokens

    def kv_step(self, max_sequence_length: int) -> Callable[[list[int]], torch.Tensor] | None:
        """A fresh KV cache for one sequence of up to ``max_sequence_length`` tokens, as a step function for
        :func:`~megatron_ipt.evaluate.generate.greedy_generate_cached`: ``step(new_ids)`` runs the model on the
        tokens not fed yet (positions continue from the previous call) and returns the logits of the last one
        (``[vocab]``, unpadded vocabulary, float32 on CPU). Uses megatron-core's ``StaticInferenceContext``
        (:func:`megatron_ipt.mcore.kv_cache_forward_kwargs`). None, with the reason in ``self.no_kv_cache``, where
        this megatron-core version or model cannot cache (no inference context; a pipeline stage without both
        the embedding and the output layer). ``step`` raises ValueError past ``max_sequence_length``."""
        if not (getattr(self.model, "pre_process", True) and getattr(self.model, "post_process", True)):
            self.no_kv_cache = "the model is one pipeline stage"
            return None
        kwargs = mcore.kv_cache_forward_kwargs(self.model.forward, max_batch_size=1,
                                               max_sequence_length=max_sequence_length)
        if kwargs is None:
            self.no_kv_cache = f"megatron-core {mcore.version()} has no static inference context"
            return None
        context = kwargs.get("inference_context", kwargs.get("inference_params"))

        def step(new_ids: list[int]) -> torch.Tensor:
            start = context.sequence_len_offset
            if start + len(new_ids) > max_sequence_length:
                raise ValueError(f"KV cache holds {max_sequence_length} tokens: cannot feed {len(new_ids)} "
                                 f"more after {start}")
            if start and hasattr(context, "enable_decode_mode"):
                context.enable_decode_mode()  # every prompt token is cached: one new token per step
            tokens = torch.tensor([new_ids], device=self.device)
            pos = torch.arange(start, start + len(new_ids), device=self.device).unsqueeze(0)
            with torch.no_grad():
                logits = self.model(input_ids=tokens, position_ids=pos, attention_mask=None, **kwargs)
            context.sequence_len_offset = start + len(new_ids)
            return logits[0, -1, : self.model_vocab].float().cpu()

        return step

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

    def generate(self, ids: list[int], max_new_tokens: int, stop_id: int | None = None) -> list[int]:
        """Greedy continuation of ``ids`` (transformers ``generate``, ``do_sample=False``), without ``stop_id``."""
        tokens = torch.tensor([ids], device=self.device)
        with torch.no_grad():
            out = self.model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=stop_id, pad_token_id=stop_id)
        new = out[0, len(ids):].tolist()
        return new[: new.index(stop_id)] if stop_id in new else new

    def __exit__(self, *exc) -> None:
        del self.model
