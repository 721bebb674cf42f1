"""ftkit: fine-tune language models from one TOML recipe, on MLX or PyTorch."""

__version__ = "0.1.0"
