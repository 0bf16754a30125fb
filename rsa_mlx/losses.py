"""``rsa_mlx.losses``, its documented name: an alias of :mod:`rsa_mlx.ops.losses`."""

from rsa_mlx.ops.losses import *  # noqa: F403
from rsa_mlx.ops.losses import __all__  # noqa: F401
