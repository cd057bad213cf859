"""megatron-ipt data side: corpora, synthesis of instruction-response pairs, formatting, tokenization.

Meets the training side only through files and manifests (see megatron_ipt.manifest); never imports
megatron_ipt's training code (megatron_ipt.config and megatron_ipt.manifest are plain-Python and shared).
"""
