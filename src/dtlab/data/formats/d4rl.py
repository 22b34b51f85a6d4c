"""D4RL's HDF5 layout (the ``*.hdf5`` files of D4RL, e.g. ``hopper-medium-v2.hdf5``).

Layout, from D4RL's dataset files and ``d4rl.offline_env.OfflineEnv.get_dataset``::

    observations       (N, obs_dim) float32, or (N, H, W) uint8 frames (dtlab: each frame stored
                                             once, chunked; the stack depth in the metadata)
    actions            (N, act_dim) float32  or (N,) int64 for discrete actions (as D4RL's
                                             Atari-style files store action indices)
    rewards            (N,)         float32
    terminals          (N,)         bool     episode ended by the environment (-> terminations)
    timeouts           (N,)         bool     episode cut by the time limit    (-> truncations)
    next_observations  (N, obs_dim) float32  optional: the observation after step i; equal to
                                             observations[i + 1] inside an episode
    infos/*                                  optional (qpos, qvel, action_log_probs), ignored
    metadata/*                               optional provenance (algorithm, policy/...); root
                                             attributes count too (metadata/ wins)
    metadata/dtlab_observation_space         dtlab: JSON of a non-vector observation spec
                                             (dtlab.spaces: image frames, Dict keys)

Episodes end at ``terminals | timeouts``; rows after the last flag form a cut-off episode that is
kept and marked truncated (``EpisodeSet.from_flags``).

``next_observations`` shows episode ends the flags may miss: many exporters write no
``timeouts`` (and ``terminals`` all False for a time-limited env), but where
``next_observations[i] != observations[i + 1]`` row i + 1 starts another episode (an env reset).
The reader splits there, marked truncated, and warns (DtlabWarning) with the count. Its rows at
episode ends become ``EpisodeSet.final_observations``. When the column contradicts the flags, the
flags win and a one-line warning says what was assumed (``_ends_from_next_observations``).

Image frames have no ``next_observations`` (it would double the file); their final observations
are kept by dtlab's native format only. A file of (N, H, W) uint8 frames without
``metadata/dtlab_observation_space`` is read as stacks of 4 (the DT Atari setting), with a
warning. Frames stored as stacks, (N, S, H, W) or (N, H, W, S) uint8, are unstacked to each
step's newest frame once consecutive stacks are checked to overlap (``unstack_frames``); (N, 1, H,
W) is squeezed, then read as stacks of 4.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dtlab.data.episodes import EpisodeSet
from dtlab.data.formats._hdf5 import (COMPRESSION, atomic_hdf5, open_hdf5, read_array,
                                      read_attributes, read_metadata, write_metadata,
                                      write_observations)
from dtlab.errors import ConfigError, DatasetError, DtlabWarning
from dtlab.spaces import ImageObservations, VectorObservations, observation_space_from_json

# Metadata key holding a non-vector observation spec (JSON of dtlab.spaces ``to_json``).
SPEC_KEY = "dtlab_observation_space"

_LAYOUT = ("D4RL layout needs observations, actions, rewards, terminals (timeouts and "
           "next_observations are optional)")


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
    for key, value in read_attributes(f).items():  # root attributes other tools write
        metadata.setdefault(key, value)
    raw_spec = metadata.pop(SPEC_KEY, None)
    stack = None
    if raw_spec is None and observations.ndim == 4 and observations.dtype == np.uint8:
        observations, stack = unstack_frames(
            observations, columns["terminals"].astype(bool) | columns["timeouts"].astype(bool), path)
    observation_space = _observation_space(raw_spec, observations, path, stack)
    timeouts, finals = columns["timeouts"], None
    if "next_observations" in f and n > 0 and observations.ndim in (1, 2):
        next_observations = read_array(f, "next_observations", path, _LAYOUT)
        timeouts, finals = _ends_from_next_observations(
            observations, next_observations, columns["terminals"], timeouts, path,
            has_timeouts="timeouts" in f)
    return EpisodeSet.from_flags(
        observations, columns["actions"], columns["rewards"], columns["terminals"],
        timeouts, source=str(path), metadata=metadata, final_observations=finals,
        observation_space=observation_space,
    )


def unstack_frames(observations: np.ndarray, ends: np.ndarray,
                   path: str | Path) -> tuple[np.ndarray, int | None]:
    """Frames stored as stacks, (N, S, H, W) (channels first) or (N, H, W, S) (channels last,
    when S < H), as (N, H, W): each step's newest frame, and the stack depth S (None for S = 1,
    then unknown).

    A frame stack holds the newest S frames, oldest first, so consecutive steps of an episode
    overlap: ``stack[t][1:] == stack[t - 1][:-1]``. That is checked for every step after an
    episode's first (episodes end where ``ends`` (N,) bool is set), in chunks of 4096 steps;
    where it fails, DatasetError names the layout read, the step and the layout dtlab stores:
    (N, H, W) uint8, one frame per step. The older frames of an episode's first stack (a reset's
    padding) are dropped: samplers rebuild the stacks by index.
    """
    n = observations.shape[0]
    last = observations.shape[3] < observations.shape[1]  # (N, H, W, S): stacks on the last axis
    layout = "(N, H, W, S)" if last else "(N, S, H, W)"
    depth = observations.shape[3] if last else observations.shape[1]
    frames = observations[..., -1] if last else observations[:, -1]  # (N, H, W) newest frames
    if depth > 1:
        first = np.zeros(n, dtype=bool)  # (N,) steps that start an episode
        first[0] = True
        first[1:] = ends[:-1]
        for lo in range(1, n, 4096):
            hi = min(n, lo + 4096)
            cur, prev = observations[lo:hi], observations[lo - 1:hi - 1]
            if last:  # (c, H, W, S): newer frames at higher S
                same = (cur[..., :-1] == prev[..., 1:]).reshape(hi - lo, -1).all(1)
            else:
                same = (cur[:, :-1] == prev[:, 1:]).reshape(hi - lo, -1).all(1)
            bad = np.flatnonzero(~same & ~first[lo:hi])
            if bad.size:
                t = lo + int(bad[0])
                raise DatasetError(
                    f"{path}: 'observations' {observations.shape} uint8 read as frame stacks "
                    f"{layout} (oldest first), but step {t}'s stack does not continue step "
                    f"{t - 1}'s (stack[t][1:] != stack[t-1][:-1] inside an episode, or an episode "
                    "starts there without terminals/timeouts ending the one before); store one "
                    "frame per step, (N, H, W) uint8, as dtlab does")
    return np.ascontiguousarray(frames), (int(depth) if depth > 1 else None)


def _observation_space(raw, observations: np.ndarray, path, stack: int | None = None):
    """The spec recorded under ``metadata/dtlab_observation_space`` (JSON), or None (vectors);
    uint8 frames (N, H, W) without one are stacks of ``stack`` (the depth of the stacks they were
    unstacked from), else assumed stacks of 4, with a warning."""
    if raw is None:
        if observations.ndim == 3 and observations.dtype == np.uint8:
            try:
                spec = ImageObservations(observations.shape[1:], stack or 4)
            except ConfigError as e:
                raise DatasetError(f"{path}: 'observations' must be 2-D vectors or uint8 frames; "
                                   f"got shape {observations.shape}: {e}") from None
            if stack is not None:
                return spec
            warnings.warn(f"{path}: uint8 frames {observations.shape[1:]} without "
                          f"'metadata/{SPEC_KEY}': read as stacks of 4 frames (the DT Atari "
                          "setting)", DtlabWarning, stacklevel=4)
            return spec
        return None
    try:
        return observation_space_from_json(json.loads(raw) if isinstance(raw, str) else raw,
                                           field=f"metadata/{SPEC_KEY}")
    except (ValueError, ConfigError) as e:
        raise DatasetError(f"{path}: {e}") from None


_NO_TIMEOUTS = " (the file has no 'timeouts')"  # said where a split could have used them


def _as_float32_rows(observations: np.ndarray, next_observations: np.ndarray,
                     path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Both columns as (N, obs_dim) float32; DatasetError when their shapes differ or
    ``next_observations`` holds NaN or inf."""
    obs = observations[:, None] if observations.ndim == 1 else observations  # (N, obs_dim)
    nxt = next_observations[:, None] if next_observations.ndim == 1 else next_observations
    if nxt.shape != obs.shape:
        raise DatasetError(f"{path}: 'next_observations' has shape {next_observations.shape} but "
                           f"'observations' has {observations.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        obs, nxt = obs.astype(np.float32), nxt.astype(np.float32)
    bad = ~np.isfinite(nxt)
    if bad.any():
        raise DatasetError(f"{path}: 'next_observations' contains NaN or inf (first at transition "
                           f"{int(np.argwhere(bad)[0][0])})")
    return obs, nxt


def _ends_from_next_observations(observations: np.ndarray, next_observations: np.ndarray,
                                 terminals: np.ndarray, timeouts: np.ndarray, path: str | Path, *,
                                 has_timeouts: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Episode ends that ``next_observations`` shows, and the final observations it gives.

    Compares ``next_observations[i]`` with ``observations[i + 1]`` in float32 (dtlab's storage
    type, so a float64 column that equals the next row after rounding counts as equal). Returns
    ``(timeouts, final_observations)``: ``timeouts`` (N,) bool with a truncation added at every
    row where the two differ and no flag is set (warned, with the count), and the (E, obs_dim)
    rows of ``next_observations`` at the episode ends, or None when they cannot be trusted.
    Decisions when the column and the flags disagree (each a one-line DtlabWarning):

    - unflagged differences at more than half of the unflagged rows: the column is not the next
      observation (another quantity, normalized differently, zeros); it is ignored. (Real
      episodes this short, under 2 steps on average with no flag at all, are implausible.)
    - a flagged end where the column equals the next row: the flag is kept (the file says the
      episode ends; e.g. a long trajectory cut into chunks, as D4RL's maze2d files mark reached
      goals, or a column shifted across episode boundaries), and no final observations are taken
      from the column, since at that end it may hold the next episode's first observation.
    - the column equals the row's own observation at every episode end: a copy standing in for
      an unknown final observation (d4rl.qlearning_dataset does this); no final observations.
    """
    obs, nxt = _as_float32_rows(observations, next_observations, path)
    flagged = (terminals.astype(bool) | timeouts.astype(bool))[:-1]  # (N-1,) ends by flag
    continues = np.all(nxt[:-1] == obs[1:], axis=1)  # (N-1,) row i+1 follows row i
    unflagged_breaks = np.flatnonzero(~continues & ~flagged)
    if unflagged_breaks.size and unflagged_breaks.size > (~flagged).sum() / 2:
        warnings.warn(
            f"{path}: 'next_observations' differs from the next row's 'observations' at "
            f"{unflagged_breaks.size} of {int((~flagged).sum())} rows without an episode flag: "
            "it is not the next observation, so it is ignored (episodes end at 'terminals' and "
            "'timeouts' only; final observations unknown)", DtlabWarning, stacklevel=4)
        return timeouts, None
    if unflagged_breaks.size:
        timeouts = timeouts.astype(bool).copy()
        timeouts[unflagged_breaks] = True
        episodes = int(flagged.sum()) + unflagged_breaks.size + 1
        warnings.warn(
            f"{path}: split into {episodes} episodes, {unflagged_breaks.size} more than the "
            f"flags give: 'next_observations' differs from the next row's 'observations' at "
            f"{unflagged_breaks.size} rows where neither 'terminals' nor 'timeouts' is set"
            f"{'' if has_timeouts else _NO_TIMEOUTS} (first at row {int(unflagged_breaks[0])}); "
            "those episodes are marked truncated", DtlabWarning, stacklevel=4)
    flagged_continuing = np.flatnonzero(continues & flagged)
    if flagged_continuing.size:
        warnings.warn(
            f"{path}: {flagged_continuing.size} episode ends set by 'terminals'/'timeouts' have "
            "'next_observations' equal to the next row's 'observations' (first at row "
            f"{int(flagged_continuing[0])}); the ends are kept, and no final observations are "
            "taken from 'next_observations'", DtlabWarning, stacklevel=4)
        return timeouts, None
    ends = np.append(np.flatnonzero(terminals.astype(bool)[:-1] | timeouts.astype(bool)[:-1]),
                     len(obs) - 1)  # (E,) as EpisodeSet.from_flags splits
    if np.array_equal(nxt[ends], obs[ends]):
        warnings.warn(
            f"{path}: 'next_observations' repeats the observation at every episode end (as "
            "exporters do that do not know the final observation); final observations unknown",
            DtlabWarning, stacklevel=4)
        return timeouts, None
    return timeouts, nxt[ends]


def write_d4rl(episodes: EpisodeSet, path: str | Path, *, metadata: dict[str, Any] | None = None
               ) -> None:
    """Write ``episodes`` in D4RL's layout, atomically.

    ``metadata`` (default: ``episodes.metadata``) goes under ``metadata/``, with the observation
    spec of image and Dict observations (``metadata/dtlab_observation_space``). Image frames stay
    uint8, chunked. ``next_observations`` (N, obs_dim) float32 is written for vector observations
    when ``episodes.final_observations`` is known: row i is
    ``observations[i + 1]`` inside an episode and the episode's final observation at its last
    step (as in D4RL's v2 files); otherwise it is left out.
    """
    metadata = dict(episodes.metadata if metadata is None else metadata)
    if not isinstance(episodes.observation_space, VectorObservations):
        metadata[SPEC_KEY] = json.dumps(episodes.observation_space.to_json())
    image = isinstance(episodes.observation_space, ImageObservations)
    with atomic_hdf5(path) as f:
        write_observations(f, "observations", episodes.observations)
        f.create_dataset("actions", data=episodes.actions,  # float32, or int64 if discrete
                         compression=COMPRESSION)
        f.create_dataset("rewards", data=episodes.rewards.astype(np.float32),
                         compression=COMPRESSION)
        f.create_dataset("terminals", data=episodes.terminations.astype(bool),
                         compression=COMPRESSION)
        f.create_dataset("timeouts", data=episodes.truncations.astype(bool),
                         compression=COMPRESSION)
        if episodes.final_observations is not None and not image:
            f.create_dataset("next_observations", data=next_observations(episodes),
                             compression=COMPRESSION)
        if metadata:
            write_metadata(f.create_group("metadata"), metadata)


def next_observations(episodes: EpisodeSet) -> np.ndarray:
    """(N, obs_dim) float32: the observation after each step, D4RL's ``next_observations``:
    ``observations[i + 1]`` inside an episode, ``final_observations[e]`` at episode e's last step.
    Needs ``episodes.final_observations`` (ValueError if it is None)."""
    if episodes.final_observations is None:
        raise ValueError("next_observations needs episodes.final_observations")
    obs = episodes.observations
    out = np.empty_like(obs)  # (N, obs_dim)
    out[:-1] = obs[1:]
    ends = np.append(episodes.episode_starts[1:], episodes.num_transitions) - 1  # (E,)
    out[ends] = episodes.final_observations
    return out
