"""The user's CTXAI configuration file, for what only the user (never a model card) may decide.

The file is ``$CTXAI_CONFIG`` when set, else ``$XDG_CONFIG_HOME/ctxai/config.json`` (``~/.config/ctxai/config.json``).
A missing file is an empty configuration. Keys:

* ``trusted_architectures``: Python module prefixes (``["mylab.nets"]``) whose classes or factory functions a model
  card may name as its ``architecture.name`` (``mylab.nets.unet.MyUNet``). Building such an architecture imports
  and runs that package's code, so a card alone can never ask for it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..errors import ModelError

__all__ = ["config_path", "read_config", "trusted_architectures", "is_trusted_architecture"]

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def config_path() -> Path:
    """Where the configuration is read from (the file need not exist)."""
    if os.environ.get("CTXAI_CONFIG"):
        return Path(os.environ["CTXAI_CONFIG"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "ctxai" / "config.json"


def read_config() -> dict[str, Any]:
    """The configuration as a dictionary; {} when the file does not exist. Raises ModelError for a bad file."""
    path = config_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"CTXAI configuration {path} cannot be read as JSON ({exc}). Fix or remove the file.") \
            from exc
    if not isinstance(data, dict):
        raise ModelError(f"CTXAI configuration {path} must hold a JSON object, e.g. "
                         '{"trusted_architectures": ["mylab.nets"]}.')
    return data


def trusted_architectures() -> tuple[str, ...]:
    """The module prefixes the user trusts to build architectures from (``trusted_architectures``)."""
    prefixes = read_config().get("trusted_architectures", [])
    if not isinstance(prefixes, list) or not all(isinstance(p, str) and _MODULE.fullmatch(p) for p in prefixes):
        raise ModelError(f"'trusted_architectures' in {config_path()} must be a list of Python module names such "
                         f'as ["mylab.nets"], got {prefixes!r}.')
    return tuple(prefixes)


def is_trusted_architecture(module: str) -> bool:
    """Whether ``module`` (``mylab.nets.unet``) is one of the trusted prefixes or lies inside one."""
    return any(module == prefix or module.startswith(prefix + ".") for prefix in trusted_architectures())
