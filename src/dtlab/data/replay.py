"""The Online Decision Transformer's trajectory replay (Zheng, Zhang and Grover 2022, section 3.3
and Algorithm 1): whole trajectories, first-in first-out, at most ``capacity`` of them, started
with the offline data's highest-return episodes. Its ``episodes`` are an ordinary EpisodeSet, so
each trajectory's returns-to-go are computed from the rewards it actually received (the paper's
hindsight return relabelling: a rollout asked for 2x the evaluation target is trained on with the
return it achieved), and ``SequenceSampler`` draws windows from it with each trajectory chosen
in proportion to its length (as the paper samples). Pure numpy; saved as flat arrays."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from dtlab.data.episodes import EpisodeSet
from dtlab.errors import ConfigError
from dtlab.spaces import ActionSpec, ObservationSpec


@dataclass(frozen=True)
class Trajectory:
    """One episode as it was run (the D4RL view: T observations for T steps)."""

    observations: np.ndarray  # (T, obs_dim) float32
    actions: np.ndarray  # (T, act_dim) float32 in the env's units, or (T,) int64 indices
    rewards: np.ndarray  # (T,) float32
    terminated: bool  # the env terminated it (else it was truncated, e.g. by the time limit)

    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    @property
    def episode_return(self) -> float:
        return float(np.sum(self.rewards, dtype=np.float64))


class TrajectoryReplay:
    """At most ``capacity`` trajectories, oldest first; adding one beyond it drops the oldest."""

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"replay_trajectories must be a positive integer, got {capacity!r}")
        self.capacity = capacity
        self._items: deque[Trajectory] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(self._items)

    def add(self, trajectory: Trajectory) -> None:
        self._items.append(trajectory)
        while len(self._items) > self.capacity:
            self._items.popleft()

    @classmethod
    def from_best(cls, episodes: EpisodeSet, capacity: int) -> "TrajectoryReplay":
        """The ``capacity`` highest-return episodes of ``episodes`` (the ODT's initial replay),
        added lowest return first, so that online trajectories replace the weakest first (ties:
        the earlier episode is added first)."""
        replay = cls(capacity)
        order = np.argsort(-episodes.episode_returns.astype(np.float64), kind="stable")[:capacity]
        bounds = np.append(episodes.episode_starts, episodes.num_transitions)
        for e in order[::-1]:
            a, b = bounds[e], bounds[e + 1]
            replay.add(Trajectory(np.asarray(episodes.observations[a:b], np.float32),
                                  np.asarray(episodes.actions[a:b]),
                                  np.asarray(episodes.rewards[a:b], np.float32),
                                  bool(episodes.terminations[b - 1])))
        return replay

    def episodes(self, observation_space: ObservationSpec, action_space: ActionSpec,
                 source: str = "<replay>") -> EpisodeSet:
        """The trajectories as one EpisodeSet, oldest first; returns-to-go from their own
        rewards (hindsight relabelling)."""
        items = list(self._items)
        lengths = np.array([len(t) for t in items], dtype=np.int64)
        ends = np.cumsum(lengths) - 1
        n = int(lengths.sum())
        term, trunc = np.zeros(n, bool), np.zeros(n, bool)
        term[ends] = [t.terminated for t in items]
        trunc[ends] = [not t.terminated for t in items]
        return EpisodeSet(np.concatenate([t.observations for t in items]),
                          np.concatenate([t.actions for t in items]),
                          np.concatenate([t.rewards for t in items]), term, trunc,
                          np.concatenate([[0], ends[:-1] + 1]).astype(np.int64), source=source,
                          action_space=action_space, observation_space=observation_space)

    # ---- saving -----------------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays (oldest first): observations, actions, rewards, lengths (E,), terminated
        (E,) as uint8, capacity (1,)."""
        items = list(self._items)
        return {"observations": np.concatenate([t.observations for t in items]),
                "actions": np.concatenate([t.actions for t in items]),
                "rewards": np.concatenate([t.rewards for t in items]),
                "lengths": np.array([len(t) for t in items], dtype=np.int64),
                "terminated": np.array([t.terminated for t in items], dtype=np.uint8),
                "capacity": np.array([self.capacity], dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "TrajectoryReplay":
        """The replay ``to_arrays`` saved, exactly."""
        replay = cls(int(arrays["capacity"][0]))
        bounds = np.concatenate([[0], np.cumsum(arrays["lengths"])])
        for i, terminated in enumerate(arrays["terminated"]):
            a, b = bounds[i], bounds[i + 1]
            replay.add(Trajectory(arrays["observations"][a:b], arrays["actions"][a:b],
                                  arrays["rewards"][a:b], bool(terminated)))
        return replay
