"""Test helper: build a grouped TrainConfig from the flat field names the CLI uses."""

from dataclasses import fields

from dtlab.config import DataConfig, EvalDuringTraining, OptimConfig, RunConfig, TrainConfig

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
