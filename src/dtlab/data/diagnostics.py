"""Valid but suspicious datasets: what loads without error but would train on wrong numbers.

``diagnose(episodes, time_limit=..., return_scale=...)`` returns one ``Finding`` per kind of
trap it sees, each with a one-line message; it raises nothing and changes nothing. Kinds:

- ``constant_observations``: observation dimensions whose std over the data is at most
  ``CONSTANT_STD`` (they carry no information, and dividing by their std blows up any other value
  the env shows there).
- ``no_episode_ends``: the whole dataset is one episode, longer than the env's time limit: the
  file most likely lacks its episode-end flags (e.g. a D4RL-style file without ``timeouts`` and
  without ``next_observations``), so episodes were concatenated.
- ``long_episodes``: episodes longer than the env's time limit (ends missing, or another env).
- ``returns_to_go_scale``: ``max |returns_to_go| / return_scale`` above ``RTG_SCALE_LIMIT``.
- ``huge_rewards``: rewards so large that float32 storage loses them or their neighbours.
- ``odd_actions``: actions that were converted into something they probably are not (integer-
  valued floats, e.g. from bool or integer (N, k) arrays, read as continuous vectors) or discrete
  action indices too large to be indices.

``time_limit(env_id)`` looks the time limit up; ``warn_findings(episodes, env_id=...,
return_scale=...)`` is what training calls: it warns each finding as a DtlabWarning.
Torch-free; gymnasium is imported only to look a time limit up.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from dtlab.data.episodes import EpisodeSet
from dtlab.data.returns import fitted_return_scale
from dtlab.envs import env_info, time_limit
from dtlab.errors import DtlabWarning
from dtlab.normalizer import STD_EPS
from dtlab.spaces import DiscreteActions, ImageObservations

# A dimension whose std (over all transitions, float64) is at most this counts as constant: the
# epsilon the original DT adds to the std before dividing; dtlab.normalizer gives such dimensions
# std 1 (the same threshold: it is defined there).
CONSTANT_STD = STD_EPS

# Largest |return-to-go / return_scale| that is not flagged. dtlab's return scales make this
# O(1-10) for the data it targets (D4RL MuJoCo returns up to ~12,000 over scale 1000; envs.py).
# At 1e4 the return token's input is three orders of magnitude above that; bf16 autocast (8
# significant bits) rounds values there in steps of 64 (2**13 <= 1e4 < 2**14, spacing
# 2**(13 - 7)), so targets closer than 64 scaled units become the same input; and float16's
# largest finite value, 65504, is less than 7x away. float32 itself is fine up to ~3.4e38.
RTG_SCALE_LIMIT = 1e4

# float32 (dtlab's storage type for rewards) holds every integer only up to 2**24 = 16,777,216
# (24-bit significand): a reward beyond it is itself rounded when stored.
HUGE_REWARD = float(2**24)

# Discrete action indices above this are not flagged as "too large to be indices"; Atari, the
# largest common discrete action set, has 18 actions. Above 10,000 the model's action embedding
# and logits tables (one row per index, DESIGN.md "Actions") dwarf the rest of a small model.
MAX_DISCRETE_ACTIONS = 10_000

# At most this many dimensions are listed in a message.
_SHOWN = 10


@dataclass(frozen=True)
class Finding:
    """One suspicious property of a dataset: ``kind`` (see the module docstring) and a one-line
    ``message`` saying what was seen and what it may mean."""

    kind: str
    message: str


def diagnose(episodes: EpisodeSet, *, time_limit: int | None,
             return_scale: float | None) -> list[Finding]:
    """Every finding for ``episodes``, in the order of the module docstring (empty: none).

    ``time_limit``: the env's episode time limit in steps (``time_limit(env_id)``); None skips the
    checks that need it. ``return_scale``: the divisor training applies to returns-to-go; None
    skips the ``returns_to_go_scale`` check.
    """
    checks = [_constant_observations(episodes), _episode_lengths(episodes, time_limit),
              _returns_to_go_scale(episodes, return_scale), _huge_rewards(episodes),
              _odd_actions(episodes)]
    return [f for f in checks if f is not None]


def warn_findings(episodes: EpisodeSet, *, env_id: str | None, return_scale: float | None,
                  skip: tuple[str, ...] = ()) -> list[Finding]:
    """``diagnose`` with the time limit of ``env_id`` (None: the dataset's own ``env_id``
    metadata, if any), each finding warned as one ``DtlabWarning`` line ``"<source>: <message>"``,
    except the kinds in ``skip`` (reported by their caller some other way). Returns the findings
    (all of them). For training: call it once on the loaded dataset, before any cutting
    (``truncate_episodes``), with the return scale training will use."""
    env_id = env_id or _metadata_env_id(episodes)
    findings = diagnose(episodes, time_limit=time_limit(env_id), return_scale=return_scale)
    for finding in findings:
        if finding.kind not in skip:
            warnings.warn(f"{episodes.source}: {finding.message}", DtlabWarning, stacklevel=2)
    return findings


def _metadata_env_id(episodes: EpisodeSet) -> str | None:
    return episodes.provenance.env_id


# ---- checks ---------------------------------------------------------------------------------------
def _constant_observations(episodes: EpisodeSet) -> Finding | None:
    if episodes.num_transitions < 2:
        return None  # one transition: every dimension is trivially constant
    if isinstance(episodes.observation_space, ImageObservations):
        return None  # frames are scaled by 255, not by their std; constant pixels are common
    std = episodes.observations.astype(np.float64).std(axis=0)  # (obs_dim,)
    dims = np.flatnonzero(std <= CONSTANT_STD)
    if dims.size == 0:
        return None
    shown = ", ".join(str(d) for d in dims[:_SHOWN]) + (", ..." if dims.size > _SHOWN else "")
    return Finding("constant_observations",
                   f"observation dimensions [{shown}] ({dims.size} of {episodes.obs_dim}) are "
                   f"constant over all {episodes.num_transitions} transitions (std <= "
                   f"{CONSTANT_STD:g}): they carry no information (training normalizes them with "
                   "std 1), and any other value the env shows there is outside the data")


def _episode_lengths(episodes: EpisodeSet, limit: int | None) -> Finding | None:
    if limit is None:
        return None
    lengths = episodes.episode_lengths
    if episodes.num_episodes == 1 and lengths[0] > limit:
        return Finding("no_episode_ends",
                       f"no episode ends before the last row: one episode of {int(lengths[0])} "
                       f"steps, longer than the env's time limit of {limit}; the file likely "
                       "lacks episode-end flags ('timeouts'), so episodes were joined")
    long = np.flatnonzero(lengths > limit)
    if long.size == 0:
        return None
    return Finding("long_episodes",
                   f"{long.size} of {episodes.num_episodes} episodes are longer than the env's "
                   f"time limit of {limit} steps (longest {int(lengths.max())}, episode "
                   f"{int(long[0])} first); episode ends are likely missing, or the data is "
                   "from another env")


def _returns_to_go_scale(episodes: EpisodeSet, return_scale: float | None) -> Finding | None:
    if return_scale is None:
        return None
    largest = float(np.abs(episodes.returns_to_go.astype(np.float64)).max())
    with np.errstate(over="ignore", divide="ignore"):
        scaled = largest / abs(float(return_scale)) if return_scale else np.inf
    if scaled <= RTG_SCALE_LIMIT:
        return None
    return Finding("returns_to_go_scale",
                   f"largest |return-to-go| / return scale is {scaled:.3g} ({largest:.3g} / "
                   f"{return_scale:g}), above {RTG_SCALE_LIMIT:g}: the return input is far outside "
                   "the range training expects (reduced precision rounds it coarsely); use a "
                   "larger --return-scale or check the rewards")


def _huge_rewards(episodes: EpisodeSet) -> Finding | None:
    magnitude = np.abs(episodes.rewards.astype(np.float64))  # (N,)
    largest = float(magnitude.max())
    if largest > HUGE_REWARD:
        count = int((magnitude > HUGE_REWARD).sum())
        return Finding("huge_rewards",
                       f"{count} rewards exceed 2**24 in magnitude (largest {largest:.3g}): "
                       "float32 storage rounds them, and they swamp the other rewards in the "
                       "returns-to-go")
    # Returns-to-go are float32: values near rtg[t] are np.spacing(rtg[t]) apart. A step whose
    # reward is typical (at least the median nonzero |reward|) but smaller than that spacing is
    # rounded away or distorted in its own return-to-go: other rewards in the episode are far
    # larger.
    nonzero = magnitude[magnitude > 0]
    if nonzero.size == 0:
        return None
    typical = float(np.median(nonzero))
    spacing = np.spacing(np.abs(episodes.returns_to_go)).astype(np.float64)  # (N,)
    lost = np.flatnonzero((magnitude >= typical) & (magnitude < spacing))
    if lost.size == 0:
        return None
    return Finding("huge_rewards",
                   f"rewards span too many orders of magnitude: at {lost.size} steps (first "
                   f"{int(lost[0])}) a typical reward (|r| >= the median {typical:.3g}) is smaller "
                   f"than the float32 spacing of its return-to-go ({float(spacing[lost[0]]):.3g} "
                   f"at {float(episodes.returns_to_go[lost[0]]):.3g}), so the returns-to-go "
                   "lose or distort it; a few rewards are far larger than the rest")


def _odd_actions(episodes: EpisodeSet) -> Finding | None:
    actions = episodes.actions
    if isinstance(episodes.action_space, DiscreteActions):
        top = int(actions.max())
        if top + 1 <= MAX_DISCRETE_ACTIONS:
            return None
        return Finding("odd_actions",
                       f"integer actions read as discrete indices go up to {top}, "
                       f"more than {MAX_DISCRETE_ACTIONS} actions: they are probably not indices "
                       "into a Discrete space (store continuous actions as floats)")
    if not (np.all(actions >= 0) and np.array_equal(actions, np.round(actions))):
        return None
    values = np.unique(actions)
    shown = ", ".join(f"{v:g}" for v in values[:_SHOWN]) + (", ..." if values.size > _SHOWN else "")
    return Finding("odd_actions",
                   f"continuous actions ({actions.shape[1]} per step) take only the non-negative "
                   f"integer values {{{shown}}}: converted from bool, integer (N, k) or "
                   "integer-valued float data, they were read as continuous vectors; if they are "
                   "discrete action indices, store them as integers of shape (N,)")


def return_scale_is_fitted(env_id: str | None) -> bool:
    """Whether training without --return-scale fits the return scale to the data: for an env
    with none registered (``EnvInfo.return_scale``), or no env."""
    return env_info(env_id or "").return_scale is None


def default_return_scale(env_id: str | None, episodes: EpisodeSet) -> tuple[float, bool]:
    """The return scale training uses without --return-scale, and whether it was fitted: the env
    registry's (``EnvInfo.return_scale``), else, for an env with none registered (or no env),
    ``fitted_return_scale`` of the data's returns-to-go."""
    if return_scale_is_fitted(env_id):
        return fitted_return_scale(episodes.returns_to_go), True
    return float(env_info(env_id or "").return_scale), False
