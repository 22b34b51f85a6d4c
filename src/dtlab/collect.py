"""Episode collection: roll a behaviour policy out in Gymnasium and get a D4RL-style ``EpisodeSet``.

``collect_episodes`` runs one plain (non-vectorized) Gymnasium env and records, for an episode of
T steps, T observations (the state *before* each action: the D4RL view), T actions, T rewards and
Gymnasium's ``terminated`` / ``truncated`` flags separately. Observations are recorded as the
env's observation space says (``dtlab.spaces.observation_space_from_gym``): vectors as float32;
frame stacks (stack, H, W) as their newest frame only, (H, W) uint8, since the previous ones are
the frames of earlier steps (samplers stack them again by index); Dict observations with all
their keys, flattened in the space's order (training picks keys with ``obs_keys``). ``collect_sharded`` splits a
transition budget into independently seeded shards collected in parallel processes.

Policies follow ``dtlab.behaviour.policies.BehaviourPolicy`` (check_env / reset / act); this
module only drives them.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gymnasium
import numpy as np

from dtlab._version import __version__
from dtlab.config import MAX_SEED, check_number
from dtlab.data.episodes import EpisodeSet
from dtlab.envs import describe_space, make_env
from dtlab.errors import ConfigError, EnvError
from dtlab.spaces import (ImageObservations, ObservationSpec, as_observation_array,
                          observation_space_from_gym)

if TYPE_CHECKING:
    from dtlab.behaviour.policies import BehaviourPolicy


def derived_stream(seed: int, key: int) -> np.random.Generator:
    """An independent random stream derived from ``seed``: ``SeedSequence(seed, spawn_key=(key,))``.

    Not ``default_rng(seed)``: that is exactly the stream Gymnasium's ``reset(seed=seed)`` uses
    (``gymnasium.utils.seeding.np_random``), so its numbers would repeat the env's initial states.
    Keys in use: 1, the policies' generator in ``collect_episodes``; 2, the per-episode qualities
    of ``dtlab.behaviour.scripted.pendulum_mixed_dataset``.
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key,)))


_POLICY_STREAM = 1  # collect_episodes: the generator handed to policy.reset

_SEEDING = ("env.reset(seed=seed) before the first episode, env.reset() (env RNG continues) before "
            "the others; policies draw from one generator SeedSequence(seed, spawn_key=(1,)) "
            "passed to policy.reset at every episode start")


@dataclass(frozen=True)
class _Episode:
    """One recorded episode of T steps (the D4RL view)."""

    observations: np.ndarray  # (T, obs_dim) float32, or (T, H, W) uint8 frames: before each action
    actions: np.ndarray  # (T, act_dim) float32, or (T,) int64 for a Discrete action space
    rewards: np.ndarray  # (T,) float32
    terminations: np.ndarray  # (T,) bool
    truncations: np.ndarray  # (T,) bool
    final_observation: np.ndarray  # (obs_dim,) float32 or (H, W) uint8: after the last step


def _action_kind(env_id: str, space: gymnasium.spaces.Space) -> bool:
    """True for a Discrete action space (starting at 0), False for a Box; EnvError otherwise."""
    discrete = isinstance(space, gymnasium.spaces.Discrete)
    if discrete and int(space.start) != 0:
        raise EnvError(f"{env_id}: Discrete action spaces must start at 0, got "
                       f"{describe_space(space)}")
    if not (discrete or isinstance(space, gymnasium.spaces.Box)):
        raise EnvError(f"{env_id}: only Box and Discrete action spaces are supported, "
                       f"got {describe_space(space)}")
    return discrete


def _record(spec: ObservationSpec, observation) -> np.ndarray:
    """What is stored of one env observation: a frame stack's newest frame (H, W) uint8, a Dict
    flattened, a vector as float32."""
    array = as_observation_array(spec, observation)
    return array[-1] if isinstance(spec, ImageObservations) else array


def _run_episode(env: gymnasium.Env, env_id: str, policy: BehaviourPolicy, *, reset_seed: int | None,
                 discrete: bool, max_steps: int | None, spec: ObservationSpec) -> _Episode:
    """Play one episode from ``env.reset(seed=reset_seed)``; an episode cut at ``max_steps`` (the
    rest of a transition budget) is marked truncated unless it terminated on that step."""
    space = env.action_space
    observations, actions, rewards, terminations, truncations = [], [], [], [], []
    obs, _ = env.reset(seed=reset_seed)
    while True:
        raw = np.asarray(policy.act(obs))
        if discrete and not (raw.dtype.kind in "iu" or np.array_equal(raw, np.round(raw))):
            raise EnvError(f"{env_id}: policy {policy.name} returned {raw.tolist()} for a "
                           f"{describe_space(space)} action space (needs an integer index)")
        action = raw.astype(np.int64 if discrete else np.float32).reshape(space.shape)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        observations.append(_record(spec, obs))  # state before the action
        actions.append(action)
        rewards.append(float(reward))
        terminations.append(bool(terminated))
        truncations.append(bool(truncated))
        if terminated or truncated:
            break
        if max_steps is not None and len(rewards) >= max_steps:
            truncations[-1] = True  # cut off by the budget
            break
        obs = next_obs
    return _Episode(np.stack(observations), np.stack(actions), np.asarray(rewards, dtype=np.float32),
                    np.asarray(terminations), np.asarray(truncations), _record(spec, next_obs))


def collect_episodes(
    env_id: str,
    policy: BehaviourPolicy | Callable[[int], BehaviourPolicy],
    *,
    num_episodes: int | None = None,
    num_transitions: int | None = None,
    seed: int = 0,
    metadata: dict | None = None,
) -> EpisodeSet:
    """Roll out ``policy`` in ``make_env(env_id)`` and return the episodes (D4RL view).

    Give exactly one budget: ``num_episodes`` complete episodes, or ``num_transitions`` steps (the
    last episode is cut at the budget and marked truncated, unless it terminated on that step).

    ``policy`` is a ``BehaviourPolicy`` used for every episode, or a callable that receives the
    episode index (0, 1, ...) and returns the policy for that episode (e.g. to vary quality).
    Each distinct policy (by name) gets ``check_env(env)`` before it first acts.

    Seeding (deterministic for a given ``seed``): ``env.reset(seed=seed)`` before the first episode
    and ``env.reset()`` before the others, so initial states follow the env's own RNG as in
    Gymnasium's usual practice; all policy randomness comes from one generator derived from
    ``seed`` (independent of the env's), handed to ``policy.reset`` at every episode start.
    Observations are recorded as the module docstring says (frame stacks: the newest frame).

    ``metadata`` adds caller provenance to what is recorded here (env_id, gymnasium and dtlab
    versions, policy names, seed, seeding scheme, episode-return statistics, counts); it may not
    override those keys. ConfigError for a bad budget, seed or metadata; EnvError for an unknown env, an
    unsupported action space, or a policy that does not fit the env.
    """
    if (num_episodes is None) == (num_transitions is None):
        raise ConfigError("collect_episodes needs exactly one of num_episodes, num_transitions")
    budget = num_episodes if num_episodes is not None else num_transitions
    if budget < 1:
        raise ConfigError(f"collection budget must be at least 1, got {budget}")
    check_number("seed", seed, minimum=0, maximum=MAX_SEED, integer=True)
    make_policy = policy if not callable(getattr(policy, "act", None)) else (lambda i: policy)

    env = make_env(env_id)
    recorded: list[_Episode] = []
    steps = 0
    names: list[str] = []  # unique policy names, first use order
    episode_policy: list[int] = []  # (E,) index into names
    policy_rng = derived_stream(seed, _POLICY_STREAM)
    try:
        discrete = _action_kind(env_id, env.action_space)
        spec = observation_space_from_gym(env.observation_space)
        while (len(recorded) < num_episodes) if num_episodes is not None else (steps < num_transitions):
            pol = make_policy(len(recorded))
            if pol.name not in names:
                pol.check_env(env)
                names.append(pol.name)
            episode_policy.append(names.index(pol.name))
            pol.reset(policy_rng)
            episode = _run_episode(
                env, env_id, pol, reset_seed=seed if not recorded else None, discrete=discrete,
                max_steps=None if num_transitions is None else num_transitions - steps, spec=spec)
            recorded.append(episode)
            steps += len(episode.rewards)
    finally:
        env.close()

    lengths = [len(e.rewards) for e in recorded]
    episodes = EpisodeSet(
        *(np.concatenate([getattr(e, f) for e in recorded]) for f in (
            "observations",  # (N, obs_dim)
            "actions",  # (N, act_dim), or (N,) int64 if discrete
            "rewards", "terminations", "truncations")),  # (N,) each
        np.cumsum([0, *lengths[:-1]], dtype=np.int64),  # (E,) episode_starts
        source=f"<collected from {env_id}>",
        final_observations=np.stack([e.final_observation for e in recorded]),  # (E, obs_dim)
        observation_space=spec,
    )
    provenance: dict[str, Any] = {
        "env_id": env_id,
        "gymnasium_version": gymnasium.__version__,
        "dtlab_version": __version__,
        "policies": names,
        "seed": int(seed),
        "seeding": _SEEDING,
        **collection_counts(episodes),
    }
    if len(names) > 1:
        provenance["episode_policy"] = episode_policy  # which entry of "policies" ran each episode
    clash = sorted(set(metadata or {}) & set(provenance))
    if clash:
        raise ConfigError(f"metadata may not override collected provenance keys {clash}")
    return episodes.with_metadata({**provenance, **(metadata or {})})


def collection_counts(episodes: EpisodeSet) -> dict[str, Any]:
    """Size and episode-return statistics (float64), recorded with every collected dataset."""
    return {"num_episodes": episodes.num_episodes, "num_transitions": episodes.num_transitions,
            "episode_return": episodes.return_stats.to_json()}


# ---- sharded collection ------------------------------------------------------------------------

# (env_id, policy, shares, seeds): the collection a pool worker serves, set by _start_worker.
_ShardJob = tuple[str, Any, list[int], list[int]]
_worker_job: _ShardJob | None = None


def _start_worker(job: _ShardJob) -> None:
    global _worker_job
    _worker_job = job


def _collect_shard(job: _ShardJob, i: int) -> tuple:
    """Shard ``i`` of ``job``, as plain arrays and metadata (what crosses the pipe)."""
    env_id, policy, shares, seeds = job
    d = collect_episodes(env_id, policy, num_transitions=shares[i], seed=seeds[i])
    return d.observations, d.actions, d.rewards, d.terminations, d.truncations, d.episode_starts, \
        dict(d.metadata), d.final_observations, d.observation_space


def _collect_worker_shard(i: int) -> tuple:
    return _collect_shard(_worker_job, i)


def collect_sharded(env_id: str, policy, *, num_transitions: int, seed: int, shards: int,
                    processes: int | None = None, metadata: dict | None = None) -> EpisodeSet:
    """``collect_episodes`` split into ``shards`` independent parts collected in parallel
    processes (at most ``processes``, default the core count) and concatenated in shard order.

    Shard i collects its share of the transitions with seed ``SeedSequence([seed, i])``, so the
    result depends on (seed, shards) only, not on how many processes ran. Each shard's last
    episode is cut at its share (marked truncated), as D4RL's files end with a cut-off episode.

    Workers are forked where the platform can (the policy, or a policy-making callable, is
    inherited, not pickled); elsewhere ``policy`` must be picklable. An exception in a shard is
    raised here once the shards already running have finished. ConfigError unless
    1 <= shards <= num_transitions.
    """
    if shards < 1 or num_transitions < shards:
        raise ConfigError(f"need 1 <= shards <= transitions, got {shards} shards, {num_transitions}")
    shares = [num_transitions // shards + (i < num_transitions % shards) for i in range(shards)]
    seeds = [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(shards)]
    job = (env_id, policy, shares, seeds)

    processes = min(shards, processes or os.cpu_count() or 1)
    if processes <= 1:
        raw = [_collect_shard(job, i) for i in range(shards)]
    else:
        fork = "fork" in multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if fork else None)
        with ProcessPoolExecutor(processes, mp_context=context, initializer=_start_worker,
                                 initargs=(job,)) as pool:
            futures = [pool.submit(_collect_worker_shard, i) for i in range(shards)]
            try:
                raw = [f.result() for f in futures]
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
    parts = [EpisodeSet(*arrays, metadata=meta, final_observations=final, observation_space=spec)
             for *arrays, meta, final, spec in raw]
    first = parts[0].metadata
    data = EpisodeSet.concatenate(parts, source=f"<collected from {env_id}>", metadata={
        **{k: v for k, v in first.items() if k not in ("seed", "num_episodes", "num_transitions",
                                                        "episode_return")},
        "seed": int(seed), "shards": shards, "shard_seeds": seeds,
        "seeding": f"{shards} shards, shard i seeded with SeedSequence([seed, i]); "
                   + str(first.get("seeding", "")),
        **(metadata or {})})
    return data.with_metadata(collection_counts(data))
