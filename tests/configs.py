"""Test helpers: a grouped TrainConfig from the flat field names the CLI uses, and the
Pendulum-shaped episodes several test files (and the torchrun worker) train on."""

from dataclasses import fields

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
