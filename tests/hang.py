"""How long a test waits for a subprocess before calling it hung.

A guard against a hang, never a speed check: CI hosts are shared. On the
2-core host, with both cores busy and a load average near 9, the quick demo
took 1731 s and the reduced study 1154 s (their old limits were 600 and
900 s). Two hours is four times the slowest seen and still ends a real hang;
``RSA_MLX_TEST_HANG_S`` sets another limit.
"""

from __future__ import annotations

import os

HANG_S = float(os.environ.get("RSA_MLX_TEST_HANG_S", 7200))
