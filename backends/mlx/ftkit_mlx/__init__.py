"""ftkit's MLX backend (mlx + mlx-lm): Apple silicon, and Linux CPU through mlx[cpu]."""
