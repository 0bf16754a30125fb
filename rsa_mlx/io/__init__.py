"""Model formats in: Hugging Face folders (checks, hub snapshots),
``mlx_lm.convert`` and GGUF files. Imports only :mod:`rsa_mlx.util`.
"""
