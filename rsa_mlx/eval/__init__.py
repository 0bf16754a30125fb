"""Evaluation (docs/method.md §6): prompts, sampling, teacher-forced quantities, tail
metrics, scorers (a registry the applications add to), the refusal test,
and model shift and fluency.
"""
