"""Durations and byte sizes as users write them in models.yaml and in request bodies.

Owns the two small parsers every other module shares: Ollama's keep_alive semantics
(`parse_duration` / `format_duration`) and memory sizes (`parse_bytes`). Pure functions; errors
are `ValueError`s whose message says what is accepted, so callers can wrap them with a key path.
"""

from __future__ import annotations

import math
import re

# Go's time.ParseDuration units, in seconds.
_DURATION_UNITS_S: dict[str, float] = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # micro sign
    "μs": 1e-6,  # Greek mu, as Go also accepts
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_UNIT = r"(?:ns|us|µs|μs|ms|s|m|h)"
_GO_DURATION_RE = re.compile(rf"([-+]?)((?:{_NUMBER}{_UNIT})+)")
_DURATION_PART_RE = re.compile(rf"({_NUMBER})({_UNIT})")
_PLAIN_NUMBER_RE = re.compile(rf"[-+]?{_NUMBER}(?:[eE][-+]?\d+)?")

DURATION_HELP = (
    'a duration like "30s", "10m", "2h", "1h30m" or "500ms", a number of seconds, '
    "-1 to never expire, or 0 to unload right after the request"
)


# Go's longest time.Duration (2**63 ns, ~292 years): anything longer means never expire, and
# an expiry that far ahead would not fit a platform time_t when rendered (found by fuzzing).
MAX_DURATION_S = 2**63 / 1e9


def parse_duration(value: str | int | float, *, key: str = "keep_alive") -> float | None:
    """Parse a keep_alive-style duration into seconds.

    Returns None for "never expire" (-1, "-1", any negative number or duration) and 0.0 for
    "unload right after the request". Numbers and numeric strings are seconds; other strings
    follow Go's duration syntax. Raises ValueError naming `key` on anything else.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{key}: expected {DURATION_HELP}; got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if _PLAIN_NUMBER_RE.fullmatch(text):
            seconds = float(text)
        else:
            seconds = _parse_go_duration(text, key=key, original=value)
    else:
        seconds = float(value)
    if math.isnan(seconds):
        raise ValueError(f"{key}: expected {DURATION_HELP}; got {value!r}")
    if seconds < 0 or seconds >= MAX_DURATION_S:  # inf, or past any representable expiry
        return None
    return seconds if seconds else 0.0  # "-0" is 0.0, not -0.0


def _parse_go_duration(text: str, *, key: str, original: object) -> float:
    match = _GO_DURATION_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"{key}: expected {DURATION_HELP}; got {original!r}")
    sign, body = match.groups()
    total = sum(
        float(number) * _DURATION_UNITS_S[unit] for number, unit in _DURATION_PART_RE.findall(body)
    )
    return -total if sign == "-" else total


def format_duration(seconds: float | None) -> str:
    """Render seconds the way users write them: None -> "-1", 300 -> "5m", 90 -> "1m30s".

    The result parses back to the same value with `parse_duration` (to the millisecond).
    """
    if seconds is None or seconds < 0 or math.isinf(seconds):
        return "-1"
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{_trim(seconds * 1000)}ms"
    hours, rest = divmod(seconds, 3600.0)
    minutes, secs = divmod(rest, 60.0)
    parts = []
    if hours:
        parts.append(f"{int(hours)}h")
    if minutes:
        parts.append(f"{int(minutes)}m")
    if secs:
        parts.append(f"{_trim(secs)}s")
    return "".join(parts)


def _trim(number: float) -> str:
    """Shortest decimal form, millisecond precision at most: 1.5 -> "1.5", 30.0 -> "30"."""
    text = f"{number:.3f}".rstrip("0").rstrip(".")
    return text or "0"


# Decimal units follow SI (and Kubernetes): "G" and "GB" are 10**9; "Gi" and "GiB" are 2**30.
_BYTE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}
_BYTES_RE = re.compile(rf"({_NUMBER})\s*([a-zA-Z]*)")
BYTES_HELP = (
    'a size like "12GB" (10**9 bytes), "12GiB" (2**30 bytes), "512MB", "1.5G", '
    'a number of bytes, or a share of system memory like "75%"'
)


def parse_bytes(value: str | int, *, total: int | None = None) -> int:
    """Parse a memory size into bytes; "N%" is a share of `total`, which it then requires.

    Units are case-insensitive; GB/G = 10**9, GiB/Gi = 2**30. Raises ValueError on bad input.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected {BYTES_HELP}; got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"expected a non-negative number of bytes; got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"expected {BYTES_HELP}; got {value!r}")
    text = value.strip()
    if text.endswith("%"):
        return _parse_percent(text[:-1].strip(), total=total, original=value)
    match = _BYTES_RE.fullmatch(text)
    if match is None or match.group(2).lower() not in _BYTE_UNITS:
        raise ValueError(f"expected {BYTES_HELP}; got {value!r}")
    number, unit = match.groups()
    return int(float(number) * _BYTE_UNITS[unit.lower()])


def _parse_percent(number: str, *, total: int | None, original: str) -> int:
    if not re.fullmatch(_NUMBER, number):
        raise ValueError(f'expected a percentage like "75%"; got {original!r}')
    share = float(number)
    if not 0 < share <= 100:
        raise ValueError(f"a percentage must be above 0% and at most 100%; got {original!r}")
    if total is None:
        raise ValueError(f"{original!r} is a percentage, which is not allowed here; give a size")
    return int(total * share / 100)
