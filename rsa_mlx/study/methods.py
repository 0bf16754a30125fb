"""The named alignment methods: what each trains, as TrainConfig settings.

=========  ===========================================================
dpo        helpfulness only (one stage, DPO)
sacpo      stepwise DPO then DPO (SACPO): KL regulariser
tdpo       stepwise TDPO2 (variant2 with the KL regulariser)
rsa-cvar   stepwise Ra-DPO2 with CVaR of the token log-ratio (RSA)
rsa-erm    stepwise Ra-DPO2 with entropic risk (RSA)
=========  ===========================================================

The demo, the recipe and ``rsa-mlx sweep`` share this table, so a method
name means the same training everywhere.
"""

from __future__ import annotations

from rsa_mlx.util.errors import ConfigError

METHODS: dict[str, dict] = {
    "dpo": {"stages": "reward", "loss": "dpo", "risk": "kl"},
    "sacpo": {"loss": "dpo", "risk": "kl"},
    "tdpo": {"loss": "variant2", "risk": "kl"},
    "rsa-cvar": {"loss": "variant2", "risk": "cvar"},
    "rsa-erm": {"loss": "variant2", "risk": "erm"},
}
# The settings a method name fixes (a sweep or the demo may not override them).
DEFINING = ("stages", "loss", "risk")
STEPWISE = ("sacpo", "tdpo", "rsa-cvar", "rsa-erm")


def method_settings(name: str) -> dict:
    """The settings of method ``name``; one-line error for an unknown name."""
    if name not in METHODS:
        raise ConfigError(
            f"method: unknown method {name!r}; choose from {', '.join(METHODS)}"
        )
    return {"stages": "both", **METHODS[name]}


def parse_methods(text: str | list | tuple) -> list[str]:
    """``"sacpo, rsa-cvar"`` (or a list) -> checked method names, in order."""
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise ConfigError("methods: give at least one method")
    for name in names:
        method_settings(name)
    return list(dict.fromkeys(names))
