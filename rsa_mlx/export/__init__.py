"""A trained run out to other runtimes: fused Hugging Face folders and
PEFT adapters.
"""
