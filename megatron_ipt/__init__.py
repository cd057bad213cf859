"""megatron-ipt: Instruction Pre-Training on Megatron-Core (training side, config, CLI)."""

__version__ = "0.1.0"
