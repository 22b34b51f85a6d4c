"""Checkpoints: a directory with ``config.json`` + ``model.safetensors`` (+ ``trainer_state.pt``).

``config.json`` holds everything needed to rebuild and run the policy: model config, observation and
action spaces, normalization statistics, return scale, env id, reference scores, dataset provenance
and the dtlab version. Loading never unpickles code: weights come from safetensors, the config from
JSON, and the trainer state (resume only) through ``torch.load(weights_only=True)``.

A run directory holds ``step_XXXXXXXX/`` checkpoints and a ``latest`` file naming the newest one.
Every write goes to a temporary name first and is renamed into place, so a crash at any moment
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import dtlab
from dtlab.atomic import fsync_dir, give_default_mode, write_json, write_text_atomic
from dtlab.config import ModelConfig
from dtlab.errors import CheckpointError, ConfigError
from dtlab.model import DecisionTransformer, build_model

# Version 2 added discrete actions ("discrete": true). Continuous checkpoints are still written as
# version 1, without the key, so that older dtlab versions keep reading them.
FORMAT_VERSION = 2
CONFIG_FILE, WEIGHTS_FILE, TRAINER_FILE, LATEST_FILE = (
    "config.json", "model.safetensors", "trainer_state.pt", "latest")
# Written by `dtlab calibrate` into a checkpoint directory; optional.
CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class PolicyInfo:
    """Everything besides the weights that a checkpoint's policy needs (stored in config.json)."""

    model: ModelConfig
    obs_dim: int
    act_dim: int  # action width, or the number of actions if discrete
    action_low: list[float]  # (act_dim,) env action bounds; the model acts in [-1, 1]; [] if discrete
    action_high: list[float]  # (act_dim,); [] if discrete
    obs_mean: list[float]  # (obs_dim,)
    obs_std: list[float]  # (obs_dim,)
    return_scale: float
    env_id: str
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    dataset: dict[str, Any] = field(default_factory=dict)  # path, provenance, return statistics
    step: int = 0
    dtlab_version: str = dtlab.__version__
    format_version: int = FORMAT_VERSION
    discrete: bool = False  # actions are indices into Discrete(act_dim)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["format_version"] = 2 if self.discrete else 1
        if not self.discrete:
            del data["discrete"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> "PolicyInfo":
        version = data.get("format_version")
        if not isinstance(version, int):
            raise CheckpointError(f"{source}: no integer 'format_version' (not a dtlab checkpoint?)")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: checkpoint format {version} is newer than this dtlab supports "
                f"({FORMAT_VERSION}); upgrade dtlab")
        try:
            model = ModelConfig(**data["model"])
            info = cls(**{**data, "model": model})
        except (TypeError, KeyError, ConfigError) as exc:
            raise CheckpointError(f"{source}: invalid config: {exc}") from None

        def is_number(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not isinstance(info.discrete, bool):
            raise CheckpointError(f"{source}: 'discrete' must be true or false")
        bounds = 0 if info.discrete else info.act_dim
        for name, length in (("obs_mean", info.obs_dim), ("obs_std", info.obs_dim),
                             ("action_low", bounds), ("action_high", bounds)):
            value = getattr(info, name)
            if not isinstance(value, list) or len(value) != length or not all(map(is_number, value)):
                raise CheckpointError(f"{source}: '{name}' must be a list of {length} finite numbers")
        for name in ("obs_dim", "act_dim", "step"):
            if not isinstance(getattr(info, name), int) or getattr(info, name) < 0:
                raise CheckpointError(f"{source}: '{name}' must be a non-negative integer")
        if not is_number(info.return_scale) or info.return_scale <= 0:
            raise CheckpointError(f"{source}: 'return_scale' must be a positive number")
        for name in ("ref_min_score", "ref_max_score"):
            if getattr(info, name) is not None and not is_number(getattr(info, name)):
                raise CheckpointError(f"{source}: '{name}' must be a number or null")
        if not isinstance(info.env_id, str) or not isinstance(info.dataset, dict):
            raise CheckpointError(f"{source}: 'env_id' must be a string and 'dataset' an object")
        return info


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory resolved through its ``latest`` file."""
    path = Path(path)
    if (path / LATEST_FILE).is_file():
        try:
            name = (path / LATEST_FILE).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path / LATEST_FILE}: unreadable: {exc}") from None
        if not name or "/" in name or name in (".", ".."):
            raise CheckpointError(f"{path / LATEST_FILE}: does not name a checkpoint directory")
        path = path / name
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path}: not a dtlab checkpoint (no {CONFIG_FILE}, no {LATEST_FILE})")
    return path


def save(run_dir: str | Path, name: str, model: DecisionTransformer, info: PolicyInfo,
         trainer_state: dict[str, Any] | None = None, keep: int | None = None) -> Path:
    """Write checkpoint ``run_dir/name`` atomically and point ``run_dir/latest`` at it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{name}.tmp-"))
    final = run_dir / name
    try:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(weights, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(info.to_json(), indent=2))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_FILE)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            give_default_mode(f)
        give_default_mode(tmp)
        if final.exists():  # re-saving the same step (e.g. final == periodic): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(run_dir / LATEST_FILE, name + "\n")
    if keep is not None:
        steps = sorted(p for p in run_dir.glob("step_*") if p.is_dir())
        for old in steps[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def load_info(path: str | Path) -> tuple[Path, PolicyInfo]:
    path = resolve(path)
    source = str(path / CONFIG_FILE)
    try:
        data = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{source}: corrupt JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: expected a JSON object")
    return path, PolicyInfo.from_json(data, source)


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[DecisionTransformer, PolicyInfo]:
    """Rebuild the model from a checkpoint; refuses weights that do not match the config."""
    path, info = load_info(path)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing")
    try:
        weights = load_file(weights_path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: corrupt safetensors file: {exc}") from None
    model = build_model(info.model, info.obs_dim, info.act_dim, info.discrete)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights_path}: weights do not match config.json "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(f"{weights_path}: '{key}' has shape {tuple(value.shape)}, "
                                  f"config.json implies {tuple(expected[key].shape)}")
    model.load_state_dict(weights)
    return model.to(device).eval(), info


def save_calibration(path: str | Path, calibration: dict[str, Any]) -> Path:
    """Write ``calibration`` (dtlab.evaluate.calibrate_checkpoint's record, with a numeric
    ``reliable_max_target``) as ``calibration.json`` into checkpoint ``path``, atomically."""
    file = resolve(path) / CALIBRATION_FILE
    write_json(file, calibration)
    return file


def load_calibration(path: str | Path) -> dict[str, Any] | None:
    """The checkpoint's calibration record, or None when it has none. CheckpointError when the
    file is unreadable or has no finite number ``reliable_max_target``."""
    file = resolve(path) / CALIBRATION_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{file}: corrupt JSON: {exc}") from None
    value = data.get("reliable_max_target") if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{file}: 'reliable_max_target' must be a finite number")
    return data


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """Optimizer/scheduler/RNG state for --resume, loaded without unpickling code."""
    file = resolve(path) / TRAINER_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (checkpoint was saved without trainer state)")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt/unsafe files
        raise CheckpointError(f"{file}: cannot load trainer state: {exc}") from None


def numpy_rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """The generator's state as plain JSON-able types (for weights_only torch.save)."""
    return rng.bit_generator.state


def restore_numpy_rng(state: dict[str, Any]) -> np.random.Generator:
    bit_gen = getattr(np.random, state["bit_generator"])()
    bit_gen.state = state
    return np.random.Generator(bit_gen)
