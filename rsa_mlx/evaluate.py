"""``rsa_mlx.evaluate``, its documented name: an alias of :mod:`rsa_mlx.eval.evaluate`."""

from rsa_mlx.eval.evaluate import *  # noqa: F403
from rsa_mlx.eval.evaluate import __all__  # noqa: F401
