"""The training engine: settings, data and batches, LoRA stages with the
in-network reference, the compiled step, the loop, checkpoints, run
folders, data-parallel helpers, and the two-stage trainer.
"""
