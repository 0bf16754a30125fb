"""The training engine: settings, data and batches, LoRA stages with the
in-network reference, the compiled step, the loop, one stage
(:mod:`~rsa_mlx.tuner.stage`), checkpoints, run folders, data-parallel
helpers, and the two-stage run (:mod:`~rsa_mlx.tuner.trainer`).
"""
