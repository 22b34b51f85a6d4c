"""Hopper-shaped inputs that need no downloads: a synthetic dataset (obs 11, act 3, episode lengths
like D4RL's hopper datasets) and an untrained dtlab policy for Hopper-v5.

Speed does not depend on the values, only on shapes and episode lengths, so random data measures
the same work as hopper-medium-v2 would.
"""

from __future__ import annotations

import numpy as np

OBS_DIM, ACT_DIM = 11, 3
ENV_ID = "Hopper-v5"
TARGETS = (3600.0, 1800.0)  # the DT paper's Hopper targets (dtlab.envs registry)


def synthetic_episodes(num_episodes: int = 400, seed: int = 0, min_len: int = 100,
                       max_len: int = 1000):
    """(dtlab EpisodeSet, the same episodes as the blog's list of per-episode dicts).

    Lengths are uniform in [min_len, max_len] (mean 550; hopper-medium-v2 averages ~460 with a
    1000-step cap), episodes end terminated except those that reach max_len (truncated).
    """
    from dtlab.data.episodes import EpisodeSet

    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=num_episodes)
    n = int(lengths.sum())
    obs = rng.normal(size=(n, OBS_DIM)).astype(np.float32)
    act = rng.uniform(-1, 1, size=(n, ACT_DIM)).astype(np.float32)
    rew = rng.normal(3.0, 0.5, size=n).astype(np.float32)
    ends = np.cumsum(lengths) - 1
    term = np.zeros(n, bool)
    trunc = np.zeros(n, bool)
    term[ends[lengths < max_len]] = True
    trunc[ends[lengths == max_len]] = True
    episodes = EpisodeSet.from_flags(obs, act, rew, term, trunc, source="<synthetic hopper>")
    blog = []
    for start, length in zip(episodes.episode_starts, episodes.episode_lengths):
        sl = slice(int(start), int(start + length))
        dones = (episodes.terminations[sl] | episodes.truncations[sl]).astype(np.float32)
        blog.append({"observations": obs[sl], "actions": act[sl], "rewards": rew[sl], "dones": dones})
    return episodes, blog


def untrained_policy(seed: int = 0):
    """A DTPolicy for Hopper-v5 with the paper configuration and random (untrained) weights."""
    import torch

    from dtlab.checkpoint import PolicyInfo
    from dtlab.config import ModelConfig
    from dtlab.envs import env_info
    from dtlab.model import DecisionTransformer
    from dtlab.normalizer import Normalizer
    from dtlab.policy import DTPolicy
    from dtlab.spaces import ContinuousActions, VectorObservations

    torch.manual_seed(seed)
    cfg = ModelConfig()
    observations = VectorObservations(OBS_DIM)
    actions = ContinuousActions(ACT_DIM, (-1.0,) * ACT_DIM, (1.0,) * ACT_DIM)
    model = DecisionTransformer(cfg, observations, actions)
    info = env_info(ENV_ID)
    normalizer = Normalizer([0.0] * OBS_DIM, [1.0] * OBS_DIM, info.return_scale, actions.low,
                            actions.high)
    pinfo = PolicyInfo(model=cfg, observation_space=observations, action_space=actions,
                       normalizer=normalizer, env_id=ENV_ID,
                       ref_min_score=info.ref_min_score, ref_max_score=info.ref_max_score)
    return DTPolicy(model, pinfo, "cpu")
