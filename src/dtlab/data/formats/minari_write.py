"""Writing Minari datasets: an EpisodeSet as a local Minari dataset, with Minari's own writer
(``minari.create_dataset_from_buffers``), staged beside the datasets and renamed into place.
The layout, and how T observations become Minari's T + 1: dtlab.data.formats.minari, which
reads them back."""

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
from minari.namespace import create_namespace, list_local_namespaces
from minari.storage import get_dataset_path

from dtlab._version import __version__
from dtlab.atomic import atomic_path, dumps_json
from dtlab.data.episodes import EpisodeSet
from dtlab.data.formats._hdf5 import json_default
from dtlab.data.formats.minari import (_DTLAB_FINALS, _DTLAB_METADATA, _FINALS_COPIED,
                                       _ROOT_VAR, PREFIX, _check_id, _check_observation_space,
                                       _one_line)
from dtlab.errors import DatasetError, DtlabError
from dtlab.spaces import (DictObservations, DiscreteActions, ImageObservations,
                          check_against_env)


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
                           "(dtlab data convert --overwrite) to replace it")
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
                           "overwrite=True (dtlab data convert --overwrite) to replace it")
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
