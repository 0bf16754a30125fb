"""The bundled demo (built in the next step)."""


def run(cfg, settings, quick=False, methods=None):
    from rsa_mlx.config import ConfigError

    raise ConfigError("give --model (the bundled demo is not built yet)")
