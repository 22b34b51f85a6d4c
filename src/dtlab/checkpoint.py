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
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dtlab import runtime
from dtlab._version import __version__
from dtlab.atomic import atomic_path, dumps_json, write_json, write_text_atomic
from dtlab.baselines import build_model
from dtlab.config import ModelConfig
from dtlab.data.formats.dqn_replay import PREFIX as REPLAY_PREFIX
from dtlab.data.formats.dqn_replay import split_source as split_replay_source
from dtlab.checks import is_number
from dtlab.errors import CheckpointError, ConfigError
from dtlab.model import DecisionTransformer
from dtlab.normalizer import Normalizer
from dtlab.spaces import (ActionSpec, ContinuousActions, DiscreteActions, ImageObservations,
                          ObservationSpec, VectorObservations, action_space_from_json,
                          observation_space_from_json)

# Version 3: "observation_space", "action_space" (dtlab.spaces) and "normalizer"
# (dtlab.normalizer) records; the observation space may be "vector", "image" (frame stacks; one
# normalizer mean/std for every pixel) or "dict" (the chosen keys, flattened in their order). Versions 1 (continuous actions) and 2 (discrete actions, "discrete":
# true) kept flat fields (obs_dim, act_dim, action_low/high, obs_mean/std, return_scale); they are
# still read.
FORMAT_VERSION = 3
CONFIG_FILE, WEIGHTS_FILE, TRAINER_FILE, LATEST_FILE = (
    "config.json", "model.safetensors", "trainer_state.pt", "latest")
_V3_KEYS = {"model", "observation_space", "action_space", "normalizer", "env_id", "ref_min_score",
            "ref_max_score", "dataset", "step", "dtlab_version", "format_version"}
# Written by `dtlab calibrate` into a checkpoint directory; optional.
CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class PolicyInfo:
    """Everything besides the weights that a checkpoint's policy needs (stored in config.json)."""

    model: ModelConfig
    observation_space: ObservationSpec
    action_space: ActionSpec  # the env's: continuous with its bounds, or Discrete(n)
    normalizer: Normalizer  # observation statistics, return scale, action mapping
    env_id: str
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    dataset: dict[str, Any] = field(default_factory=dict)  # path, provenance, return statistics
    step: int = 0
    dtlab_version: str = __version__
    format_version: int = FORMAT_VERSION  # of the file it was read from; always written as 3

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION, "model": dataclasses.asdict(self.model),
            "observation_space": self.observation_space.to_json(),
            "action_space": self.action_space.to_json(), "normalizer": self.normalizer.to_json(),
            "env_id": self.env_id, "ref_min_score": self.ref_min_score,
            "ref_max_score": self.ref_max_score, "dataset": self.dataset, "step": self.step,
            "dtlab_version": self.dtlab_version,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> "PolicyInfo":
        """Read format 1, 2 or 3; CheckpointError (one line, naming the field) when invalid."""
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise CheckpointError(f"{source}: no integer 'format_version' (not a dtlab checkpoint?)")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: checkpoint format {version} is newer than this dtlab supports "
                f"({FORMAT_VERSION}); upgrade dtlab")
        try:
            if version < 3:
                info = _from_legacy_json(data, source)
            else:
                unknown, missing = sorted(set(data) - _V3_KEYS), sorted(
                    {"model", "observation_space", "action_space", "normalizer", "env_id"} - set(data))
                if unknown or missing:
                    raise CheckpointError(f"{source}: invalid config: unknown keys {unknown}, "
                                          f"missing keys {missing}")
                info = cls(**{**data, "model": ModelConfig(**data["model"]),
                              "observation_space": observation_space_from_json(
                                  data["observation_space"]),
                              "action_space": action_space_from_json(data["action_space"]),
                              "normalizer": Normalizer.from_json(data["normalizer"])})
        except (TypeError, KeyError, ConfigError) as exc:
            raise CheckpointError(f"{source}: invalid config: {exc}") from None
        _check(info, source)
        return info




def _from_legacy_json(data: dict[str, Any], source: str) -> PolicyInfo:
    """Format 1 (continuous) or 2 (discrete: "discrete": true): flat fields, the same checks and
    messages as the dtlab that wrote them."""
    fields = {"model", "obs_dim", "act_dim", "action_low", "action_high", "obs_mean", "obs_std",
              "return_scale", "env_id", "ref_min_score", "ref_max_score", "dataset", "step",
              "dtlab_version", "format_version", "discrete"}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise TypeError(f"unexpected keys {unknown}")
    missing = sorted({"model", "obs_dim", "act_dim", "action_low", "action_high", "obs_mean",
                      "obs_std", "return_scale", "env_id"} - set(data))
    if missing:
        raise TypeError(f"missing keys {missing}")
    model = ModelConfig(**data["model"])
    discrete = data.get("discrete", False)
    if not isinstance(discrete, bool):
        raise CheckpointError(f"{source}: 'discrete' must be true or false")
    for name in ("obs_dim", "act_dim", "step"):
        value = data.get(name, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{source}: '{name}' must be a non-negative integer")
    bounds = 0 if discrete else data["act_dim"]
    for name, length in (("obs_mean", data["obs_dim"]), ("obs_std", data["obs_dim"]),
                         ("action_low", bounds), ("action_high", bounds)):
        value = data[name]
        if not isinstance(value, list) or len(value) != length or not all(map(is_number, value)):
            raise CheckpointError(f"{source}: '{name}' must be a list of {length} finite numbers")
    if not is_number(data["return_scale"]) or data["return_scale"] <= 0:
        raise CheckpointError(f"{source}: 'return_scale' must be a positive number")
    actions = (DiscreteActions(data["act_dim"]) if discrete else
               ContinuousActions(data["act_dim"], data["action_low"], data["action_high"]))
    normalizer = Normalizer(data["obs_mean"], data["obs_std"], data["return_scale"],
                            None if discrete else data["action_low"],
                            None if discrete else data["action_high"])
    return PolicyInfo(
        model=model, observation_space=VectorObservations(data["obs_dim"]), action_space=actions,
        normalizer=normalizer, env_id=data["env_id"], ref_min_score=data.get("ref_min_score"),
        ref_max_score=data.get("ref_max_score"), dataset=data.get("dataset", {}),
        step=data.get("step", 0), dtlab_version=data.get("dtlab_version", "unknown"),
        format_version=data["format_version"])


def _check(info: PolicyInfo, source: str) -> None:
    """Checks shared by every format version, and the records' agreement with each other."""
    if not isinstance(info.step, int) or isinstance(info.step, bool) or info.step < 0:
        raise CheckpointError(f"{source}: 'step' must be a non-negative integer")
    for name in ("ref_min_score", "ref_max_score"):
        if getattr(info, name) is not None and not is_number(getattr(info, name)):
            raise CheckpointError(f"{source}: '{name}' must be a number or null")
    if not isinstance(info.env_id, str) or not isinstance(info.dataset, dict):
        raise CheckpointError(f"{source}: 'env_id' must be a string and 'dataset' an object")
    if not isinstance(info.dtlab_version, str):
        raise CheckpointError(f"{source}: 'dtlab_version' must be a string")
    norm, spec = info.normalizer, info.observation_space
    if isinstance(spec, ImageObservations):
        if norm.obs_mean.shape != (1,):
            raise CheckpointError(f"{source}: 'normalizer.obs_mean' has {norm.obs_mean.size} "
                                  "entries but image observations take one (for every pixel)")
    elif norm.obs_mean.shape != (spec.dim,):
        raise CheckpointError(f"{source}: 'normalizer.obs_mean' has {norm.obs_mean.size} entries "
                              f"but 'observation_space.dim' is {spec.dim}")
    actions = info.action_space
    low = getattr(actions, "low", None)
    if low is None and isinstance(actions, ContinuousActions):
        raise CheckpointError(f"{source}: 'action_space' needs the env's bounds 'low' and 'high' "
                              "(the model acts in [-1, 1])")
    same = (norm.action_low is None if low is None else
            norm.action_low is not None and norm.action_low.tolist() == list(low)
            and norm.action_high.tolist() == list(actions.high))
    if not same:
        raise CheckpointError(f"{source}: 'normalizer.action_low'/'action_high' differ from the "
                              "bounds in 'action_space'")


# A run directory's resolved training configuration (written by dtlab.rundir.RunDirectory).
TRAIN_CONFIG_FILE = "train_config.json"
# A finetuned run directory's finetuning settings (written by dtlab.finetune, read by its
# --resume and by dtlab.export's model card).
FINETUNE_CONFIG_FILE = "finetune_config.json"


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
    if path.is_file():
        raise CheckpointError(f"{path}: is a file, not a checkpoint or run directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if not (path / CONFIG_FILE).is_file():
        if (path / TRAIN_CONFIG_FILE).is_file():  # a run directory before its first checkpoint
            raise CheckpointError(
                f"{path}: this run has no checkpoint yet (the first is written after "
                "--checkpoint-every steps or --checkpoint-every-minutes, or when it is stopped); "
                "evaluate it once one is there")
        raise CheckpointError(f"{path}: not a dtlab checkpoint (no {CONFIG_FILE}, no {LATEST_FILE})")
    return path


def save(run_dir: str | Path, name: str, model: DecisionTransformer, info: PolicyInfo,
         trainer_state: dict[str, Any] | None = None, keep: int | None = None,
         latest: bool = True,
         extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write checkpoint ``run_dir/name`` atomically and (``latest``) point ``run_dir/latest`` at
    it; ``keep``: then keep only the newest ``keep`` ``step_*`` checkpoints. ``extra``: more
    safetensors files written into the same directory, file name -> tensors (e.g. dtlab
    finetune's replay), part of the same atomic write (``load_extra`` reads one)."""
    run_dir = Path(run_dir)
    final = run_dir / name
    # A directory written whole, then renamed into place (an existing one, e.g. the final save of
    # a step that was also a periodic one, is replaced).
    with atomic_path(final, directory=True) as tmp:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(weights, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(dumps_json(info.to_json()))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_FILE)
        for file, tensors in (extra or {}).items():
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                      tmp / file)
    if latest:
        write_text_atomic(run_dir / LATEST_FILE, name + "\n")
    if keep is not None:
        steps = sorted((p for p in run_dir.glob("step_*") if p.is_dir() and p.name[5:].isdigit()),
                       key=lambda p: int(p.name[5:]))  # by step (names past 10^8 stop sorting)
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
    """Rebuild the model from a checkpoint, on ``device`` (``dtlab.runtime.resolve_device``:
    ConfigError for a device this machine lacks). CheckpointError for a missing or corrupt
    checkpoint, or weights that do not match its config."""
    device = runtime.resolve_device(device)
    path, info = load_info(path)
    return load_weights(path, info, device), info


def load_weights(path: Path, info: PolicyInfo, device: str | torch.device = "cpu"
                 ) -> DecisionTransformer:
    """The model of checkpoint directory ``path`` (resolved) whose config.json ``load_info``
    read as ``info``, on ``device``: ``load`` without reading config.json again. ConfigError
    for a device this machine lacks; CheckpointError for missing, corrupt or mismatching
    weights."""
    device = runtime.resolve_device(device)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing")
    try:
        weights = load_file(weights_path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: corrupt safetensors file: {exc}") from None
    model = build_model(info.model, info.observation_space, info.action_space)
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
    return model.to(device).eval()


def load_extra(path: str | Path, file: str) -> dict[str, torch.Tensor]:
    """The tensors of an ``extra`` file of checkpoint ``path`` (``save``), on the CPU.
    CheckpointError when it is missing or corrupt."""
    full = resolve(path) / file
    if not full.is_file():
        raise CheckpointError(f"{full}: missing")
    try:
        return load_file(full, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{full}: corrupt safetensors file: {exc}") from None


def save_calibration(path: str | Path, calibration: dict[str, Any]) -> Path:
    """Write ``calibration`` (dtlab.calibrate.calibrate_checkpoint's record, with a numeric
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
    if not is_number(value):
        raise CheckpointError(f"{file}: 'reliable_max_target' must be a finite number")
    return data


def reliable_max_target(path: str | Path) -> float | None:
    """The calibrated reliable maximum target of checkpoint ``path`` (``load_calibration``), or
    None when it was not calibrated."""
    calibration = load_calibration(path)
    return None if calibration is None else float(calibration["reliable_max_target"])


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


def shareable_dataset(dataset: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's dataset record as published (deploy artifact, Hugging Face layout): an
    absolute local ``path`` or ``source`` reduced to the file's name, which names the data
    without the machine's directories (user names included); ids such as ``minari:<id>`` and
    relative names as recorded; a ``dqn-replay:`` source keeps its options and its directory's
    name."""
    return {k: _shareable_name(v) if k in ("path", "source") and isinstance(v, str) else v
            for k, v in dataset.items()}


def _shareable_name(text: str) -> str:
    if text.startswith(REPLAY_PREFIX):
        directory, options = split_replay_source(text)
        return (f"{REPLAY_PREFIX}{Path(directory).name}{options}"
                if Path(directory).is_absolute() else text)
    return Path(text).name if Path(text).is_absolute() else text
