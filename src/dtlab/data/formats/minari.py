"""Minari datasets (Farama's successor to D4RL): read one into an EpisodeSet (here), write one
back (dtlab.data.formats.minari_write).

A Minari dataset is addressed by an id ``(namespace/)name-v<version>`` and lives in a directory
``$MINARI_DATASETS_PATH/<id>/data`` (default root ``~/.minari/datasets``;
``minari.storage.datasets_root_dir``). dtlab names it ``minari:<id>`` in messages.

Episode layout, from ``minari.dataset.episode_data.EpisodeData`` and the Minari docs ("Dataset
Standards"): an episode of T steps stores

    observations   (T+1, *obs_shape)  the reset observation, then the one after every step
    actions        (T, *act_shape)
    rewards        (T,)
    terminations   (T,)  bool
    truncations    (T,)  bool

dtlab keeps T observations per episode (the D4RL view, DESIGN.md "Episode storage"): observation
t is the one in which action t was taken. Reading keeps each episode's final observation apart, in
``EpisodeSet.final_observations``; writing puts it back from there (or from the writer's
``final_observations`` argument) or, when neither is known, as a copy of the last one (recorded
in the dataset's description and its ``dtlab_final_observations`` metadata key).

Observation spaces: flat ``Box`` (the MuJoCo/classic-control case) or a ``Dict`` of Boxes (the
goal-conditioned navigation datasets, e.g. D4RL's successors for PointMaze and AntMaze), whose keys
are flattened in the space's order into ``DictObservations`` (training then picks keys with
``obs_keys``). Action spaces: flat ``Box`` or ``Discrete``. Image observations are not read or
written here (dtlab's own HDF5 formats store frames).
"""

from __future__ import annotations

import json
import os
from typing import Any

import gymnasium as gym
import minari
import numpy as np
from minari.dataset.minari_dataset import parse_dataset_id
from minari.storage import get_dataset_path

from dtlab.data.episodes import EpisodeSet
from dtlab.errors import DatasetError, DtlabError
from dtlab.spaces import (DictObservations, action_space_from_gym, describe_space,
                          observation_space_from_gym)

PREFIX = "minari:"
# Minari's environment variable for the local datasets root (minari/storage/datasets_root_dir.py).
_ROOT_VAR = "MINARI_DATASETS_PATH"
# Keys dtlab adds to a Minari dataset's metadata.json (MinariStorage.update_metadata accepts any
# JSON-serializable key besides its own fixed ones).
_DTLAB_METADATA = "dtlab_metadata"
_DTLAB_FINALS = "dtlab_final_observations"
_FINALS_COPIED = "copied from the last step"  # its value when they were not known
# Optional dataset-level keys of Minari's metadata.json (minari.utils._generate_dataset_metadata)
# copied into EpisodeSet.metadata on read, prefixed "minari_".
_MINARI_KEYS = ("algorithm_name", "author", "author_email", "code_permalink", "description",
                "ref_min_score", "ref_max_score", "num_episodes_average_score", "requirements",
                "data_format", "dataset_size")


# ---- reading -----------------------------------------------------------------------------------
def read_minari(dataset_id: str) -> EpisodeSet:
    """Read the Minari dataset ``dataset_id``, downloading it first if it is not local.

    Each episode's T+1 observations become T, and the (T+1)-th goes to ``final_observations``;
    terminations and truncations are kept per step (final observations None when dtlab wrote
    the dataset with copied ones: ``dtlab_final_observations``). Every failure is a one-line DatasetError naming
    ``minari:<id>``.
    """
    source = PREFIX + dataset_id
    _check_id(dataset_id, source)
    dataset = _open_dataset(dataset_id, source)
    _check_observation_space(dataset.observation_space, source)
    _check_action_space(dataset.action_space, source)
    try:  # the dataset's own spaces: a Discrete(n) keeps its n even if the data never uses n - 1
        action_space = action_space_from_gym(dataset.action_space)
        observation_space = observation_space_from_gym(dataset.observation_space)
    except DtlabError as e:
        raise DatasetError(f"{source}: {e}") from None

    observations, actions, rewards, terminations, truncations, finals = [], [], [], [], [], []
    lengths = []
    try:
        for ep in dataset.iterate_episodes():
            steps = len(ep.rewards)
            obs = _flat_observations(ep.observations, observation_space, source, ep.id)  # (T+1, obs_dim)
            act = np.asarray(ep.actions)  # (T, act_dim)
            if steps == 0:
                raise DatasetError(f"{source}: episode {ep.id} has no steps")
            if obs.shape[0] != steps + 1 or act.shape[0] != steps:
                raise DatasetError(
                    f"{source}: episode {ep.id} has {obs.shape[0]} observations and "
                    f"{act.shape[0]} actions for {steps} rewards; Minari stores T+1 and T")
            observations.append(obs[:steps].reshape(steps, -1))  # the final one kept apart
            finals.append(obs[steps].reshape(-1))  # (obs_dim,)
            actions.append(act.reshape(steps, -1))  # (T, 1) indices become (N,) in EpisodeSet
            rewards.append(np.asarray(ep.rewards).reshape(steps))
            terminations.append(np.asarray(ep.terminations).reshape(steps))
            truncations.append(np.asarray(ep.truncations).reshape(steps))
            lengths.append(steps)
    except DtlabError:
        raise
    except Exception as e:  # h5py/pyarrow errors of a damaged or unreadable dataset
        raise DatasetError(f"{source}: reading episodes failed: {_one_line(e)}") from e
    if not lengths:
        raise DatasetError(f"{source}: dataset has no episodes")

    starts = np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64)  # (E,)
    metadata = _metadata_from_minari(dataset, dataset_id)
    if metadata.get(_DTLAB_FINALS) == _FINALS_COPIED:
        finals = None  # dtlab wrote copies of the last observations: the real ones are unknown
    return EpisodeSet(np.concatenate(observations), np.concatenate(actions),
                      np.concatenate(rewards), np.concatenate(terminations),
                      np.concatenate(truncations), starts, source=source,
                      metadata=metadata,
                      final_observations=None if finals is None else np.stack(finals),
                      action_space=action_space, observation_space=observation_space)


def _flat_observations(observations, spec, source: str, episode) -> np.ndarray:
    """An episode's observations as (T+1, obs_dim): a Dict's keys flattened in the spec's order.
    DatasetError naming the episode when the keys hold different numbers of rows."""
    if not isinstance(spec, DictObservations):
        return np.asarray(observations)
    parts = {k: np.asarray(observations[k]) for k in spec.keys}
    rows = {k: p.shape[0] if p.ndim else 0 for k, p in parts.items()}
    if len(set(rows.values())) != 1:
        raise DatasetError(f"{source}: episode {episode}: the observation keys hold different "
                           f"numbers of rows {rows}")
    return np.concatenate([p.reshape(p.shape[0], -1) for p in parts.values()], axis=1)


def _open_dataset(dataset_id: str, source: str) -> minari.MinariDataset:
    """``minari.load_dataset``; when the id is not local, ``minari.download_dataset`` first."""
    try:
        return minari.load_dataset(dataset_id)
    except FileNotFoundError:
        pass  # not local: try the remote below
    except Exception as e:
        raise DatasetError(f"{source}: cannot load: {_one_line(e)}") from e
    try:
        minari.download_dataset(dataset_id)
    except Exception as e:  # network, unknown id, missing `minari[hf]` extra, ...
        raise DatasetError(f"{source}: not found locally ({_root_description()}) and download "
                           f"failed: {_one_line(e)}") from e
    try:
        return minari.load_dataset(dataset_id)
    except Exception as e:
        raise DatasetError(f"{source}: downloaded but cannot load: {_one_line(e)}") from e


def _metadata_from_minari(dataset: minari.MinariDataset, dataset_id: str) -> dict[str, Any]:
    """Provenance as plain values: dtlab's own (if dtlab wrote it), then Minari's."""
    raw = dataset.storage.metadata
    metadata: dict[str, Any] = {}
    if isinstance(raw.get(_DTLAB_METADATA), dict):
        metadata.update(raw[_DTLAB_METADATA])
    metadata["minari_dataset_id"] = dataset_id
    metadata["minari_version"] = str(raw.get("minari_version", ""))
    if dataset.env_spec is not None:
        metadata["env_id"] = dataset.env_spec.id
    if isinstance(raw.get("eval_env_spec"), str):  # EnvSpec.to_json(), no public accessor
        eval_id = json.loads(raw["eval_env_spec"]).get("id")
        if isinstance(eval_id, str) and eval_id != metadata.get("env_id"):
            metadata["minari_eval_env_id"] = eval_id
    for key in _MINARI_KEYS:
        value = raw.get(key)
        if isinstance(value, (set, list, tuple)):  # author(s), emails, requirements
            value = ", ".join(sorted(str(v) for v in value))
        if isinstance(value, (str, int, float)):
            metadata["minari_" + key] = value
    if _DTLAB_FINALS in raw:
        metadata[_DTLAB_FINALS] = str(raw[_DTLAB_FINALS])
    return metadata


def _check_id(dataset_id: str, source: str) -> str | None:
    """The id's namespace (None if it has none); a malformed id is a DatasetError."""
    try:
        namespace, _, _ = parse_dataset_id(dataset_id)
    except (ValueError, TypeError):  # TypeError: Minari's parser on an id without a version
        raise DatasetError(f"{source}: malformed Minari dataset id; expected "
                           "(namespace/)name-v<version>, e.g. mujoco/hopper/medium-v0") from None
    return namespace


def _check_observation_space(space: gym.Space, source: str) -> None:
    """A flat Box, or a Dict of Boxes; anything else (images included) is a DatasetError."""
    if isinstance(space, gym.spaces.Dict):
        try:
            if isinstance(observation_space_from_gym(space), DictObservations):
                return
        except DtlabError:
            pass
        raise DatasetError(f"{source}: Dict observation spaces must hold Boxes only, got "
                           f"{describe_space(space)}")
    _check_flat_box(space, "observation", source)


def _check_action_space(space: gym.Space, source: str) -> None:
    if isinstance(space, gym.spaces.Discrete):
        if int(space.start) != 0:
            raise DatasetError(f"{source}: Discrete action spaces must start at 0, got "
                               f"{describe_space(space)}")
        return
    _check_flat_box(space, "action", source)


def _check_flat_box(space: gym.Space, what: str, source: str) -> None:
    if not isinstance(space, gym.spaces.Box) or len(space.shape) > 1:
        raise DatasetError(f"{source}: only flat Box {what} spaces are supported, got "
                           f"{describe_space(space)}")


def _root_description() -> str:
    value = os.environ.get(_ROOT_VAR)
    if value is None:
        return f"{_ROOT_VAR} unset, default {get_dataset_path()}"
    return f"{_ROOT_VAR}={value}"


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or "no message"
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."
