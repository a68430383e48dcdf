"""Strict JSON for our own files: non-finite floats as the strings "nan" / "inf" / "-inf" (strict JSON has no such
numbers), numpy scalars as Python numbers, tuples as lists; `from_json_safe` reads the strings back as floats.

One helper for every JSON we write (run archives, summaries, reports, benchmark results), so they all read alike.
"""

from __future__ import annotations

import math

import numpy as np


def json_safe(value):
    """``value`` with non-finite floats as the strings "nan" / "inf" / "-inf" and numpy scalars as Python ones."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def from_json_safe(value):
    """Inverse of `json_safe` for the values it writes."""
    if value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, dict):
        return {k: from_json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json_safe(v) for v in value]
    return value
