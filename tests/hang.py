"""How long a test waits for a subprocess before calling it hung.

A guard against a hang, never a speed check: CI hosts are shared, and on the
2-core host with both cores busy the quick demo ran past 600 s and the
reduced study past 900 s (each well under 2 minutes alone). An hour is far
above any slowdown load causes and still ends a real hang;
``RSA_MLX_TEST_HANG_S`` sets another limit.
"""

from __future__ import annotations

import os

HANG_S = float(os.environ.get("RSA_MLX_TEST_HANG_S", 3600))
