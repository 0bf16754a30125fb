"""The math, arrays in and arrays out: the token-level risk operators
(docs/method.md §2) with their fused kernels and the CPU exp, and the preference
losses (§3). Imports only :mod:`rsa_mlx.util`.
"""
