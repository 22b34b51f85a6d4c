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
    from dtlab.policy import DTPolicy

    torch.manual_seed(seed)
    cfg = ModelConfig()
    model = DecisionTransformer(cfg, OBS_DIM, ACT_DIM)
    info = env_info(ENV_ID)
    pinfo = PolicyInfo(model=cfg, obs_dim=OBS_DIM, act_dim=ACT_DIM, action_low=[-1.0] * ACT_DIM,
                       action_high=[1.0] * ACT_DIM, obs_mean=[0.0] * OBS_DIM, obs_std=[1.0] * OBS_DIM,
                       return_scale=info.return_scale, env_id=ENV_ID,
                       ref_min_score=info.ref_min_score, ref_max_score=info.ref_max_score)
    return DTPolicy(model, pinfo, "cpu")
