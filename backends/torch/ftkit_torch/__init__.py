"""ftkit's PyTorch backend (transformers + PEFT)."""
