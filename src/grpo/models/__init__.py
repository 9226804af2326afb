"""Loading models (GGUF, LoRA), the policy and its reference, checkpoints."""
