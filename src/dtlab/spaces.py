"""Action and observation specs: what kind of actions and observations a dataset, a model or a
checkpoint has, decided once (at a file format's boundary, or from an env) and carried along.

- ``ContinuousActions(dim, low, high)``: float vectors of width ``dim`` (a Gymnasium ``Box``), with
  the env's bounds when known. ``act_dim`` in dtlab always means this width.
- ``DiscreteActions(n)``: integer indices into ``Discrete(n)`` starting at 0.
- ``VectorObservations(dim)``: flat float vectors (a 1-D ``Box``).

Image observations (``ImageObservations(shape, stack)``) and dict observations
(``DictObservations(keys)``) will join ``ObservationSpec`` with issue 12.

Torch-free: numpy and the standard library only; Gymnasium is imported inside the functions that
read Gymnasium spaces and envs. Invalid specs raise ConfigError naming the field.

>>> import gymnasium as gym
>>> action_space_from_gym(gym.spaces.Box(-2.0, 2.0, (1,)))
ContinuousActions(dim=1, low=(-2.0,), high=(2.0,))
>>> DiscreteActions(2).to_json(), action_space_from_json({"type": "discrete", "n": 2})
({'type': 'discrete', 'n': 2}, DiscreteActions(n=2))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from dtlab.errors import ConfigError, EnvError


def _positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"'{field}' must be a positive integer, got {value!r}")
    return int(value)


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float, np.integer, np.floating))
            and not isinstance(x, (bool, np.bool_)) and math.isfinite(x))


def _bounds(value: Any, dim: int, field: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if items is None or len(items) != dim or not all(map(_is_number, items)):
        raise ConfigError(f"'{field}' must be a list of {dim} finite numbers")
    return tuple(float(v) for v in items)


@dataclass(frozen=True)
class ContinuousActions:
    """Float action vectors (dim,), e.g. a Gymnasium ``Box``; ``low``/``high``: the env's bounds
    (the model acts in [-1, 1] and dtlab.normalizer maps between them), None when unknown."""

    dim: int
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim", _positive_int(self.dim, "dim"))
        low = _bounds(self.low, self.dim, "low")
        high = _bounds(self.high, self.dim, "high")
        if (low is None) != (high is None):
            raise ConfigError("'low' and 'high' must both be given or both be null")
        if low is not None and not all(lo < hi for lo, hi in zip(low, high)):
            raise ConfigError(f"'low' must be below 'high' in every dimension, got {list(low)} "
                              f"and {list(high)}")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    def to_json(self) -> dict[str, Any]:
        return {"type": "continuous", "dim": self.dim,
                "low": None if self.low is None else list(self.low),
                "high": None if self.high is None else list(self.high)}


@dataclass(frozen=True)
class DiscreteActions:
    """Integer action indices 0..n-1 (a Gymnasium ``Discrete(n)`` starting at 0)."""

    n: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", _positive_int(self.n, "n"))

    def to_json(self) -> dict[str, Any]:
        return {"type": "discrete", "n": self.n}


@dataclass(frozen=True)
class VectorObservations:
    """Flat float observation vectors (dim,), e.g. a 1-D Gymnasium ``Box``."""

    dim: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim", _positive_int(self.dim, "dim"))

    def to_json(self) -> dict[str, Any]:
        return {"type": "vector", "dim": self.dim}


ActionSpec = Union[ContinuousActions, DiscreteActions]
ObservationSpec = VectorObservations  # issue 12 adds ImageObservations and DictObservations


# ---- JSON ----------------------------------------------------------------------------------------
def _object(data: Any, field: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"'{field}' must be an object")
    unknown = sorted(set(data) - keys)
    if unknown:
        raise ConfigError(f"'{field}' has unknown keys {unknown}")
    return data


def action_space_from_json(data: Any, field: str = "action_space") -> ActionSpec:
    """The spec ``to_json`` wrote; ConfigError naming ``field`` (and the key) when invalid."""
    kind = data.get("type") if isinstance(data, dict) else None
    try:
        if kind == "continuous":
            d = _object(data, field, {"type", "dim", "low", "high"})
            if "dim" not in d:
                raise ConfigError("'dim' is missing")
            return ContinuousActions(d["dim"], d.get("low"), d.get("high"))
        if kind == "discrete":
            d = _object(data, field, {"type", "n"})
            if "n" not in d:
                raise ConfigError("'n' is missing")
            return DiscreteActions(d["n"])
    except ConfigError as exc:
        raise ConfigError(f"'{field}': {exc}") from None
    raise ConfigError(f"'{field}' must be an object with \"type\": \"continuous\" or \"discrete\"")


def observation_space_from_json(data: Any, field: str = "observation_space") -> ObservationSpec:
    """The spec ``to_json`` wrote; ConfigError naming ``field`` (and the key) when invalid."""
    if not isinstance(data, dict) or data.get("type") != "vector":
        raise ConfigError(f"'{field}' must be an object with \"type\": \"vector\"")
    try:
        d = _object(data, field, {"type", "dim"})
        if "dim" not in d:
            raise ConfigError("'dim' is missing")
        return VectorObservations(d["dim"])
    except ConfigError as exc:
        raise ConfigError(f"'{field}': {exc}") from None


# ---- Gymnasium -----------------------------------------------------------------------------------
def describe_space(space: Any) -> str:
    """A one-line description of a Gymnasium space for error messages (``str`` of a Box with
    uneven bounds prints whole arrays, over several lines)."""
    import gymnasium as gym

    if isinstance(space, gym.spaces.Box):
        return f"Box(shape={space.shape}, {space.dtype})"
    text = str(space)
    return text if "\n" not in text and len(text) < 120 else f"{type(space).__name__}(shape={space.shape})"


def _flat_box_dim(space: Any) -> int | None:
    """Width of a flat Box: (dim,) -> dim, a scalar () -> 1; None for anything else."""
    import gymnasium as gym

    if not isinstance(space, gym.spaces.Box) or len(space.shape) > 1:
        return None
    dim = int(np.prod(space.shape))
    return dim if dim >= 1 else None


def action_space_from_gym(space: Any) -> ActionSpec:
    """``Box(dim,)`` (or a scalar Box: dim 1) -> ContinuousActions, with the bounds when they are
    all finite (else None); ``Discrete(n)`` starting at 0 -> DiscreteActions(n). Anything else:
    EnvError."""
    import gymnasium as gym

    if isinstance(space, gym.spaces.Discrete) and int(space.start) == 0:
        return DiscreteActions(int(space.n))
    dim = _flat_box_dim(space)
    if dim is not None:
        low = np.asarray(space.low, dtype=np.float64).reshape(-1)
        high = np.asarray(space.high, dtype=np.float64).reshape(-1)
        if np.isfinite(low).all() and np.isfinite(high).all() and (low < high).all():
            return ContinuousActions(dim, tuple(low.tolist()), tuple(high.tolist()))
        return ContinuousActions(dim)
    raise EnvError(f"unsupported action space {describe_space(space)}: dtlab needs a flat Box or "
                   "a Discrete(n) starting at 0")


def observation_space_from_gym(space: Any) -> ObservationSpec:
    """A flat ``Box(dim,)`` (or a scalar Box: dim 1) -> VectorObservations(dim). Anything else:
    EnvError."""
    dim = _flat_box_dim(space)
    if dim is not None:
        return VectorObservations(dim)
    raise EnvError(f"unsupported observation space {describe_space(space)}: dtlab needs a flat Box")


def check_against_env(env: Any, observations: ObservationSpec, actions: ActionSpec, *, what: str,
                      exact_n: bool) -> None:
    """Raise a one-line EnvError when ``env``'s spaces differ from ``what`` (e.g. "dataset X",
    "the checkpoint") has: the observation shape, and the action shape (continuous) or a
    ``Discrete(n)`` starting at 0 with n equal to the spec's (``exact_n``: a checkpoint's number of
    logits) or at least the spec's (a dataset need not use every action)."""
    import gymnasium as gym

    env_id = env.spec.id if env.spec else "env"
    obs_shape = env.observation_space.shape
    obs_dim = observations.dim
    space = env.action_space
    if isinstance(actions, DiscreteActions):
        if not isinstance(space, gym.spaces.Discrete) or int(space.start) != 0:
            raise EnvError(f"{env_id}: {what} has discrete actions but the env's action space is "
                           f"{describe_space(space)} (need Discrete(n) starting at 0)")
        fits = actions.n == int(space.n) if exact_n else actions.n <= int(space.n)
        if obs_shape != (obs_dim,) or not fits:
            ours = f"{actions.n} actions" if exact_n else f"actions up to index {actions.n - 1}"
            raise EnvError(f"{env_id} has observations {obs_shape} and {int(space.n)} actions, but "
                           f"{what} has observations ({obs_dim},) and {ours}")
        return
    if not isinstance(space, gym.spaces.Box):
        raise EnvError(f"{env_id}: {what} has continuous actions but the env's action space is "
                       f"{describe_space(space)}")
    if obs_shape != (obs_dim,) or space.shape != (actions.dim,):
        raise EnvError(f"{env_id} has observations {obs_shape} and actions {space.shape}, but "
                       f"{what} has observations ({obs_dim},) and actions ({actions.dim},)")
