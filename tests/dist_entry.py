"""``python -m rsa_mlx.train`` for the distributed tests, able to fail.

With ``RSA_MLX_TEST_FAIL=rank:batch`` the rank ``rank`` (``MLX_RANK``, set by
``mlx.launch``) fails reading its ``batch``-th training batch, as if its copy
of the data had become unreadable; every other rank runs normally.
"""

from __future__ import annotations

import os

from rsa_mlx.cli.align import main
from rsa_mlx.tuner.data import BatchSampler, DataError


def fail_reading(at: int) -> None:
    collate, calls = BatchSampler.collate, [0]

    def failing(self, indices):
        calls[0] += 1
        if calls[0] == at:
            raise DataError("train.jsonl: unreadable (made to fail by the test)")
        return collate(self, indices)

    BatchSampler.collate = failing


if __name__ == "__main__":
    if fail := os.environ.get("RSA_MLX_TEST_FAIL"):
        rank, at = map(int, fail.split(":"))
        if int(os.environ.get("MLX_RANK", "0")) == rank:
            fail_reading(at)
    main()
