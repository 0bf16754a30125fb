"""``rsa_mlx.sweep``, its documented name: an alias of :mod:`rsa_mlx.study.sweep`."""

from rsa_mlx.study.sweep import *  # noqa: F403
from rsa_mlx.study.sweep import __all__  # noqa: F401
