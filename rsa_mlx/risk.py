"""``rsa_mlx.risk``, its documented name: an alias of :mod:`rsa_mlx.ops.risk`."""

from rsa_mlx.ops.risk import *  # noqa: F403
from rsa_mlx.ops.risk import __all__  # noqa: F401
