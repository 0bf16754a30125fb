"""``python -m rsa_mlx.train``: the main job (see :mod:`rsa_mlx.cli.align`)."""

from rsa_mlx.cli.align import main

if __name__ == "__main__":
    main()
