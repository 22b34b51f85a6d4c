"""D4RL's HDF5 layout (the ``*.hdf5`` files of D4RL, e.g. ``hopper-medium-v2.hdf5``).

Layout, from D4RL's dataset files and ``d4rl.offline_env.OfflineEnv.get_dataset``::

    observations       (N, obs_dim) float32
    actions            (N, act_dim) float32  or (N,) int64 for discrete actions (as D4RL's
                                             Atari-style files store action indices)
    rewards            (N,)         float32
    terminals          (N,)         bool     episode ended by the environment (-> terminations)
    timeouts           (N,)         bool     episode cut by the time limit    (-> truncations)
    next_observations  (N, obs_dim) float32  optional, ignored here
    infos/*                                  optional (qpos, qvel, action_log_probs), ignored
    metadata/*                               optional provenance (algorithm, policy/...)

Episodes end at ``terminals | timeouts``; rows after the last flag form a cut-off episode that is
kept and marked truncated (``EpisodeSet.from_flags``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dtlab.data.episodes import EpisodeSet
from dtlab.data.formats._hdf5 import (COMPRESSION, atomic_hdf5, open_hdf5, read_array,
                                      read_metadata, write_metadata)
from dtlab.errors import DatasetError

_LAYOUT = "D4RL layout needs observations, actions, rewards, terminals, timeouts"


def read_d4rl(path: str | Path) -> EpisodeSet:
    """Read a D4RL-layout HDF5 file (``timeouts`` may be absent: then no episode timed out)."""
    with open_hdf5(path) as f:
        return episodes_from_d4rl(f, path)


def episodes_from_d4rl(f: h5py.File, path: str | Path) -> EpisodeSet:
    """Build an EpisodeSet from an open D4RL-layout file (``path`` only names it in errors)."""
    observations = read_array(f, "observations", path, _LAYOUT)
    actions = read_array(f, "actions", path, _LAYOUT)
    rewards = read_array(f, "rewards", path, _LAYOUT)
    terminals = read_array(f, "terminals", path, _LAYOUT)
    n = observations.shape[0] if observations.ndim else 0
    if "timeouts" in f:
        timeouts = read_array(f, "timeouts", path, _LAYOUT)
    else:
        timeouts = np.zeros(n, dtype=bool)
    columns = {"actions": actions, "rewards": rewards, "terminals": terminals, "timeouts": timeouts}
    for key in ("rewards", "terminals", "timeouts"):
        # Some files store per-step scalars as (N, 1).
        arr = columns[key]
        if arr.ndim == 2 and arr.shape[1] == 1:
            columns[key] = arr = arr[:, 0]
        if arr.ndim != 1:
            raise DatasetError(f"{path}: '{key}' must have shape (N,) or (N, 1), got {arr.shape}")
    for key, arr in columns.items():
        if arr.ndim == 0 or arr.shape[0] != n:
            length = arr.shape[0] if arr.ndim else "no"
            raise DatasetError(f"{path}: '{key}' has {length} entries but 'observations' has {n}")
    metadata = read_metadata(f["metadata"]) if isinstance(f.get("metadata"), h5py.Group) else {}
    return EpisodeSet.from_flags(
        observations, columns["actions"], columns["rewards"], columns["terminals"],
        columns["timeouts"], source=str(path), metadata=metadata,
    )


def write_d4rl(episodes: EpisodeSet, path: str | Path, *, metadata: dict[str, Any] | None = None
               ) -> None:
    """Write ``episodes`` in D4RL's layout, atomically.

    ``metadata`` (default: ``episodes.metadata``) goes under ``metadata/``. ``next_observations``
    is not written: the next observation after an episode's last step is not in an EpisodeSet.
    """
    metadata = episodes.metadata if metadata is None else metadata
    with atomic_hdf5(path) as f:
        f.create_dataset("observations", data=episodes.observations.astype(np.float32),
                         compression=COMPRESSION)
        f.create_dataset("actions", data=episodes.actions,  # float32, or int64 if discrete
                         compression=COMPRESSION)
        f.create_dataset("rewards", data=episodes.rewards.astype(np.float32),
                         compression=COMPRESSION)
        f.create_dataset("terminals", data=episodes.terminations.astype(bool),
                         compression=COMPRESSION)
        f.create_dataset("timeouts", data=episodes.truncations.astype(bool),
                         compression=COMPRESSION)
        if metadata:
            write_metadata(f.create_group("metadata"), metadata)
