"""The one finite-number check: what counts as a number in a config, a checkpoint's JSON, a
space's bounds or a dataset's metadata, and the range check that names the offending flag.
A leaf: no dtlab import but errors, no third-party import but NumPy's scalar types."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from dtlab.errors import ConfigError


def is_number(value: Any) -> bool:
    """A finite int or float (NumPy scalars included), not a bool."""
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)) and math.isfinite(value))


def flag(name: str) -> str:
    """The command-line flag of a config field, the one mapping from names to flags:
    ``batch_size`` -> ``--batch-size``, ``model.embed_dim`` -> ``--model.embed-dim``; a name that
    is already a flag or is not a field path (``'--lr'``, ``'target_return'`` is a field path
    and maps) is returned as it is when it is not a plain lower-case path."""
    if re.fullmatch(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*", name):
        return "--" + name.replace("_", "-")
    return name


def check_number(name: str, value: float | int | None, *, minimum: float | None = None,
                 above: float | None = None, maximum: float | None = None,
                 below: float | None = None, integer: bool = False) -> None:
    """Raise ConfigError naming the flag of ``name`` (``flag``: a field ``lr`` is named ``--lr``)
    unless ``value`` is None or a finite number in range (``minimum``/``maximum`` inclusive,
    ``above``/``below`` exclusive); ``integer``: an int."""
    if value is None:
        return
    name = flag(name)
    if not is_number(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if integer and not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    for bound, ok, word in ((minimum, lambda b: value >= b, ">="), (above, lambda b: value > b, ">"),
                            (maximum, lambda b: value <= b, "<="), (below, lambda b: value < b, "<")):
        if bound is not None and not ok(bound):
            raise ConfigError(f"{name} must be {word} {bound:g}, got {value!r}")
