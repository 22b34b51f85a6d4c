"""The checks behind ``EpisodeSet``'s construction (dtlab.data.episodes), by what each checks:
observations, actions, shapes and lengths, finite values, the action and observation spaces,
episode starts, final observations, episode-end flags and returns-to-go.

``EpisodeSet.__post_init__`` calls them in this order, so that the first fault found is the one
reported; each raises DatasetError prefixed with the data's ``source``. They never write into the
arrays they are given, and leave storing the results on the EpisodeSet to it.
"""

from __future__ import annotations

import numpy as np

from dtlab.data.returns import returns_to_go
from dtlab.errors import DatasetError
from dtlab.spaces import (ActionSpec, ContinuousActions, DictObservations, DiscreteActions,
                          ImageObservations, ObservationSpec, VectorObservations)


def check_observations(observations, obs_spec: ObservationSpec | None,
                       source: str) -> np.ndarray:
    """``observations`` as stored: image frames as given (never converted or copied), anything
    else as float32, a 1-D array as one column. DatasetError when ``obs_spec`` is no dtlab
    observation spec, when frames do not match an ``ImageObservations`` spec (uint8, (N, H, W)),
    or when uint8 frames come without one (their stack depth is not in the arrays)."""
    image = isinstance(obs_spec, ImageObservations)
    if obs_spec is not None and not isinstance(obs_spec, (VectorObservations, ImageObservations,
                                                          DictObservations)):
        raise DatasetError(f"{source}: observation_space must be a dtlab.spaces observation "
                           f"spec, got {obs_spec!r}")
    obs = np.asarray(observations)
    if image:  # frames are stored once, as given: never converted or copied
        if obs.dtype != np.uint8 or obs.ndim != 3 or obs.shape[1:] != obs_spec.shape:
            raise DatasetError(f"{source}: 'observations' must be uint8 frames (N, "
                               f"{obs_spec.shape[0]}, {obs_spec.shape[1]}) for {obs_spec}, got "
                               f"{obs.dtype} of shape {obs.shape}")
    elif obs.ndim == 3 and obs_spec is None and obs.dtype == np.uint8:
        raise DatasetError(f"{source}: 'observations' must be 2-D vectors; uint8 frames of shape "
                           f"{obs.shape} need observation_space=ImageObservations((H, W), stack) "
                           "(the stack depth is not in the arrays)")
    else:
        obs = np.asarray(obs, dtype=np.float32)
    if obs.ndim == 1:
        obs = obs[:, None]
    return obs


def check_actions(actions, spec: ActionSpec | None, source: str) -> tuple[np.ndarray, bool]:
    """``actions`` as stored, and whether they are discrete. Integer actions of shape (N,) or
    (N, 1) are indices into a Discrete space: kept as (N,) int64. Anything else is a continuous
    action vector: (N, act_dim) float32 (a 1-D array as one column). A given action space decides
    instead. DatasetError when ``spec`` is neither ContinuousActions nor DiscreteActions, or
    when the actions for a DiscreteActions space are not integers."""
    act = np.asarray(actions)
    if spec is not None and not isinstance(spec, (ContinuousActions, DiscreteActions)):
        raise DatasetError(f"{source}: action_space must be ContinuousActions or "
                           f"DiscreteActions, got {spec!r}")
    index_shaped = act.ndim == 1 or (act.ndim == 2 and act.shape[1] == 1)
    discrete = isinstance(spec, DiscreteActions) or (
        spec is None and act.dtype.kind in "iu" and index_shaped)
    if discrete and act.dtype.kind not in "iu":
        raise DatasetError(f"{source}: 'actions' must be integers for {spec}, got {act.dtype}")
    if discrete and act.ndim == 2 and act.shape[1] == 1:
        act = act[:, 0]
    act = act.astype(np.int64) if discrete else act.astype(np.float32)
    if act.ndim == 1 and not discrete:
        act = act[:, None]
    return act, discrete


def check_shapes(obs: np.ndarray, act: np.ndarray, rew: np.ndarray, term: np.ndarray,
                  trunc: np.ndarray, *, image: bool, discrete: bool, source: str) -> int:
    """The number of transitions N. DatasetError, in this order: observations not 2-D (frames
    are checked in ``check_observations``) or actions not 2-D (continuous) / 1-D (discrete); an
    observation or continuous action of width 0; no transitions; actions, rewards, terminations
    or truncations with other than N entries."""
    if (obs.ndim != 2 and not image) or act.ndim != (1 if discrete else 2):
        raise DatasetError(f"{source}: observations must be 2-D and actions 2-D (continuous) or "
                           f"1-D (integer, discrete), got shapes {obs.shape} and {act.shape} "
                           f"({act.dtype})")
    n = obs.shape[0]
    if n > 0 and (obs.shape[1] == 0 or (not discrete and act.shape[1] == 0)):
        raise DatasetError(f"{source}: observations and actions need at least one dimension, "
                           f"got shapes {obs.shape} and {act.shape}")
    if n == 0:
        raise DatasetError(f"{source}: dataset is empty (0 transitions)")
    for name, arr in (("actions", act), ("rewards", rew), ("terminations", term),
                      ("truncations", trunc)):
        if arr.shape[0] != n:
            raise DatasetError(f"{source}: '{name}' has {arr.shape[0]} entries but "
                               f"'observations' has {n}")
    return n


def check_finite(obs: np.ndarray, act: np.ndarray, rew: np.ndarray, *, image: bool,
                  source: str) -> None:
    """DatasetError naming the first array (observations unless frames, then actions, then
    rewards) that holds NaN or inf, and the first transition where it does."""
    for name, arr in ((("observations", obs),) if not image else ()) + (
            ("actions", act), ("rewards", rew)):
        bad = ~np.isfinite(arr)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise DatasetError(f"{source}: '{name}' contains NaN or inf (first at transition "
                               f"{row})")


def check_action_space(act: np.ndarray, spec: ActionSpec | None, *, discrete: bool,
                  source: str) -> ActionSpec:
    """``spec``, or when None the one the actions imply: ``DiscreteActions(largest index + 1)``
    or ``ContinuousActions(act_dim)``. DatasetError for a negative discrete action, a discrete
    action outside a given ``DiscreteActions``, or continuous actions of another width than a
    given ``ContinuousActions``."""
    if discrete and (act < 0).any():
        raise DatasetError(f"{source}: discrete 'actions' must be >= 0 (first negative at "
                           f"transition {int(np.argmax(act < 0))}: "
                           f"{int(act[np.argmax(act < 0)])})")
    if spec is None:
        return DiscreteActions(int(act.max()) + 1) if discrete else ContinuousActions(act.shape[1])
    if discrete and act.max() >= spec.n:
        row = int(np.argmax(act >= spec.n))
        raise DatasetError(f"{source}: 'actions' hold index {int(act[row])} at transition {row}, "
                           f"outside the action space Discrete({spec.n})")
    if not discrete and act.shape[1] != spec.dim:
        raise DatasetError(f"{source}: 'actions' have width {act.shape[1]} but the action space "
                           f"has {spec.dim}")
    return spec


def check_observation_space(obs: np.ndarray, obs_spec: ObservationSpec | None, *, image: bool,
                       source: str) -> ObservationSpec:
    """``obs_spec``, or when None ``VectorObservations(obs_dim)``. DatasetError when vector or
    Dict observations are of another width than the given spec."""
    if obs_spec is None:
        return VectorObservations(obs.shape[1])
    if not image and obs_spec.dim != obs.shape[1]:
        raise DatasetError(f"{source}: 'observations' have width {obs.shape[1]} but the "
                           f"observation space is {obs_spec!r}")
    return obs_spec


def check_episode_starts(starts: np.ndarray, n: int, source: str) -> None:
    """DatasetError unless ``starts`` begins with 0, strictly increases and stays below ``n``
    (every episode at least one step)."""
    if starts.size == 0 or starts[0] != 0:
        raise DatasetError(f"{source}: episode_starts must begin with 0")
    if np.any(starts[1:] <= starts[:-1]) or starts[-1] >= n:  # (np.diff could overflow)
        raise DatasetError(f"{source}: episode_starts must be strictly increasing and inside "
                           "the data (zero-length episode?)")


def check_final_observations(finals, obs: np.ndarray, starts: np.ndarray, *, image: bool,
                        source: str) -> np.ndarray | None:
    """None when ``finals`` is None, else a read-only copy (the caller's array stays writable):
    uint8 frames or float32 vectors, a 1-D array as one column when observations have one.
    DatasetError unless there is one per episode, shaped like an observation, or when vector
    ones hold NaN or inf."""
    if finals is None:
        return None
    # A copy: the caller's array stays writable.
    finals = np.array(finals, dtype=np.uint8 if image else np.float32)
    if finals.ndim == 1 and obs.shape[1] == 1:
        finals = finals[:, None]
    if finals.shape != (starts.shape[0], *obs.shape[1:]):
        raise DatasetError(f"{source}: 'final_observations' has shape {finals.shape}, expected "
                           f"{(starts.shape[0], *obs.shape[1:])} (one per episode)")
    if not image and not np.isfinite(finals).all():
        row = int(np.argwhere(~np.isfinite(finals))[0][0])
        raise DatasetError(f"{source}: 'final_observations' contains NaN or inf (first at "
                           f"episode {row})")
    finals.setflags(write=False)
    return finals


def check_episode_end_flags(term: np.ndarray, trunc: np.ndarray, starts: np.ndarray, n: int,
                       source: str) -> np.ndarray:
    """The truncations with terminations winning where both are set (as d3rlpy does).
    DatasetError when either flag is set before an episode's last step."""
    trunc = trunc & ~term
    ends = np.append(starts[1:], n) - 1
    inside = np.ones(n, dtype=bool)
    inside[ends] = False
    if (term & inside).any() or (trunc & inside).any():
        row = int(np.argwhere((term | trunc) & inside)[0][0])
        raise DatasetError(f"{source}: episode flag set in the middle of an episode (transition "
                           f"{row})")
    return trunc


def checked_returns_to_go(rew: np.ndarray, starts: np.ndarray, source: str) -> np.ndarray:
    """Undiscounted returns-to-go (N,) float32, read-only. DatasetError when an episode's
    rewards sum beyond float32's range."""
    with np.errstate(over="ignore"):
        rtg = returns_to_go(rew, starts)
    if not np.isfinite(rtg).all():
        row = int(np.argwhere(~np.isfinite(rtg))[0][0])
        raise DatasetError(f"{source}: returns-to-go overflow float32 (an episode's rewards sum "
                           f"beyond 3.4e38; first at transition {row})")
    rtg.setflags(write=False)
    return rtg
