"""The bundled demo: ``python -m rsa_mlx.train`` with no arguments.

Offline and in minutes on a laptop CPU, it aligns the bundled base model of
the demo world (:mod:`rsa_mlx.demo.world`) for helpfulness and then for
safety with RSA, and, at the same budget, with the baselines:

=========  ==========================================================
dpo        helpfulness only (one stage, DPO)
sacpo      stepwise DPO then DPO (SACPO)
tdpo       stepwise TDPO2 (variant2 with the KL regulariser)
rsa-cvar   stepwise Ra-DPO2 with CVaR (RSA)
rsa-erm    stepwise Ra-DPO2 with entropic risk (RSA)
=========  ==========================================================

plus a sweep of the merge ratio q of the RSA model (P-SACPO style). Every
model is evaluated the same way: exact, teacher-forced probabilities of each
kind of answer (helpfulness, mean cost, probability of a catastrophic answer,
no sampling noise) and K sampled answers per held-out prompt (unsafe rate,
CVaR of the cost). The run folder holds the data, the adapters,
``results.json``, ``report.md``, ``plot.svg`` and ``plot.png``.

Progress is shown for the demo as a whole (methods trained, models
evaluated, with an ETA) by :mod:`rsa_mlx.util.progress`; its lines are printed
with :func:`rsa_mlx.util.progress.echo`, above any live bars.
"""
