"""The rules both runtimes (``DTPolicy`` and ``DeployedPolicy``) apply to what ``act`` and
``steer`` are given: batch shapes, Dict observations, per-episode values and episode indices. numpy only, so that the
deploy runtime (numpy and onnxruntime) and dtlab's torch policy share one copy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import ConfigError, EnvError


def episodes(n: int) -> str:
    return f"{n} episode{'s' if n != 1 else ''}"


def fit_batch(value: np.ndarray, n: int, shape: tuple[int, ...], what: str,
               dtype: type | None = None) -> np.ndarray:
    """``value`` as (n, *shape): exactly that shape, or ``shape`` itself when n is 1 (one episode,
    unbatched), and of ``dtype`` when one is given. EnvError naming the shape got and the shape
    expected otherwise: an array of the right size but another shape, e.g. (obs_dim, n), is
    refused, since reshaping it would mix the episodes' values."""
    fits = value.shape == (n, *shape) or (n == 1 and value.shape == shape)
    if fits and (dtype is None or value.dtype == dtype):
        return value.reshape(n, *shape)
    kind = "" if dtype is None else f" {np.dtype(dtype).name}"
    got = "" if dtype is None else f" ({value.dtype})"
    expected = f"{(n, *shape)}{kind}" + (f" or {shape}{kind}" if n == 1 else "")
    raise EnvError(f"act got {what} of shape {value.shape}{got} for {episodes(n)}; "
                   f"expected {expected}")


def check_index(index: Any, num_envs: int) -> np.ndarray:
    """``index`` as (n,) int64: integers in 0..num_envs-1, each at most once (a negative index is
    refused, not counted from the end; a repeated one would advance an episode twice in one
    step). ConfigError naming ``index`` otherwise."""
    rows = np.asarray(index)
    if rows.size == 0:
        return np.zeros(0, np.int64)
    if rows.ndim > 1 or rows.dtype.kind not in "iu":
        raise ConfigError(f"index must be a sequence of episode numbers (integers), got "
                          f"{rows.tolist()!r}")
    rows = rows.astype(np.int64).reshape(-1)
    if rows.min() < 0 or rows.max() >= num_envs:
        raise ConfigError(f"index {rows.tolist()} names episodes outside 0..{num_envs - 1} "
                          f"(reset started {num_envs})")
    if np.unique(rows).size != rows.size:
        raise ConfigError(f"index {rows.tolist()} names an episode more than once")
    return rows


def per_episode(name: str, value: Any, n: int, error: type[Exception] = EnvError) -> np.ndarray:
    """``value`` (a scalar or a single value, for every episode, or one value per episode) as
    (n,) float32; ``error`` naming ``name`` and the sizes otherwise."""
    values = np.asarray(value, dtype=np.float32)
    if values.ndim == 0 or values.shape == (1,):
        return np.broadcast_to(values.reshape(1), (n,))
    if values.shape != (n,):
        raise error(f"{name} has shape {values.shape} for {episodes(n)}; give one value per "
                    f"episode (shape ({n},)) or a scalar")
    return values


def dict_rows(observation: Any, keys: Sequence[str], dims: Sequence[int], n: int) -> Any:
    """Dict observations of ``n`` episodes -> (n, sum(dims)) float32, the ``keys`` concatenated
    in order (dtlab.spaces.flatten_observation's layout): one mapping whose keys hold (n, dim_k)
    arrays ((dim_k,) for one episode, ``fit_batch``'s rule), or a sequence of n per-episode
    mappings. A non-object ndarray is taken as already flattened and returned as it is. EnvError
    naming the missing key, the key of the wrong shape, or the count of mappings."""
    if isinstance(observation, np.ndarray) and observation.dtype != object:
        return observation
    if not isinstance(observation, Mapping):  # a sequence of per-episode mappings
        if len(observation) != n:
            raise EnvError(f"act got {len(observation)} Dict observations for {episodes(n)}")
        return np.concatenate([_mapping_rows(o, keys, dims, 1) for o in observation])
    return _mapping_rows(observation, keys, dims, n)


def _mapping_rows(observation: Any, keys: Sequence[str], dims: Sequence[int], n: int
                  ) -> np.ndarray:
    """One mapping of ``n`` episodes' Dict observations -> (n, sum(dims)) float32."""
    if not isinstance(observation, Mapping):
        raise EnvError(f"expected a Dict observation with keys {list(keys)}, got "
                       f"{type(observation).__name__}")
    parts = []
    for key, dim in zip(keys, dims):
        if key not in observation:
            raise EnvError(f"Dict observation has no key {key!r} (it has {sorted(observation)})")
        value = np.asarray(observation[key], dtype=np.float32)
        parts.append(fit_batch(value, n, (dim,), f"Dict observation key {key!r}"))
    return np.concatenate(parts, axis=1)


def target_above(target: float, limit: float) -> bool:
    """Whether ``target`` exceeds ``limit`` as the model receives targets: both as float32 (its
    dtype), so that a limit asked for as printed (81.8, float32 81.80000305 > float64 81.8) is
    not above itself. Both runtimes warn with this comparison."""
    return bool(np.float32(target) > np.float32(limit))
