"""YAML settings files read the way mlx-lm reads them: every float spelling
(``1e-5`` too) is a float, and a bad file is a one-line error naming it."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from rsa_mlx.util.errors import ConfigError

__all__ = ["read_yaml", "yaml_value"]


class _Loader(yaml.SafeLoader):
    """PyYAML reads ``1e-5`` as a string (YAML 1.1 wants ``1.0e-5``); like
    mlx-lm's config loader, read every float spelling as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(path: str | Path, what: str = "config file") -> dict:
    """A YAML mapping read with every float spelling as a float; one-line
    errors naming the file (and line) for a missing, non-UTF-8, malformed or
    non-mapping file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, _Loader) or {}
    except FileNotFoundError:
        raise ConfigError(f"{str(path)!r}: no such {what}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{str(path)!r}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None)
        raise ConfigError(
            f"{path}{line}: malformed YAML" + (f" ({problem})" if problem else "")
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r}: expected a mapping of settings")
    return data


def yaml_value(text: str):
    """One YAML scalar as a settings file reads it (``3e-5`` is a float)."""
    return yaml.load(text, _Loader)
