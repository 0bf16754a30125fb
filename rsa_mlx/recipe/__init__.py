"""The real-model recipe: align a chat model offline from its own answers.

Prompt sets with held-out splits (:mod:`~rsa_mlx.recipe.sets`), preference
pairs from the model's own answers (:mod:`~rsa_mlx.recipe.pairs`), every
setting declared once (:mod:`~rsa_mlx.recipe.settings`), the held-out
evaluation that is also a sweep evaluator (:mod:`~rsa_mlx.recipe.evaluate`),
the report (:mod:`~rsa_mlx.recipe.report`) and the run end to end
(:mod:`~rsa_mlx.recipe.run`; ``python -m rsa_mlx.recipe``).
"""
