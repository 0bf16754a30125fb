"""``python -m rsa_mlx.cli``: the ``rsa-mlx`` command."""

from rsa_mlx.cli import main

if __name__ == "__main__":
    main()
