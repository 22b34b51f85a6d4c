"""Typed records that cross module boundaries instead of string-keyed dicts.

- ``ReturnStats``: episode-return statistics, one record for data summaries, collection
  metadata, checkpoints, evaluation sweeps and plots (written as ``{"mean", "std", "min",
  "max"}`` everywhere).
- ``Provenance``: where a dataset came from, read from the metadata keys the formats store
  (dtlab's collector, D4RL's files, Minari's metadata) in this one place.

Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from dtlab.checks import is_number


def _number(value: Any) -> float | None:
    """A finite int/float (not bool) as float, else None."""
    if is_number(value):
        return float(value)
    return None


# How far above the data's best return a target may lie and still count as supported, as a
# fraction of the data's scale (a choice: half of it keeps the DT paper's 3600 for the committed
# hopper-medium-replay file, best 3,010, and not for one whose best is 980; docs/results.md).
SUPPORT_MARGIN = 0.5


@dataclass(frozen=True)
class ReturnStats:
    """Undiscounted episode returns, in the env's units (computed in float64)."""

    mean: float
    std: float  # population std (ddof 0)
    min: float
    max: float

    @classmethod
    def of(cls, returns: np.ndarray) -> "ReturnStats":
        """Statistics of (E,) episode returns; E >= 1."""
        r = np.asarray(returns, dtype=np.float64)
        return cls(float(r.mean()), float(r.std()), float(r.min()), float(r.max()))

    @classmethod
    def from_json(cls, data: Any) -> "ReturnStats | None":
        """The record stored as ``{"mean", "std", "min", "max"}``; None when absent or malformed
        (files written by other tools)."""
        if not isinstance(data, Mapping):
            return None
        values = [_number(data.get(k)) for k in ("mean", "std", "min", "max")]
        return None if any(v is None for v in values) else cls(*values)

    def to_json(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "min": self.min, "max": self.max}

    @property
    def supported_max(self) -> float:
        """The highest target return data with these returns supports: ``SUPPORT_MARGIN`` times
        the data's scale (max(|best|, best - worst)) above its best return. Above it, a
        return-conditioned policy is asked for returns far beyond any it was trained on (the DT
        paper's 3600 on a Hopper file whose best return is 980)."""
        return self.max + SUPPORT_MARGIN * max(abs(self.max), self.max - self.min)

    def supports(self, target: float) -> bool:
        """Whether a target return is at most ``supported_max``."""
        return target <= self.supported_max

    def fitted_target(self, targets: Sequence[float]) -> float | None:
        """The data's best return as a target (``round_target``), when one of ``targets`` (an
        env's paper targets) lies beyond what the data supports; else None."""
        if all(self.supports(t) for t in targets):
            return None
        return round_target(self.max)


def round_target(value: float) -> float:
    """A target fitted to data, rounded to 3 significant digits (980.4 -> 980.0, 1234.5 ->
    1230.0): printed as given, and exact in a report's table."""
    return float(f"{value:.3g}")


# Where each field lives in the metadata the formats keep, in order of precedence: dtlab's own
# keys first, then Minari's, then the bare names D4RL-style files use.
_REF_KEYS = {"ref_min_score": ("dtlab_ref_min_score", "minari_ref_min_score", "ref_min_score"),
             "ref_max_score": ("dtlab_ref_max_score", "minari_ref_max_score", "ref_max_score")}
# The env id: dtlab's and Minari-converted files write env_id; other tools env_name or env.
_ENV_KEYS = ("env_id", "env_name", "env")
_KNOWN = {*_ENV_KEYS, "policies", "algorithm", "seed", "dtlab_version", "gymnasium_version",
          "episode_return", *(k for keys in _REF_KEYS.values() for k in keys)}


@dataclass(frozen=True)
class Provenance:
    """What a dataset records about its origin; every field None/empty when the file is silent.

    ``policies``: dtlab's collector records a list of policy names, D4RL's files an ``algorithm``
    string. ``ref_min_score``/``ref_max_score``: reference returns recorded with the data
    (dtlab's presets, Minari's metadata); which reference wins over the env registry's is
    decided by ``dtlab.envs.reference_scores``. ``extras``: every other metadata key, as stored.
    """

    env_id: str | None = None
    policies: tuple[str, ...] = ()
    seed: int | None = None
    dtlab_version: str | None = None
    gymnasium_version: str | None = None
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    episode_return: ReturnStats | None = None
    extras: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> "Provenance":
        """Read the on-disk keys (see the module docstring); malformed values count as absent."""
        def text(key: str) -> str | None:
            value = metadata.get(key)
            return value if isinstance(value, str) and value else None

        policies = metadata.get("policies")
        if isinstance(policies, (list, tuple)) and all(isinstance(p, str) for p in policies):
            names = tuple(policies)
        else:
            names = (text("algorithm"),) if text("algorithm") else ()
        seed = metadata.get("seed")
        refs = {name: next((v for v in (_number(metadata.get(k)) for k in keys) if v is not None),
                           None) for name, keys in _REF_KEYS.items()}
        return cls(
            env_id=next((text(k) for k in _ENV_KEYS if text(k)), None), policies=names,
            seed=int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else None,
            dtlab_version=text("dtlab_version"), gymnasium_version=text("gymnasium_version"),
            ref_min_score=refs["ref_min_score"], ref_max_score=refs["ref_max_score"],
            episode_return=ReturnStats.from_json(metadata.get("episode_return")),
            extras=MappingProxyType({k: v for k, v in metadata.items() if k not in _KNOWN}))
