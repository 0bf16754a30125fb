"""Sweeps under faults and bad input (issue 22): empty grid values, the
results files, non-finite scores, metric names, a report without
helpfulness, changed inputs, relative paths, two processes on one folder."""

from __future__ import annotations

import csv
import io

import pytest

from rsa_mlx.study import grid as grids
from rsa_mlx.study import sweep
from rsa_mlx.util.errors import ConfigError


@pytest.mark.parametrize(
    "item", ["safety_beta=0.1,,", "iters=2,", "seed=,1", "seed=0, ,1"]
)
def test_an_empty_grid_value_is_refused(item):
    with pytest.raises(ConfigError, match="an empty value"):
        grids.parse_grid([item])
    with pytest.raises(ConfigError, match="--seeds 'seed=0,,1': an empty value"):
        grids.parse_grid(["seed=0,,1"], "--seeds")


def test_results_csv_has_each_column_once():
    rows = [
        {"id": "base", "kind": "base", "method": "base", "grid": {},
         "metrics": {"unsafe_rate": 0.5}},
        {"id": "c1", "kind": "cell", "method": "sacpo",
         "grid": {"method": "sacpo", "safety_beta": 0.1, "seed": 0},
         "metrics": {"unsafe_rate": 0.25}, "settings": {"seed": 0, "iters": 2}},
    ]  # fmt: skip
    table = list(csv.reader(io.StringIO(sweep.to_csv(rows))))
    head = table[0]
    assert len(head) == len(set(head)), head
    assert head[:5] == ["id", "kind", "method", "safety_beta", "seed"]
    assert table[2][head.index("method")] == "sacpo"
