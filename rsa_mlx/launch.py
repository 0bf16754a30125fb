"""``python -m rsa_mlx.launch``: ``mlx.launch`` with the ranks' exit status
(see :mod:`rsa_mlx.cli.launch`)."""

import sys

from rsa_mlx.cli.launch import main

if __name__ == "__main__":
    sys.exit(main())
