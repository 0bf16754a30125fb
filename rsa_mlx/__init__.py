"""rsa_mlx: Risk-aware Stepwise Alignment (RSA) for MLX.

Importing the package first loads an optimised BLAS into MLX on Linux when one
is installed (see :mod:`rsa_mlx.util.blas`); this only works if ``rsa_mlx`` is
imported before ``mlx``.
"""

from rsa_mlx.util.blas import preload as _preload_blas

_preload_blas()

__version__ = "0.1.0"


def load(model=None, adapter_path=None, merge=None, **kwargs):
    """Load a base model and rsa_mlx adapters in one call (see
    :func:`rsa_mlx.tuner.model.load`)."""
    from rsa_mlx.tuner.model import load as _load

    return _load(model, adapter_path, merge, **kwargs)
