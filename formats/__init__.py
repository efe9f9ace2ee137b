"""File formats both sides read without MLX: imported by the gateway (model info, memory
estimates) and by the worker (loaders). Pure Python, no other mlx_gw import."""
