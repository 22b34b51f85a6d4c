"""Test helpers: a grouped TrainConfig from the flat field names the CLI uses, and the
Pendulum-shaped episodes several test files (and the torchrun worker) train on."""

from dataclasses import fields
from pathlib import Path

import numpy as np

from dtlab.config import DataConfig, EvalDuringTraining, OptimConfig, RunConfig, TrainConfig
from dtlab.data import EpisodeSet

_GROUPS = {"data": DataConfig, "optim": OptimConfig, "run": RunConfig,
           "evaluation": EvalDuringTraining}
_GROUP_OF = {f.name: group for group, cls in _GROUPS.items() for f in fields(cls)}


def train_config(model=None, **flat) -> TrainConfig:
    """``train_config(dataset=..., env=..., steps=4, lr=1e-3, model=ModelConfig(...))``."""
    parts = {group: {} for group in _GROUPS}
    for name, value in flat.items():
        parts[_GROUP_OF[name]][name] = value  # KeyError: not a TrainConfig field
    groups = {g: _GROUPS[g](**kw) for g, kw in parts.items() if kw or g == "data"}
    return TrainConfig(**groups, **({"model": model} if model is not None else {}))


def flat_fields(cfg: TrainConfig) -> dict:
    """The inverse of ``train_config``: every field by its flat name, plus ``model``."""
    out = {"model": cfg.model}
    for group in _GROUPS:
        value = getattr(cfg, group)
        out.update({f.name: getattr(value, f.name) for f in fields(value)})
    return out


def pendulum_like(n_episodes=4, length=200, seed=0):
    """Random Pendulum-shaped episodes (cos, sin, velocity; torques in [-2, 2]), truncated at
    ``length`` steps."""
    rng = np.random.default_rng(seed)
    n = n_episodes * length
    trunc = np.zeros(n, bool)
    trunc[length - 1::length] = True
    th = rng.uniform(-np.pi, np.pi, n)
    obs = np.stack([np.cos(th), np.sin(th), rng.normal(size=n)], 1)
    return EpisodeSet.from_flags(obs, rng.uniform(-2, 2, (n, 1)), -rng.uniform(0, 5, n),
                                 np.zeros(n, bool), trunc)


HOPPER_DATA = Path(__file__).resolve().parents[1] / "datasets" / "hopper-medium-replay-v5.hdf5"


def make_checkpoint(tmp_path, env_id, obs_spec, act_spec, *, k=4, max_ep_len=100, seed=0,
                    architecture="decision-transformer", returns=(0.0, 100.0),
                    policy="deterministic"):
    """A run directory ``tmp_path/run`` with one checkpoint of a tiny model (embed 16, 2 layers,
    2 heads, no dropout) whose random weights are spread wider than the init (std 0.3 added), so
    that discrete logits are far from ties and continuous actions far from 0; random observation
    statistics, return scale 100, the data's episode returns spanning ``returns``; ``policy``: the
    action head (ModelConfig.policy)."""
    import torch

    from dtlab import checkpoint
    from dtlab.checkpoint import PolicyInfo
    from dtlab.config import ModelConfig
    from dtlab.baselines import build_model
    from dtlab.normalizer import Normalizer
    from dtlab.spaces import ImageObservations

    cfg = ModelConfig(embed_dim=16, n_layers=2, n_heads=2, context_len=k, max_ep_len=max_ep_len,
                      dropout=0.0, architecture=architecture, policy=policy)
    torch.manual_seed(seed)
    model = build_model(cfg, obs_spec, act_spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    rng = np.random.default_rng(seed)
    if isinstance(obs_spec, ImageObservations):
        norm = Normalizer.for_images(100.0)
    else:
        norm = Normalizer(rng.normal(0, 0.5, obs_spec.dim), rng.uniform(0.5, 2.0, obs_spec.dim),
                          100.0, getattr(act_spec, "low", None), getattr(act_spec, "high", None))
    lo, hi = returns
    info = PolicyInfo(model=cfg, observation_space=obs_spec, action_space=act_spec,
                      normalizer=norm, env_id=env_id,
                      dataset={"path": "<memory>", "episode_return": {
                          "mean": (lo + hi) / 2, "std": (hi - lo) / 4, "min": lo, "max": hi}})
    run = tmp_path / "run"
    checkpoint.save(run, "step_00000001", model, info)
    return run


def box(env_id):
    """The env's Box action space as dtlab's ContinuousActions (with its bounds)."""
    from dtlab.envs import make_env
    from dtlab.spaces import ContinuousActions

    env = make_env(env_id)
    space = env.action_space
    env.close()
    return ContinuousActions(space.shape[0], tuple(space.low.tolist()), tuple(space.high.tolist()))
