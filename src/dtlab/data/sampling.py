"""SequenceSampler: vectorized gather of K-step windows for a whole batch.

Each window ends at a transition drawn uniformly over the whole dataset, which is the same as
drawing an episode in proportion to its length and then a position in it uniformly (the original
DT's gym sampler draws episodes with p = length / total). Unlike the original, the sampled
position is the window's *last* step, and windows that would reach before the episode start are
left-padded: the last token is always real, and windows ending at t < K train exactly the short
contexts an evaluation episode starts with (see DESIGN.md, "Windows").

Image frames (``ImageObservations``) are stored once, (N, H, W) uint8, and never normalized or
copied up front: each step's input is the stack of its episode's last ``stack`` frames, gathered by
index, with the episode's first frame repeated before its start (as Gymnasium's
``FrameStackObservation`` pads at reset, ``padding_type="reset"``). Batches carry them as uint8;
the normalizer scales them on the model's device (``Normalizer.normalize_observations``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dtlab.data.episodes import EpisodeSet
from dtlab.normalizer import Normalizer
from dtlab.spaces import ImageObservations


@dataclass(frozen=True)
class Batch:
    """A batch of left-padded windows (numpy arrays; training converts them to tensors)."""

    observations: np.ndarray  # (B, K, obs_dim) float32, normalized, 0 at padding; or frame stacks
    #                           (B, K, stack, H, W) uint8, not yet normalized, 0 at padding
    actions: np.ndarray  # (B, K, act_dim) float32 in model space, or (B, K) int64 indices; 0 at padding
    returns_to_go: np.ndarray  # (B, K, 1) float32, divided by return_scale, 0 at padding
    timesteps: np.ndarray  # (B, K) int64, step index within the episode, 0 at padding
    masks: np.ndarray  # (B, K) bool, True at real steps


class SequenceSampler:
    """Draws batches of K-windows from an EpisodeSet with one array gather per field."""

    def __init__(self, episodes: EpisodeSet, context_len: int, normalizer: Normalizer) -> None:
        """``normalizer``: observations are normalized, returns-to-go scaled and actions mapped to
        the model's space (continuous: from the env's bounds to [-1, 1], clipped there) with it."""
        self.episodes = episodes
        self.context_len = context_len
        self.normalizer = normalizer
        spec = episodes.observation_space
        # Frames: gathered as stacks of this many, from the stored frames themselves (no copy).
        self._stack = spec.stack if isinstance(spec, ImageObservations) else None
        if self._stack is not None:
            self._obs = episodes.observations  # (N, H, W) uint8, read-only, shared
        else:
            # Normalize once up front: one gather per batch instead of normalizing every window.
            self._obs = np.asarray(normalizer.normalize_observations(episodes.observations),
                                   np.float32)
        self._rtg = np.asarray(normalizer.scale_returns(episodes.returns_to_go), np.float32)
        self._act = np.asarray(normalizer.actions_to_model(episodes.actions), episodes.actions.dtype)
        # Episode start of every transition, for the per-window lower bound.
        self._start_of = np.repeat(episodes.episode_starts, episodes.episode_lengths)  # (N,)

    def flat_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """What ``gather`` indexes, for a gather elsewhere (dtlab.train's on a GPU): observations
        normalized (N, obs_dim) float32, actions in model space (N, act_dim) float32 or (N,)
        int64, returns-to-go scaled (N,) float32, and each transition's episode start (N,) int64."""
        return self._obs, self._act, self._rtg, self._start_of

    def window_ends(self, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        """Draw the last step of each window, uniformly over all transitions. (B,) int64"""
        return rng.integers(0, self.episodes.num_transitions, size=batch_size)

    def gather(self, ends: np.ndarray) -> Batch:
        """Build the windows ending at the given flat transition indices."""
        k = self.context_len
        ends = np.asarray(ends, dtype=np.int64)
        starts = self._start_of[ends]  # (B,)
        idx = ends[:, None] + np.arange(-k + 1, 1)  # (B, K) flat indices, may reach before start
        masks = idx >= starts[:, None]  # (B, K)
        idx = np.where(masks, idx, ends[:, None])  # any valid index; zeroed below
        if self._stack is None:
            obs = self._obs[idx]  # (B, K, obs_dim)
        else:  # frame t - stack + 1 .. t of each step, the episode's first frame before its start
            frames = idx[..., None] + np.arange(-self._stack + 1, 1)  # (B, K, stack)
            frames = np.maximum(frames, starts[:, None, None])
            obs = self._obs[frames]  # (B, K, stack, H, W) uint8
        act = self._act[idx]  # (B, K, act_dim), or (B, K) indices
        rtg = self._rtg[idx]  # (B, K)
        obs[~masks] = 0.0
        act[~masks] = 0.0
        rtg[~masks] = 0.0
        timesteps = np.where(masks, idx - starts[:, None], 0)  # (B, K)
        return Batch(obs, act, rtg[..., None], timesteps, masks)

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        return self.gather(self.window_ends(batch_size, rng))
