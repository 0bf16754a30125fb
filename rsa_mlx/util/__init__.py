"""Foundations every layer uses: one-line errors, atomic files, progress
bars, YAML settings files, and the BLAS that MLX loads on Linux. Imports
nothing else of rsa_mlx.
"""
