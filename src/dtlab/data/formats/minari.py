"""Minari datasets (Farama's successor to D4RL): read one into an EpisodeSet, write one back.

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
import secrets
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gymnasium as gym
import minari
import numpy as np
from minari.data_collector import EpisodeBuffer
from minari.dataset.minari_dataset import parse_dataset_id
from minari.namespace import create_namespace, list_local_namespaces
from minari.storage import get_dataset_path

from dtlab._version import __version__
from dtlab.atomic import atomic_path, dumps_json
from dtlab.data.episodes import EpisodeSet
from dtlab.data.formats._hdf5 import json_default
from dtlab.errors import DatasetError, DtlabError
from dtlab.spaces import (DictObservations, DiscreteActions, ImageObservations,
                          action_space_from_gym, check_against_env, describe_space,
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


# ---- writing -----------------------------------------------------------------------------------
def write_minari(episodes: EpisodeSet, dataset_id: str, *, env_id: str | None = None,
                 final_observations: np.ndarray | None = None, overwrite: bool = False,
                 algorithm_name: str | None = None, author: str | None = None,
                 author_email: str | None = None, code_permalink: str | None = None,
                 description: str | None = None) -> None:
    """Write ``episodes`` as the local Minari dataset ``dataset_id``, with Minari's own writer
    (``minari.create_dataset_from_buffers``).

    - ``env_id``: observation/action spaces and the env spec come from ``gymnasium.make(env_id)``
      (shapes must match the data, else EnvError). None: Box spaces spanning the data's
      per-dimension min/max, float32 (action indices: ``Discrete(n)`` of the episodes'
      ``action_space``), and no env spec.
    - ``final_observations`` (E, obs_dim): the observation after each episode's last step (Minari
      stores T+1 observations). None: ``episodes.final_observations``; when that is None too, the
      last observation is repeated, and the dataset's description and
      ``dtlab_final_observations`` metadata say so.
    - ``episodes.metadata`` goes into the dataset's ``dtlab_metadata`` key (read back by
      ``read_minari``); ``algorithm_name`` defaults to its ``algorithm`` or ``policies`` entry.
    - Atomic as far as the file system allows: the dataset is built under a hidden staging root
      next to the datasets and renamed into place; on any error nothing is left behind. An
      existing dataset is a DatasetError unless ``overwrite``.

    While writing, ``MINARI_DATASETS_PATH`` points at the staging root (Minari takes its paths
    from there), so do not run other Minari calls concurrently in other threads.
    """
    source, namespace, root, target = _destination(episodes, dataset_id, overwrite)
    # Everything that can fail on the input fails here, before anything touches the disk.
    if final_observations is None:
        final_observations = episodes.final_observations
    finals_copied = final_observations is None
    finals = _final_observations(episodes, final_observations, source)  # (E, obs_dim)
    provenance = json.loads(dumps_json(episodes.metadata, default=json_default))
    env = _make_env(env_id, episodes, source) if env_id is not None else None
    try:
        obs_space, act_space = _spaces(episodes, finals, env)
        buffers = _episode_buffers(episodes, finals, obs_space, act_space.dtype)
        staging = root / f".dtlab-staging-{secrets.token_hex(4)}"
        try:
            with _datasets_root(staging):
                _create(dataset_id, buffers, env, obs_space, act_space, dict(
                    algorithm_name=algorithm_name or _algorithm_name(episodes.metadata),
                    author=author, author_email=author_email, code_permalink=code_permalink,
                    description=_description(episodes, finals_copied, description)), {
                    _DTLAB_METADATA: provenance,
                    _DTLAB_FINALS: _FINALS_COPIED if finals_copied else "recorded",
                    "dtlab_version": __version__})
            if namespace is not None and namespace not in list_local_namespaces():
                create_namespace(namespace)  # Minari's namespace_metadata.json files
            _move_into_place(staging / dataset_id, target, overwrite, source)
        except DtlabError:
            raise
        except Exception as e:
            raise DatasetError(f"{source}: writing failed: {_one_line(e)}") from e
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if env is not None:
            env.close()


def _destination(episodes: EpisodeSet, dataset_id: str, overwrite: bool
                 ) -> tuple[str, str | None, Path, Path]:
    """(``minari:<id>`` for messages, the id's namespace, the datasets root, the dataset's
    directory); DatasetError for a malformed id, image frames, or an existing dataset without
    ``overwrite``."""
    source = PREFIX + dataset_id
    namespace = _check_id(dataset_id, source)
    if isinstance(episodes.observation_space, ImageObservations):
        raise DatasetError(f"{source}: dtlab does not write image frames to Minari datasets; "
                           "write them to an HDF5 file (native or d4rl format)")
    root = Path(get_dataset_path())
    target = root / dataset_id
    if target.exists() and not overwrite:
        raise DatasetError(f"{source}: dataset already exists at {target}; pass overwrite=True "
                           "to replace it")
    return source, namespace, root, target


def _create(dataset_id: str, buffers: list, env: gym.Env | None, obs_space: gym.Space,
            act_space: gym.Space, info: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Minari's ``create_dataset_from_buffers`` under the current datasets root, with the
    dataset's ``info`` (algorithm name, author, ..., description), then dtlab's ``metadata``."""
    with warnings.catch_warnings():
        # Minari warns for every optional field left None (author, code_permalink, ...).
        warnings.filterwarnings("ignore", message=r"`?\w+`? is (set to )?None",
                                category=UserWarning)
        dataset = minari.create_dataset_from_buffers(
            dataset_id, buffers, env=env, observation_space=obs_space, action_space=act_space,
            **info)
        dataset.storage.update_metadata(metadata)


def _spaces(episodes: EpisodeSet, finals: np.ndarray, env: gym.Env | None
            ) -> tuple[gym.Space, gym.Space]:
    """The dataset's (observation, action) spaces: the env's, else spanning the data (Box
    bounds from the per-dimension min/max of the observations with ``finals``, a Dict of such
    Boxes for Dict observations; ``Discrete(n)`` for action indices, else a Box over the
    actions)."""
    if env is not None:
        return env.observation_space, env.action_space
    observations = np.concatenate([episodes.observations, finals])
    obs_space = (_data_dict(episodes.observation_space, observations)
                 if isinstance(episodes.observation_space, DictObservations)
                 else _data_box(observations))
    act_space = (gym.spaces.Discrete(episodes.action_space.n)
                 if isinstance(episodes.action_space, DiscreteActions)
                 else _data_box(episodes.actions))
    return obs_space, act_space


def _final_observations(episodes: EpisodeSet, given: np.ndarray | None, source: str
                        ) -> np.ndarray:
    """(E, obs_dim) float32: ``given`` checked, or each episode's last observation repeated."""
    if given is None:
        ends = np.append(episodes.episode_starts[1:], episodes.num_transitions) - 1  # (E,)
        return episodes.observations[ends]
    finals = np.asarray(given, dtype=np.float32)
    if finals.ndim == 1 and episodes.obs_dim == 1:
        finals = finals[:, None]
    expected = (episodes.num_episodes, episodes.obs_dim)
    if finals.shape != expected:
        raise DatasetError(f"{source}: final_observations has shape {finals.shape}, expected "
                           f"{expected} (one per episode)")
    if not np.isfinite(finals).all():
        raise DatasetError(f"{source}: final_observations contains NaN or inf")
    return finals


def _make_env(env_id: str, episodes: EpisodeSet, source: str) -> gym.Env:
    from dtlab.envs import env_advice, make_env

    env = make_env(env_id)
    try:
        check_against_env(env, episodes.observation_space, episodes.action_space,
                          what=f"dataset {source}", exact_n=False,
                          advice=env_advice(episodes.provenance.env_id, env_id))
        _check_observation_space(env.observation_space, env_id)
    except BaseException:
        env.close()
        raise
    return env


def _data_box(data: np.ndarray) -> gym.spaces.Box:
    """A float32 Box spanning the per-dimension min/max of ``data`` (N, dim)."""
    return gym.spaces.Box(low=data.min(axis=0), high=data.max(axis=0), dtype=np.float32)


def _data_dict(spec: DictObservations, data: np.ndarray) -> gym.spaces.Dict:
    """A Dict of ``_data_box`` per key of ``spec``, over its columns of ``data`` (N, dim)."""
    return gym.spaces.Dict({k: _data_box(data[:, spec.columns([k])]) for k in spec.keys})


def _episode_buffers(episodes: EpisodeSet, finals: np.ndarray, obs_space: gym.Space,
                     act_dtype: np.dtype) -> list[EpisodeBuffer]:
    """One EpisodeBuffer per episode: T+1 observations (the final one appended), T of the rest;
    Dict observations split back into their keys (each reshaped to its Box)."""
    bounds = np.append(episodes.episode_starts, episodes.num_transitions)  # (E+1,)
    spec = episodes.observation_space
    buffers = []
    for e, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        obs = np.concatenate([episodes.observations[start:stop], finals[e:e + 1]])  # (T+1, obs_dim)
        if isinstance(spec, DictObservations):
            obs = {k: obs[:, spec.columns([k])].reshape(-1, *obs_space[k].shape).astype(
                obs_space[k].dtype) for k in spec.keys}
        else:
            obs = obs.astype(obs_space.dtype)
        buffers.append(EpisodeBuffer(
            observations=obs,
            actions=episodes.actions[start:stop].astype(act_dtype),  # (T, act_dim)
            rewards=episodes.rewards[start:stop],  # (T,) float32
            terminations=episodes.terminations[start:stop],  # (T,) bool
            truncations=episodes.truncations[start:stop],  # (T,) bool
        ))
    return buffers


def _algorithm_name(metadata: dict[str, Any]) -> str | None:
    """D4RL files record ``algorithm``; dtlab's collector records ``policies``."""
    if isinstance(metadata.get("algorithm"), str):
        return metadata["algorithm"]
    policies = metadata.get("policies")
    if isinstance(policies, list) and policies and all(isinstance(p, str) for p in policies):
        return ", ".join(policies)
    return None


def _description(episodes: EpisodeSet, finals_copied: bool, given: str | None) -> str:
    """``given`` (default: where the data came from), plus a note when final observations are
    copies."""
    text = given or (f"Written by dtlab {__version__} from {episodes.source}: "
                     f"{episodes.num_episodes} episodes, {episodes.num_transitions} steps.")
    if finals_copied:
        text += (" The final observation of each episode (observations[T]) is a copy of "
                 "observations[T-1]: the source did not record the observation after the last "
                 "step.")
    return text


def _move_into_place(built: Path, target: Path, overwrite: bool, source: str) -> None:
    """Rename the staged dataset directory to ``target`` (``atomic_path``: an old one is replaced
    whole, and put back if the rename fails)."""
    if target.exists() and not overwrite:  # created meanwhile by someone else
        raise DatasetError(f"{source}: dataset already exists at {target}; pass "
                           "overwrite=True to replace it")
    with atomic_path(target, directory=True) as tmp:
        os.replace(built, tmp)  # same file system: staging is inside the datasets root


@contextmanager
def _datasets_root(path: Path) -> Iterator[None]:
    """Point Minari's datasets root at ``path`` for the duration of the block."""
    old = os.environ.get(_ROOT_VAR)
    os.environ[_ROOT_VAR] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_ROOT_VAR, None)
        else:
            os.environ[_ROOT_VAR] = old


# ---- shared ------------------------------------------------------------------------------------
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
