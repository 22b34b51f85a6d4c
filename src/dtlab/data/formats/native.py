"""dtlab's own HDF5 format: an EpisodeSet as stored in memory, plus its metadata.

Layout (version 1)::

    attrs  dtlab_format  int, 1
    attrs  metadata      JSON string (provenance): fixed-length UTF-8, variable-length if
                         over 60 kB (readers accept both)
    attrs  action_space  JSON string, optional: the EpisodeSet's dtlab.spaces action spec, e.g.
                         {"type": "discrete", "n": 4} (absent: decided from the arrays)
    attrs  observation_space  JSON string, optional: the dtlab.spaces observation spec, e.g.
                         {"type": "image", "shape": [84, 84], "stack": 4} (absent: vectors).
                         Readers before it ignore it (and refuse image frames: not 2-D).
    observations    (N, obs_dim) float32, or (N, H, W) uint8 frames, each stored once (chunks of
                    FRAME_CHUNK frames), for image observations
    actions         (N, act_dim) float32, or (N,) int64 action indices
    rewards         (N,)         float32
    terminations    (N,)         bool
    truncations     (N,)         bool
    episode_starts  (E,)         int64
    final_observations  (E, obs_dim) float32 (or (E, H, W) uint8)  optional: the observation after each episode's
                                              last step (EpisodeSet.final_observations); absent
                                              when unknown. Readers before it ignore it.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from dtlab.data.episodes import EpisodeSet
from dtlab.data.formats._hdf5 import (COMPRESSION, atomic_hdf5, fixed_string, json_default,
                                      open_hdf5, read_array, write_observations)
from dtlab.errors import ConfigError, DatasetError
from dtlab.spaces import VectorObservations, action_space_from_json, observation_space_from_json

FORMAT_VERSION = 1
FORMAT_ATTR = "dtlab_format"
_MAX_INLINE_ATTR = 60_000  # bytes; HDF5's limit for an attribute in the object header is 64 KiB
_LAYOUT = ("dtlab native layout needs observations, actions, rewards, terminations, truncations, "
           "episode_starts")


def read_native(path: str | Path) -> EpisodeSet:
    """Read a file written by :func:`write_native`."""
    with open_hdf5(path) as f:
        return episodes_from_native(f, path)


def episodes_from_native(f: h5py.File, path: str | Path) -> EpisodeSet:
    """Build an EpisodeSet from an open native file (``path`` only names it in errors)."""
    version = f.attrs.get(FORMAT_ATTR)
    if not isinstance(version, (int, np.integer)) or version < 1:
        raise DatasetError(f"{path}: invalid '{FORMAT_ATTR}' attribute {version!r}")
    if version > FORMAT_VERSION:
        raise DatasetError(f"{path}: written by a newer dtlab ({FORMAT_ATTR} {int(version)}, this "
                           f"version reads {FORMAT_VERSION}); upgrade dtlab to read it")
    raw = f.attrs.get("metadata", "{}")
    try:
        metadata = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except (ValueError, TypeError, AttributeError, RecursionError) as e:
        raise DatasetError(f"{path}: 'metadata' attribute is not valid JSON ({e})") from e
    if not isinstance(metadata, dict):
        raise DatasetError(f"{path}: 'metadata' attribute must be a JSON object")
    specs = {}
    for name, parse in (("action_space", action_space_from_json),
                        ("observation_space", observation_space_from_json)):
        specs[name] = None
        if name in f.attrs:
            raw = f.attrs[name]
            try:
                specs[name] = parse(json.loads(raw.decode() if isinstance(raw, bytes) else raw))
            except (ValueError, TypeError, AttributeError, RecursionError, ConfigError) as e:
                raise DatasetError(f"{path}: '{name}' attribute is invalid ({e})") from e
    arrays = {key: read_array(f, key, path, _LAYOUT)
              for key in ("observations", "actions", "rewards", "terminations", "truncations",
                          "episode_starts")}
    if "final_observations" in f:
        arrays["final_observations"] = read_array(f, "final_observations", path, _LAYOUT)
    return EpisodeSet(**arrays, source=str(path), metadata=metadata, **specs)


def write_native(episodes: EpisodeSet, path: str | Path) -> None:
    """Write ``episodes`` (with its metadata) in dtlab's format, atomically."""
    # Inside the HDF5 file, written as json.dumps does (NaN/Infinity round-trip exactly).
    metadata = json.dumps(episodes.metadata, default=json_default)  # fails before any file exists
    with atomic_hdf5(path) as f:
        f.attrs[FORMAT_ATTR] = FORMAT_VERSION
        # Inline (fixed_string) unless too big for an object header (64 KiB), then in the heap.
        big = len(metadata.encode()) > _MAX_INLINE_ATTR
        f.attrs["metadata"] = metadata if big else fixed_string(metadata)
        f.attrs["action_space"] = fixed_string(json.dumps(episodes.action_space.to_json()))
        if not isinstance(episodes.observation_space, VectorObservations):
            f.attrs["observation_space"] = fixed_string(
                json.dumps(episodes.observation_space.to_json()))
        write_observations(f, "observations", episodes.observations)
        for key, arr, dtype in (("actions", episodes.actions, episodes.actions.dtype),
                                ("rewards", episodes.rewards, np.float32),
                                ("terminations", episodes.terminations, bool),
                                ("truncations", episodes.truncations, bool),
                                ("episode_starts", episodes.episode_starts, np.int64)):
            f.create_dataset(key, data=arr.astype(dtype), compression=COMPRESSION)
        if episodes.final_observations is not None:
            write_observations(f, "final_observations", episodes.final_observations)
