"""Parsing and printing of durations (``30s``, ``5m``) and sizes (``512M``, ``2G``)."""

from __future__ import annotations

import math
import re

from planetary_mesh.errors import ConfigError

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``90``, ``30s``, ``5m``, ``1.5h``, ``2d``, ``250ms``."""
    match = _DURATION_RE.match(text)
    if not match:
        raise ConfigError(
            f"bad duration {text!r}: write a number with an optional unit, e.g. 30s, 5m, 1h, 2d"
        )
    value = float(match.group(1)) * _DURATION_UNITS[(match.group(2) or "s").lower()]
    if not math.isfinite(value):
        raise ConfigError(f"bad duration {text!r}: it is too large")
    if value <= 0:
        raise ConfigError(f"bad duration {text!r}: it must be greater than zero")
    return value


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``1048576``, ``512M``, ``2G``, ``1.5GiB`` (binary units)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(
            f"bad size {text!r}: write a number with an optional unit, e.g. 512M, 2G, 64K"
        )
    value = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if not math.isfinite(value) or value >= 2**63:
        raise ConfigError(f"bad size {text!r}: it is too large")
    if value < 1:
        raise ConfigError(f"bad size {text!r}: it must be at least one byte")
    return int(value)


def format_size(size: int) -> str:
    """``2147483648`` → ``2.0G``; whole bytes below a KiB."""
    value = float(size)
    for unit in ("", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{int(value)}" if unit == "" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """``75.2`` → ``1m15s``; sub-second values in milliseconds."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
