"""Normalizer: the one record of how data is scaled between the env's units and the model's.

- Observations: ``(x - mean) / std`` per dimension, from the training data. The std is the data's
  std plus 1e-6, as the original DT (``state_std = np.std(states, axis=0) + 1e-6``,
  github.com/kzl/decision-transformer, gym/experiment.py); a dimension whose std is at most 1e-6
  (constant in the data) gets std 1 instead, with its mean still subtracted: dividing by ~1e-6
  would multiply any evaluation-time deviation by ~1e6 (issue 10). Those dimensions are recorded
  (``constant_dims``) and ``from_episodes`` warns about them.
- Image frames (``dtlab.spaces.ImageObservations``, uint8): one mean and std for every pixel, 0 and
  ``PIXEL_SCALE`` = 255, i.e. ``x / 255`` in [0, 1], as the DT Atari code scales its states
  (github.com/kzl/decision-transformer, atari/run_dt_atari.py: ``states = states / 255.``).
  Frames stay uint8 until they reach the model's device; the arithmetic below then promotes them
  to float32 (numpy and torch alike).
- Returns-to-go: divided by ``return_scale`` (1000 for MuJoCo locomotion, dtlab.envs).
- Actions: continuous actions are mapped linearly from the env's bounds ``[low, high]`` to
  ``[-1, 1]`` (the range of the model's tanh head) and back; discrete actions (indices), and
  continuous ones without known bounds, pass through unchanged.

The methods are plain arithmetic, so they work on numpy arrays and, after ``converted`` (the
arrays turned into tensors once, e.g. on the policy's device), on torch tensors alike. Torch-free:
numpy and the standard library only. It is saved in a checkpoint's ``config.json`` (``to_json``).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from dtlab.checks import is_number
from dtlab.errors import ConfigError, DtlabWarning

# The original DT's std floor (gym/experiment.py: np.std(states, axis=0) + 1e-6); a dimension whose
# std is at most this is constant for dtlab and gets std 1.
STD_EPS = 1e-6

# Pixel values 0..255 of uint8 frames are divided by this (DT Atari: atari/run_dt_atari.py,
# ``states / 255.``).
PIXEL_SCALE = 255.0


def to_unit_interval(x, low, high):
    """Map ``x`` linearly from ``[low, high]`` to ``[-1, 1]`` (no clipping). (..., A)"""
    return 2.0 * (x - low) / (high - low) - 1.0


def from_unit_interval(x, low, high):
    """Map ``x`` linearly from ``[-1, 1]`` to ``[low, high]``. (..., A)"""
    return low + (x + 1.0) * 0.5 * (high - low)


def _numbers(value: Any, field_name: str, length: int | None = None) -> list[float]:
    items = list(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    ok = items is not None and (length is None or len(items) == length) and all(
        is_number(v) for v in items)
    if not ok:
        size = f"{length} " if length is not None else ""
        raise ConfigError(f"'normalizer.{field_name}' must be a list of {size}finite numbers")
    return [float(v) for v in items]


@dataclass(frozen=True, eq=False)
class Normalizer:
    """Observation mean/std, return scale and action bounds (see the module docstring).

    Arrays are read-only numpy arrays: ``obs_mean``/``obs_std`` (obs_dim,) float32,
    ``action_low``/``action_high`` (act_dim,) float64, or None (actions pass through unchanged).
    Invalid values raise ConfigError naming the field.

    >>> norm = Normalizer(obs_mean=[1.0], obs_std=[2.0], return_scale=100.0,
    ...                   action_low=[-2.0], action_high=[2.0])
    >>> norm.normalize_observations(np.array([[5.0]], np.float32)), norm.scale_returns(-250.0)
    (array([[2.]], dtype=float32), -2.5)
    >>> norm.actions_to_model(np.array([[1.0], [3.0]])), norm.actions_from_model(np.array([0.5]))
    (array([[0.5],
           [1. ]]), array([1.]))
    """

    obs_mean: np.ndarray  # (obs_dim,) float32
    obs_std: np.ndarray  # (obs_dim,) float32, > 0
    return_scale: float  # returns-to-go are divided by this
    action_low: np.ndarray | None = None  # (act_dim,) float64 env bounds; None: identity
    action_high: np.ndarray | None = None  # (act_dim,) float64
    constant_dims: tuple[int, ...] = ()  # observation dims constant in the data (std set to 1)
    _converted: bool = field(default=False, init=False, repr=False)  # see `converted`

    def __post_init__(self) -> None:
        if self._converted:
            return
        mean = np.asarray(_numbers(self.obs_mean, "obs_mean"), dtype=np.float32)
        std = np.asarray(_numbers(self.obs_std, "obs_std", len(mean)), dtype=np.float32)
        if mean.size == 0 or not (std > 0).all():
            raise ConfigError("'normalizer.obs_std' must be a non-empty list of positive numbers")
        scale = self.return_scale
        if not is_number(scale) or scale <= 0:
            raise ConfigError(f"'normalizer.return_scale' must be a positive number, got {scale!r}")
        if (self.action_low is None) != (self.action_high is None):
            raise ConfigError("'normalizer.action_low' and 'action_high' must both be given or "
                              "both be null")
        low = high = None
        if self.action_low is not None:
            low = np.asarray(_numbers(self.action_low, "action_low"), dtype=np.float64)
            high = np.asarray(_numbers(self.action_high, "action_high", len(low)), np.float64)
            if low.size == 0 or not (low < high).all():
                raise ConfigError("'normalizer.action_low' must be below 'action_high' in every "
                                  "dimension")
        dims = self.constant_dims
        if not isinstance(dims, (list, tuple)) or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d < mean.size for d in dims):
            raise ConfigError(f"'normalizer.constant_dims' must be a list of observation indices "
                              f"below {mean.size}")
        for name, value in (("obs_mean", mean), ("obs_std", std), ("action_low", low),
                            ("action_high", high)):
            if value is not None:
                value.setflags(write=False)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "return_scale", float(scale))
        object.__setattr__(self, "constant_dims", tuple(sorted(set(dims))))

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_episodes(cls, episodes, return_scale: float, action_space) -> "Normalizer":
        """Statistics of ``episodes`` (an EpisodeSet) and the action bounds of ``action_space``
        (a dtlab.spaces spec: ContinuousActions with bounds maps to [-1, 1]; otherwise identity).
        Image frames get ``for_images`` (no statistics are computed over them).

        Mean and std are computed in float64 over all transitions. Warns (DtlabWarning, one
        line) when some observation dimensions are constant, naming them.
        """
        low, high = getattr(action_space, "low", None), getattr(action_space, "high", None)
        if episodes.observations.dtype == np.uint8:  # image frames (N, H, W): EpisodeSet's rule
            return cls.for_images(return_scale, low, high)
        obs = np.asarray(episodes.observations, dtype=np.float64)  # (N, obs_dim)
        mean, raw_std = obs.mean(0), obs.std(0)  # (obs_dim,)
        constant = np.flatnonzero(raw_std <= STD_EPS)
        std = (raw_std + STD_EPS).astype(np.float32)
        std[constant] = 1.0
        if constant.size:
            warnings.warn(
                f"{getattr(episodes, 'source', '<memory>')}: observation dimensions "
                f"{constant.tolist()} are constant in the data (std <= {STD_EPS:g}); they are "
                "normalized with std 1 (mean subtracted), so the model cannot use them",
                DtlabWarning, stacklevel=2)
        return cls(mean.astype(np.float32), std, float(return_scale), low, high,
                   tuple(int(d) for d in constant))

    @classmethod
    def for_images(cls, return_scale: float, action_low=None, action_high=None) -> "Normalizer":
        """uint8 frames to [0, 1]: mean 0 and std ``PIXEL_SCALE`` (255) for every pixel."""
        return cls([0.0], [PIXEL_SCALE], float(return_scale), action_low, action_high)

    def converted(self, convert: Callable[[np.ndarray], Any]) -> "Normalizer":
        """A copy whose arrays are ``convert(array)``, e.g. torch tensors on a device: the methods
        then compute on those. Not validated again, and not for ``to_json``."""
        new = copy.copy(self)
        for name in ("obs_mean", "obs_std", "action_low", "action_high"):
            value = getattr(self, name)
            object.__setattr__(new, name, None if value is None else convert(value))
        object.__setattr__(new, "_converted", True)
        return new

    # ---- the mappings (numpy arrays, or tensors after `converted`) -------------------------------
    @property
    def maps_actions(self) -> bool:
        """Whether actions are mapped to [-1, 1] (continuous with bounds) or passed through."""
        return self.action_low is not None

    def normalize_observations(self, observations):
        """(..., obs_dim) env units -> model inputs; uint8 frames (..., H, W) -> float32 in [0, 1]
        (``for_images``: one mean and std for every pixel, broadcast)."""
        return (observations - self.obs_mean) / self.obs_std

    def normalize_observations_(self, observations):
        """``normalize_observations`` in place on a float array or tensor (e.g. uint8 frames just
        converted to float32: the conversion is the only copy), returned."""
        observations -= self.obs_mean
        observations /= self.obs_std
        return observations

    def scale_returns(self, returns):
        """Returns(-to-go) in env units -> model units: divided by ``return_scale``."""
        return returns / self.return_scale

    def unscale_returns(self, returns):
        """Model units -> env units: multiplied by ``return_scale``."""
        return returns * self.return_scale

    def actions_to_model(self, actions):
        """(..., act_dim) env actions -> [-1, 1], clipped there (data outside the bounds);
        discrete indices or unbounded actions unchanged."""
        if self.action_low is None:
            return actions
        return to_unit_interval(actions, self.action_low, self.action_high).clip(-1.0, 1.0)

    def actions_from_model(self, actions):
        """(..., act_dim) model actions in [-1, 1] -> env units; discrete indices unchanged."""
        if self.action_low is None:
            return actions
        return from_unit_interval(actions, self.action_low, self.action_high)

    # ---- JSON ------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        if self._converted:
            raise ConfigError("a converted Normalizer cannot be saved; save the original")
        return {
            "obs_mean": [float(v) for v in self.obs_mean],
            "obs_std": [float(v) for v in self.obs_std],
            "constant_dims": list(self.constant_dims),
            "return_scale": self.return_scale,
            "action_low": None if self.action_low is None else [float(v) for v in self.action_low],
            "action_high": None if self.action_high is None else [float(v) for v in self.action_high],
        }

    @classmethod
    def from_json(cls, data: Any) -> "Normalizer":
        """The record ``to_json`` wrote; ConfigError naming the field when invalid."""
        keys = {"obs_mean", "obs_std", "constant_dims", "return_scale", "action_low", "action_high"}
        if not isinstance(data, dict):
            raise ConfigError("'normalizer' must be an object")
        unknown, missing = sorted(set(data) - keys), sorted(keys - set(data))
        if unknown or missing:
            raise ConfigError(f"'normalizer' has unknown keys {unknown} or misses {missing}")
        return cls(data["obs_mean"], data["obs_std"], data["return_scale"], data["action_low"],
                   data["action_high"], data["constant_dims"])
