"""Aligning a real chat model offline, from its own answers (issue: the
real-model recipe): prompt sets, self-generated preference pairs, refusal
evaluation. The end-to-end run is ``examples/smollm2_recipe.py``."""
