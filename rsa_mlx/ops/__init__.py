"""The math, arrays in and arrays out: the token-level risk operators
(docs/method.md §2) with their fused kernels and the CPU exp, the preference
losses (§3) and token sampling from logits. Imports only :mod:`rsa_mlx.util`.
"""
