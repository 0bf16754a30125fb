"""``python -m rsa_mlx.recipe``: the real-model recipe (see
:mod:`rsa_mlx.cli.recipe`)."""

from rsa_mlx.cli.recipe import main

if __name__ == "__main__":
    main()
