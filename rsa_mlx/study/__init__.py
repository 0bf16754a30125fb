"""Comparing methods: the named methods, seeded sweeps that share stage 1,
intervals and Pareto fronts, the sweep report with verdicts, and plots.
"""
