"""EpisodeSet: all episodes of a dataset as flat arrays plus episode offsets.

An episode of T steps holds T observations (the D4RL view): observation t is the state in which
action t was taken and reward t received. Formats that store T+1 observations (Minari) convert at
their boundary; the (T+1)-th, the observation after an episode's last step, is kept apart in
``final_observations`` when the source has it (D4RL's ``next_observations`` at an episode's end).
"""

from __future__ import annotations

import hashlib

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from dtlab.data.episode_checks import (check_action_space, check_actions,
                                      check_episode_end_flags, check_episode_starts, check_finite,
                                      check_final_observations, check_observation_space,
                                      check_observations, check_shapes, checked_returns_to_go)
from dtlab.data.records import Provenance, ReturnStats
from dtlab.errors import ConfigError, DatasetError
from dtlab.spaces import (ActionSpec, ContinuousActions, DictObservations, DiscreteActions,
                          ImageObservations, ObservationSpec)


@dataclass(frozen=True, eq=False)
class EpisodeSet:
    """Flat, validated, read-only arrays over all episodes (N transitions, E episodes).

    ``action_space`` and ``observation_space`` are decided here, once: given by the file format
    (e.g. a Minari dataset's ``Discrete(n)``), or else from the arrays: integer actions of shape
    (N,) or (N, 1) are indices into ``DiscreteActions(largest index + 1)``, anything else is a
    ``ContinuousActions(act_dim)`` vector without known bounds. Observations are
    ``VectorObservations(obs_dim)`` unless the format gives another spec: ``ImageObservations``
    (each frame stored once, (N, H, W) uint8; samplers stack them by index, never copying them
    per window) or ``DictObservations`` (chosen keys flattened; ``select_observation_keys``).
    ``metadata`` is an immutable
    mapping (a private copy of what was passed); ``with_metadata`` returns an updated copy.
    Invalid data raises DatasetError naming ``source``.
    """

    observations: np.ndarray  # (N, obs_dim) float32, or (N, H, W) uint8 frames (ImageObservations)
    actions: np.ndarray  # (N, act_dim) float32, or (N,) int64 indices for DiscreteActions
    rewards: np.ndarray  # (N,) float32
    terminations: np.ndarray  # (N,) bool, True only at the last step of a terminated episode
    truncations: np.ndarray  # (N,) bool, True only at the last step of a truncated episode
    episode_starts: np.ndarray  # (E,) int64, index of each episode's first step, starts[0] == 0
    returns_to_go: np.ndarray = field(init=False)  # (N,) float32, undiscounted, computed once
    source: str = "<memory>"  # file the data came from (for error messages)
    metadata: Mapping[str, Any] = field(default_factory=dict)  # provenance, written with the data
    # (E, obs_dim) float32: the observation after each episode's last step (Minari's T+1-th, D4RL's
    # next_observations at the episode's end); None when the source did not record it.
    final_observations: np.ndarray | None = field(default=None, kw_only=True)
    # None: decided from the arrays (see above).
    action_space: ActionSpec | None = field(default=None, kw_only=True)
    observation_space: ObservationSpec | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        """Validate and normalise the arrays (dtlab.data.episode_checks, in this order:
        observations, actions, shapes and lengths, finite values, action and observation spaces,
        episode starts, final observations, episode-end flags, returns-to-go), then store them
        read-only. DatasetError naming ``source`` for the first fault found."""
        source = self.source
        obs_spec = self.observation_space
        image = isinstance(obs_spec, ImageObservations)
        obs = check_observations(self.observations, obs_spec, source)
        act, discrete = check_actions(self.actions, self.action_space, source)
        rew = np.asarray(self.rewards, dtype=np.float32).reshape(-1)
        term = np.asarray(self.terminations).astype(bool).reshape(-1)
        trunc = np.asarray(self.truncations).astype(bool).reshape(-1)
        starts = np.asarray(self.episode_starts, dtype=np.int64).reshape(-1)
        n = check_shapes(obs, act, rew, term, trunc, image=image, discrete=discrete,
                          source=source)
        check_finite(obs, act, rew, image=image, source=source)
        spec = check_action_space(act, self.action_space, discrete=discrete, source=source)
        obs_spec = check_observation_space(obs, obs_spec, image=image, source=source)
        check_episode_starts(starts, n, source)
        finals = check_final_observations(self.final_observations, obs, starts, image=image,
                                     source=source)
        if finals is not None:
            object.__setattr__(self, "final_observations", finals)
        trunc = check_episode_end_flags(term, trunc, starts, n, source)
        for name, value in (("observations", obs), ("actions", act), ("rewards", rew),
                            ("terminations", term), ("truncations", trunc),
                            ("episode_starts", starts)):
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        rtg = checked_returns_to_go(rew, starts, source)
        object.__setattr__(self, "returns_to_go", rtg)
        object.__setattr__(self, "action_space", spec)
        object.__setattr__(self, "observation_space", obs_spec)
        object.__setattr__(self, "metadata", MappingProxyType(copy.deepcopy(dict(self.metadata))))

    def __getstate__(self) -> dict[str, Any]:  # pickling: a mappingproxy cannot be pickled
        return {**self.__dict__, "metadata": dict(self.metadata)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "metadata", MappingProxyType(state["metadata"]))

    def with_metadata(self, updates: Mapping[str, Any]) -> "EpisodeSet":
        """A copy whose metadata is this one's updated with ``updates`` (the read-only arrays are
        shared, not copied)."""
        new = copy.copy(self)
        object.__setattr__(new, "metadata",
                           MappingProxyType({**self.metadata, **copy.deepcopy(dict(updates))}))
        return new

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_flags(cls, observations, actions, rewards, terminations, truncations, *,
                   source: str = "<memory>", metadata: Mapping[str, Any] | None = None,
                   final_observations: np.ndarray | None = None,
                   action_space: ActionSpec | None = None,
                   observation_space: ObservationSpec | None = None) -> "EpisodeSet":
        """Split flat arrays into episodes at ``terminations | truncations`` (the D4RL convention).

        A final episode that ends without a flag (cut off by the file's end) is kept and marked
        truncated. ``final_observations`` (E, obs_dim), if given, has one row per resulting episode.
        """
        term = np.asarray(terminations).astype(bool).reshape(-1)
        trunc = np.asarray(truncations).astype(bool).reshape(-1)
        n = term.shape[0]
        if n == 0:
            raise DatasetError(f"{source}: dataset is empty (0 transitions)")
        trunc = trunc & ~term
        ends = np.flatnonzero(term | trunc)
        if ends.size == 0 or ends[-1] != n - 1:
            trunc = trunc.copy()
            trunc[n - 1] = True
            ends = np.append(ends, n - 1)
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        return cls(observations, actions, rewards, term, trunc, starts, source=source,
                   metadata=metadata or {}, final_observations=final_observations,
                   action_space=action_space, observation_space=observation_space)

    @classmethod
    def concatenate(cls, parts: list["EpisodeSet"], *, source: str = "<memory>",
                    metadata: Mapping[str, Any] | None = None) -> "EpisodeSet":
        """Concatenate episode sets (e.g. medium + expert). ``final_observations`` are kept when
        every part has them, else None. The action space: the parts' when they agree; discrete
        parts with different n: the largest n; else decided from the arrays."""
        offsets = np.cumsum([0] + [p.num_transitions for p in parts[:-1]])
        finals = [p.final_observations for p in parts]
        spaces = {p.action_space for p in parts}
        action_space = next(iter(spaces)) if len(spaces) == 1 else None
        obs_spaces = {p.observation_space for p in parts}  # the parts': when they agree
        if len(spaces) > 1 and all(isinstance(s, DiscreteActions) for s in spaces):
            action_space = DiscreteActions(max(s.n for s in spaces))
        return cls(
            np.concatenate([p.observations for p in parts]),
            np.concatenate([p.actions for p in parts]),
            np.concatenate([p.rewards for p in parts]),
            np.concatenate([p.terminations for p in parts]),
            np.concatenate([p.truncations for p in parts]),
            np.concatenate([p.episode_starts + o for p, o in zip(parts, offsets)]),
            source=source, metadata=metadata or {}, action_space=action_space,
            final_observations=None if any(f is None for f in finals) else np.concatenate(finals),
            observation_space=next(iter(obs_spaces)) if len(obs_spaces) == 1 else None,
        )

    def truncate_episodes(self, max_len: int) -> "EpisodeSet":
        """Cut every episode longer than ``max_len`` steps to its first ``max_len`` steps (marked
        truncated, returns-to-go recomputed over the kept steps). A cut episode's final
        observation becomes its observation ``max_len`` (the one after the last kept step)."""
        lengths = self.episode_lengths
        if lengths.max() <= max_len:
            return self
        offsets = np.arange(self.num_transitions) - np.repeat(self.episode_starts, lengths)  # (N,)
        keep = offsets < max_len
        term = self.terminations.copy()
        trunc = self.truncations.copy()
        cut_ends = self.episode_starts[lengths > max_len] + max_len - 1
        trunc[cut_ends] = True
        new_lengths = np.minimum(lengths, max_len)
        starts = np.concatenate([[0], np.cumsum(new_lengths)[:-1]])
        finals = self.final_observations
        if finals is not None:
            cut = lengths > max_len
            finals = finals.copy()
            finals[cut] = self.observations[self.episode_starts[cut] + max_len]
        return EpisodeSet(self.observations[keep], self.actions[keep], self.rewards[keep], term[keep],
                          trunc[keep], starts, source=self.source,
                          metadata={**self.metadata, "truncated_to": int(max_len)},
                          final_observations=finals, action_space=self.action_space,
                          observation_space=self.observation_space)

    def top_fraction(self, fraction: float) -> "EpisodeSet":
        """The highest-return episodes holding at most ``fraction`` of the transitions: episodes
        are taken from the best return down (ties: the earlier episode first) while their
        lengths sum to at most ``max(1, int(fraction * N))``; the best episode is always kept.
        They keep their order in the file.

        The DT paper's Percentile BC (section 5.3) as its code selects it (gym/experiment.py,
        pct_traj), except that an episode that fills the budget exactly is kept (the code's
        strict < drops the lowest-return episode even at pct_traj = 1). Final observations, when
        the set has them, follow their episodes; the action and observation spaces are this set's
        (a ``Discrete(4)`` stays ``Discrete(4)`` when the kept episodes use fewer actions). Raises
        ConfigError unless 0 < fraction <= 1.
        """
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or \
                not 0 < fraction <= 1:
            raise ConfigError(f"top_fraction must be in (0, 1], got {fraction!r}")
        budget = max(1, int(fraction * self.num_transitions))
        lengths = self.episode_lengths  # (E,)
        best_first = np.argsort(-self.episode_returns.astype(np.float64), kind="stable")  # (E,)
        fits = int(np.searchsorted(np.cumsum(lengths[best_first]), budget, side="right"))
        keep = np.sort(best_first[:max(1, fits)])  # (E',) episode ids in file order
        new_lengths = lengths[keep]
        new_starts = np.concatenate([[0], np.cumsum(new_lengths)[:-1]]).astype(np.int64)
        idx = (np.repeat(self.episode_starts[keep] - new_starts, new_lengths)
               + np.arange(int(new_lengths.sum())))  # (N',) flat indices of the kept steps
        finals = self.final_observations
        return EpisodeSet(self.observations[idx], self.actions[idx], self.rewards[idx],
                          self.terminations[idx], self.truncations[idx], new_starts,
                          source=self.source, metadata={**self.metadata, "top_fraction": fraction},
                          final_observations=None if finals is None else finals[keep],
                          action_space=self.action_space, observation_space=self.observation_space)

    def select_observation_keys(self, keys: tuple[str, ...] | list[str]) -> "EpisodeSet":
        """The episodes with only the Dict observation ``keys``, flattened in that order (columns
        of this set's ``DictObservations``). ConfigError naming the source and a key the space
        lacks (with the keys it has), or when the observations are not a Dict."""
        spec = self.observation_space
        if not isinstance(spec, DictObservations):
            raise ConfigError(f"obs_keys: {self.source} has {type(spec).__name__} observations, "
                              "not a Dict; leave obs_keys out")
        try:
            new_spec = spec.select(tuple(keys))
        except ConfigError as exc:
            raise ConfigError(f"{exc} in {self.source}") from None
        cols = spec.columns(new_spec.keys)  # (new dim,)
        finals = self.final_observations
        return EpisodeSet(self.observations[:, cols], self.actions, self.rewards, self.terminations,
                          self.truncations, self.episode_starts, source=self.source,
                          metadata={**self.metadata, "obs_keys": list(new_spec.keys)},
                          final_observations=None if finals is None else finals[:, cols],
                          action_space=self.action_space, observation_space=new_spec)

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def num_transitions(self) -> int:
        return int(self.observations.shape[0])

    @property
    def num_episodes(self) -> int:
        return int(self.episode_starts.shape[0])

    @property
    def obs_dim(self) -> int:
        """Width of an observation vector (vector and Dict observations). Image frames have no
        width (AttributeError): their shape is ``observation_space.shape``."""
        if isinstance(self.observation_space, ImageObservations):
            raise AttributeError(f"{self.source}: image observations have no obs_dim; see "
                                 f"observation_space ({self.observation_space})")
        return int(self.observations.shape[1])

    @property
    def act_dim(self) -> int:
        """Width of a continuous action vector (``action_space.dim``). Discrete actions have no
        width (AttributeError): their number is ``action_space.n``."""
        if not isinstance(self.action_space, ContinuousActions):
            raise AttributeError(f"{self.source}: discrete actions have no act_dim; use "
                                 f"action_space.n ({self.action_space})")
        return self.action_space.dim

    @property
    def episode_lengths(self) -> np.ndarray:  # (E,) int64
        return np.diff(np.append(self.episode_starts, self.num_transitions))

    @property
    def episode_returns(self) -> np.ndarray:  # (E,) float32: return-to-go at each episode's start
        return self.returns_to_go[self.episode_starts]

    @property
    def return_stats(self) -> ReturnStats:
        """Statistics of the episode returns (float64)."""
        return ReturnStats.of(self.episode_returns)

    @property
    def provenance(self) -> Provenance:
        """What ``metadata`` records about the data's origin, read in one place."""
        return Provenance.from_metadata(self.metadata)

    def fingerprint(self) -> str:
        """A content hash of the episodes (BLAKE2b over observations, actions, rewards,
        terminations, truncations and episode_starts, with their dtypes and shapes), as 32 hex
        digits: equal for equal data wherever it was loaded from, different when any value
        differs. A resumed run compares it with the one its checkpoint recorded."""
        digest = hashlib.blake2b(digest_size=16)
        for name in ("observations", "actions", "rewards", "terminations", "truncations",
                     "episode_starts"):
            array = np.ascontiguousarray(getattr(self, name))
            digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
            digest.update(memoryview(array).cast("B"))
        return digest.hexdigest()

    def summary(self) -> dict[str, Any]:
        """Statistics printed by ``dtlab data info``: the recorded ``env_id`` (None when the data
        records none), sizes, spaces, episode statistics, and ``metadata``: every metadata key
        the source carries (dtlab's provenance, D4RL's ``metadata/*``, Minari's dataset
        metadata), values JSON-safe (``metadata_for_display``)."""
        lens = self.episode_lengths
        space = self.action_space
        return {
            "source": self.source,
            "env_id": self.provenance.env_id,
            "episodes": self.num_episodes,
            "transitions": self.num_transitions,
            **_observation_summary(self.observation_space),
            **({"num_actions": space.n} if isinstance(space, DiscreteActions)
               else {"act_dim": space.dim}),
            "discrete_actions": isinstance(space, DiscreteActions),
            "terminated_episodes": int(self.terminations.sum()),
            "truncated_episodes": int(self.truncations.sum()),
            "episode_length": {"min": int(lens.min()), "mean": float(lens.mean()), "max": int(lens.max())},
            "episode_return": self.return_stats.to_json(),
            "action_range": [float(self.actions.min()), float(self.actions.max())],
            "metadata": {str(k): metadata_for_display(v) for k, v in sorted(self.metadata.items())},
        }


def metadata_for_display(value: Any, limit: int = 8) -> Any:
    """A metadata value as strict JSON: strings, finite numbers, booleans and None as they are
    (numpy scalars converted); lists, tuples and arrays of at most ``limit`` items and mappings
    element by element; longer sequences as "<array (shape) dtype>" or "<list of n items>";
    anything else (a non-finite number included) as its ``str``."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if np.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): metadata_for_display(v, limit) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        if value.size > limit:
            return f"<array {value.shape} {value.dtype}>"
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) > limit:
            return f"<list of {len(value)} items>"
        return [metadata_for_display(v, limit) for v in value]
    return str(value)


def _observation_summary(spec: ObservationSpec) -> dict[str, Any]:
    """``obs_dim`` (vectors, Dicts), the chosen keys (Dicts), frame shape and stack (images)."""
    if isinstance(spec, ImageObservations):
        return {"frame_shape": list(spec.shape), "frame_stack": spec.stack}
    if isinstance(spec, DictObservations):
        return {"obs_dim": spec.dim, "observation_keys": list(spec.keys)}
    return {"obs_dim": spec.dim}
