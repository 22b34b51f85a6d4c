"""Action and observation specs: what kind of actions and observations a dataset, a model or a
checkpoint has, decided once (at a file format's boundary, or from an env) and carried along.

- ``ContinuousActions(dim, low, high)``: float vectors of width ``dim`` (a Gymnasium ``Box``), with
  the env's bounds when known. ``act_dim`` in dtlab always means this width.
- ``DiscreteActions(n)``: integer indices into ``Discrete(n)`` starting at 0.
- ``VectorObservations(dim)``: flat float vectors (a 1-D ``Box``).
- ``ImageObservations(shape, stack)``: grey uint8 frames of ``shape`` (H, W), seen by the model
  as stacks of the last ``stack`` frames (the env's ``FrameStackObservation`` gives
  ``(stack, H, W)``; a dataset stores each frame once, ``(N, H, W)``).
- ``DictObservations(keys, dims)``: chosen keys of a Gymnasium ``Dict`` of flat Boxes, flattened
  in the order of ``keys`` into one vector of ``sum(dims)`` (``flatten_observation``).

Torch-free: numpy and the standard library only; Gymnasium is imported inside the functions that
read Gymnasium spaces and envs. Invalid specs raise ConfigError naming the field.

>>> import gymnasium as gym
>>> action_space_from_gym(gym.spaces.Box(-2.0, 2.0, (1,)))
ContinuousActions(dim=1, low=(-2.0,), high=(2.0,))
>>> DiscreteActions(2).to_json(), action_space_from_json({"type": "discrete", "n": 2})
({'type': 'discrete', 'n': 2}, DiscreteActions(n=2))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from dtlab.checks import is_number
from dtlab.errors import ConfigError, EnvError


def _positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"'{field}' must be a positive integer, got {value!r}")
    return int(value)




def _bounds(value: Any, dim: int, field: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if items is None or len(items) != dim or not all(map(is_number, items)):
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


# The Nature-DQN encoder (dtlab.model.ImageEncoder: 8x8 stride 4, 4x4 stride 2, 3x3 stride 1, no
# padding) needs frames of at least 36 x 36 pixels: (36 - 8) / 4 + 1 = 8, (8 - 4) / 2 + 1 = 3,
# 3 - 3 + 1 = 1.
MIN_FRAME_SIZE = 36


@dataclass(frozen=True)
class ImageObservations:
    """Grey uint8 frames of ``shape`` (H, W) pixels; the model sees each step as the stack of the
    last ``stack`` frames, (stack, H, W), as Gymnasium's ``FrameStackObservation`` returns it
    (DT's Atari setting: 84 x 84, 4 frames)."""

    shape: tuple[int, int] = (84, 84)
    stack: int = 4

    def __post_init__(self) -> None:
        shape = self.shape
        if not isinstance(shape, (list, tuple)) or len(shape) != 2:
            raise ConfigError(f"'shape' must be two positive integers (height, width), got "
                              f"{shape!r}")
        shape = tuple(_positive_int(v, "shape") for v in shape)
        if min(shape) < MIN_FRAME_SIZE:
            raise ConfigError(f"'shape' must be at least {MIN_FRAME_SIZE} x {MIN_FRAME_SIZE} "
                              f"pixels (the Nature-DQN encoder's smallest input), got {shape}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "stack", _positive_int(self.stack, "stack"))

    @property
    def stacked_shape(self) -> tuple[int, int, int]:
        """(stack, H, W): one step's input, as the env gives it."""
        return (self.stack, *self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"type": "image", "shape": list(self.shape), "stack": self.stack}


@dataclass(frozen=True)
class DictObservations:
    """Keys of a Gymnasium ``Dict`` observation, flattened in this order into one float vector:
    ``keys[i]`` contributes ``dims[i]`` values (its Box flattened). ``dim`` = ``sum(dims)``."""

    keys: tuple[str, ...]
    dims: tuple[int, ...]

    def __post_init__(self) -> None:
        keys, dims = self.keys, self.dims
        if not isinstance(keys, (list, tuple)) or not keys or \
                not all(isinstance(k, str) and k for k in keys) or len(set(keys)) != len(keys):
            raise ConfigError(f"'keys' must be a non-empty list of distinct names, got {keys!r}")
        if not isinstance(dims, (list, tuple)) or len(dims) != len(keys):
            raise ConfigError(f"'dims' must be one positive integer per key ({len(keys)}), got "
                              f"{dims!r}")
        object.__setattr__(self, "keys", tuple(keys))
        object.__setattr__(self, "dims", tuple(_positive_int(d, "dims") for d in dims))

    @property
    def dim(self) -> int:
        return sum(self.dims)

    def columns(self, keys: tuple[str, ...] | list[str]) -> np.ndarray:
        """Column indices of ``keys`` (in that order) in this spec's flat vector. (sum dims,)"""
        offsets = dict(zip(self.keys, np.cumsum((0,) + self.dims[:-1]).tolist()))
        width = dict(zip(self.keys, self.dims))
        return np.concatenate([np.arange(offsets[k], offsets[k] + width[k]) for k in keys])

    def select(self, keys: tuple[str, ...] | list[str]) -> "DictObservations":
        """The spec of ``keys`` (in that order); ConfigError naming a key this spec lacks, with
        the keys it has."""
        missing = [k for k in keys if k not in self.keys]
        if missing:
            raise ConfigError(f"obs_keys: no observation key {missing[0]!r} (available keys: "
                              f"{', '.join(self.keys)})")
        width = dict(zip(self.keys, self.dims))
        return DictObservations(tuple(keys), tuple(width[k] for k in keys))

    def to_json(self) -> dict[str, Any]:
        return {"type": "dict", "keys": list(self.keys), "dims": list(self.dims)}


ActionSpec = Union[ContinuousActions, DiscreteActions]
ObservationSpec = Union[VectorObservations, ImageObservations, DictObservations]


def flatten_observation(spec: DictObservations, observation: Any) -> np.ndarray:
    """Dict observation(s) -> (n, spec.dim) float32: the keys of ``spec`` concatenated in its
    order, each value flattened; a mapping of single values gives n = 1, a mapping of batched
    arrays (n, *key_shape) gives n rows. Keys the spec does not name are ignored. EnvError naming
    the key when one is missing or has the wrong size."""
    if not isinstance(observation, Mapping):
        raise EnvError(f"expected a Dict observation with keys {list(spec.keys)}, got "
                       f"{type(observation).__name__}")
    parts, rows = [], None
    for key, dim in zip(spec.keys, spec.dims):
        if key not in observation:
            raise EnvError(f"Dict observation has no key {key!r} (it has {sorted(observation)})")
        value = np.asarray(observation[key], dtype=np.float32)
        if value.size % dim or (rows is not None and value.size // dim != rows):
            raise EnvError(f"Dict observation key {key!r} has shape {value.shape}, not "
                           f"{rows or 'n'} x {dim} values")
        rows = value.size // dim
        parts.append(value.reshape(rows, dim))
    return np.concatenate(parts, axis=1)


def as_observation_array(spec: ObservationSpec, observation: Any) -> np.ndarray:
    """One env observation as the array dtlab records and the policy takes: a Dict observation
    flattened (``flatten_observation``, (dim,)), a frame stack as uint8 (stack, H, W), a vector as
    float32 (dim,)."""
    if isinstance(spec, DictObservations):
        flat = flatten_observation(spec, observation)  # (n, dim)
        if flat.shape[0] != 1:
            raise EnvError(f"expected one Dict observation, got {flat.shape[0]}")
        return flat[0]
    if isinstance(spec, ImageObservations):
        return np.asarray(observation, dtype=np.uint8)
    return np.asarray(observation, dtype=np.float32).reshape(-1)


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
    kind = data.get("type") if isinstance(data, dict) else None
    needs = {"vector": {"dim"}, "image": {"shape", "stack"}, "dict": {"keys", "dims"}}
    if kind not in needs:
        raise ConfigError(f"'{field}' must be an object with \"type\": \"vector\", \"image\" "
                          "or \"dict\"")
    try:
        d = _object(data, field, {"type"} | needs[kind])
        missing = sorted(needs[kind] - set(d))
        if missing:
            raise ConfigError(f"'{missing[0]}' is missing")
        if kind == "vector":
            return VectorObservations(d["dim"])
        if kind == "image":
            return ImageObservations(d["shape"], d["stack"])
        return DictObservations(d["keys"], d["dims"])
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
    """A flat ``Box(dim,)`` (or a scalar Box: dim 1) -> VectorObservations(dim); a uint8
    ``Box(stack, H, W)`` (``FrameStackObservation`` of grey frames, H and W at least
    ``MIN_FRAME_SIZE``) -> ImageObservations((H, W), stack); a ``Dict`` of Boxes ->
    DictObservations of all its keys in the space's order, each Box flattened. Anything else:
    EnvError."""
    import gymnasium as gym

    dim = _flat_box_dim(space)
    if dim is not None:
        return VectorObservations(dim)
    if isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3 \
            and min(space.shape[1:]) >= MIN_FRAME_SIZE:
        return ImageObservations(space.shape[1:], space.shape[0])
    if isinstance(space, gym.spaces.Dict) and len(space.spaces) > 0 and all(
            isinstance(sub, gym.spaces.Box) and int(np.prod(sub.shape)) >= 1
            for sub in space.spaces.values()):
        return DictObservations(tuple(space.spaces),
                                tuple(int(np.prod(sub.shape)) for sub in space.spaces.values()))
    raise EnvError(f"unsupported observation space {describe_space(space)}: dtlab needs a flat "
                   f"Box, a uint8 Box of stacked grey frames (stack, H, W) with H, W >= "
                   f"{MIN_FRAME_SIZE}, or a Dict of Boxes")


def describe_observations(spec: ObservationSpec) -> str:
    """How an env's observations must look for ``spec``, for error messages: ``(dim,)``,
    ``(stack, H, W) uint8 frames`` or ``Dict(key: dim, ...)``."""
    if isinstance(spec, ImageObservations):
        return f"{spec.stacked_shape} uint8 frame stacks"
    if isinstance(spec, DictObservations):
        return "Dict(" + ", ".join(f"{k}: {d}" for k, d in zip(spec.keys, spec.dims)) + ")"
    return f"({spec.dim},)"


def observations_fit(spec: ObservationSpec, space: Any) -> bool:
    """Whether a Gymnasium observation space gives what ``spec`` needs: a Box of shape (dim,)
    (vectors) or (stack, H, W) (frame stacks), or a Dict holding every key of the spec with a Box
    of that many values (other keys may be there too)."""
    import gymnasium as gym

    if isinstance(spec, DictObservations):
        return isinstance(space, gym.spaces.Dict) and all(
            k in space.spaces and isinstance(space.spaces[k], gym.spaces.Box)
            and int(np.prod(space.spaces[k].shape)) == d for k, d in zip(spec.keys, spec.dims))
    if isinstance(spec, ImageObservations):
        return isinstance(space, gym.spaces.Box) and space.shape == spec.stacked_shape
    return getattr(space, "shape", None) == (spec.dim,)


def _env_observations(space: Any) -> str:
    """The env's observation space in the words ``describe_observations`` uses."""
    import gymnasium as gym

    if isinstance(space, gym.spaces.Dict):
        return "Dict(" + ", ".join(f"{k}: {int(np.prod(v.shape)) if v.shape else v}"
                                   for k, v in space.spaces.items()) + ")"
    return str(space.shape)


def check_against_env(env: Any, observations: ObservationSpec, actions: ActionSpec, *, what: str,
                      exact_n: bool, advice: str) -> None:
    """Raise a one-line EnvError, ending in ``advice`` (the flag to change, e.g.
    ``dtlab.envs.env_advice``'s), when ``env``'s spaces differ from what ``what`` (e.g.
    "dataset X", "the checkpoint") has: the observations (``observations_fit``: a vector's shape, a frame
    stack's depth and frame shape, a Dict's keys and sizes), and the action shape (continuous) or a
    ``Discrete(n)`` starting at 0 with n equal to the spec's (``exact_n``: a checkpoint's number of
    logits) or at least the spec's (a dataset need not use every action)."""
    import gymnasium as gym

    env_id = env.spec.id if env.spec else "env"
    obs_ok = observations_fit(observations, env.observation_space)
    env_obs = _env_observations(env.observation_space)
    ours = describe_observations(observations)
    space = env.action_space
    if isinstance(actions, DiscreteActions):
        if not isinstance(space, gym.spaces.Discrete) or int(space.start) != 0:
            raise EnvError(f"{what} has discrete actions but {env_id}'s action space is "
                           f"{describe_space(space)} (need Discrete(n) starting at 0); {advice}")
        fits = actions.n == int(space.n) if exact_n else actions.n <= int(space.n)
        if not obs_ok or not fits:
            n_ours = f"{actions.n} actions" if exact_n else f"actions up to index {actions.n - 1}"
            raise EnvError(f"{what} has observations {ours} and {n_ours}, but {env_id} has "
                           f"observations {env_obs} and {int(space.n)} actions; {advice}")
        return
    if not isinstance(space, gym.spaces.Box):
        raise EnvError(f"{what} has continuous actions but {env_id}'s action space is "
                       f"{describe_space(space)}; {advice}")
    if not obs_ok or space.shape != (actions.dim,):
        raise EnvError(f"{what} has observations {ours} and actions ({actions.dim},), but {env_id} "
                       f"has observations {env_obs} and actions {space.shape}; {advice}")
