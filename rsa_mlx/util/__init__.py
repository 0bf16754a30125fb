"""Foundations every layer uses: one-line errors, atomic files, progress
bars, and the BLAS that MLX loads on Linux. Imports nothing else of rsa_mlx.
"""
