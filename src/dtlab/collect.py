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
from typing import TYPE_CHECKING, Any, Literal

import gymnasium
import numpy as np

from dtlab._version import __version__
from dtlab.config import MAX_SEED, check_number
from dtlab.data.episodes import EpisodeSet
from dtlab.envs import describe_space, make_env
from dtlab.errors import ConfigError, EnvError
from dtlab.spaces import (ImageObservations, ObservationSpec, as_observation_array,
                          observation_space_from_gym)
from dtlab.data.formats import MINARI_PREFIX


if TYPE_CHECKING:
    from dtlab.behaviour.policies import BehaviourPolicy


# ---- the command's config -------------------------------------------------------------------------
_POLICY_CHOICES = ("random, actor:PATH, sb3:PATH, pendulum-swingup, pendulum-mixed, "
                   "pointmaze-goal")


@dataclass(frozen=True)
class PolicySpec:
    """A parsed ``CollectConfig.policy``: which behaviour policy, and its file for actor/sb3."""

    kind: Literal["random", "actor", "sb3", "pendulum-swingup", "pendulum-mixed",
                  "pointmaze-goal"]
    path: str | None = None  # the weights file of actor:PATH (safetensors) and sb3:PATH (zip)


def parse_policy(text: str) -> PolicySpec:
    """``random``, ``actor:PATH``, ``sb3:PATH``, ``pendulum-swingup``, ``pendulum-mixed`` or
    ``pointmaze-goal`` -> PolicySpec; ConfigError naming the ``policy`` field for anything else."""
    from dtlab.errors import ConfigError

    if text in ("random", "pendulum-swingup", "pendulum-mixed", "pointmaze-goal"):
        return PolicySpec(text)
    kind, sep, path = text.partition(":")
    if sep and kind in ("actor", "sb3"):
        if not path:
            raise ConfigError(f"policy {text} needs a file: {kind}:PATH")
        return PolicySpec(kind, path)
    raise ConfigError(f"unknown policy '{text}' ({_POLICY_CHOICES})")


@dataclass(frozen=True)
class CollectConfig:
    """Roll out a behaviour policy in a Gymnasium env and write a D4RL-style dataset file."""

    out: str
    """Dataset file to write (HDF5), or minari:<id> for a Minari dataset."""
    env: str | None = None
    """Gymnasium environment id, e.g. Hopper-v5 (implied by --preset)."""
    preset: str | None = None
    """Regenerate a D4RL-style reference dataset, 1M transitions by default, deterministically:
    <hopper|halfcheetah|walker2d>-<random|medium|expert|medium-expert|medium-replay>-v5. random
    needs nothing; medium/expert use behaviour-policy weights under src/dtlab/presets/<env>/
    (made with dtlab train-behaviour --export; committed: hopper-v5, halfcheetah-v5, walker2d-v5)."""
    policy: str = "random"
    """Behaviour policy: random (uniform over a Box, or over a Discrete's actions); actor:PATH
    (SAC actor weights, safetensors); sb3:PATH (a Stable-Baselines3 zip: SAC/TD3/PPO/... for Box
    actions, PPO/DQN/A2C for Discrete ones, also on ALE/<Game>-v5; needs --trust-pickle);
    pendulum-swingup (scripted, Pendulum-v1; --quality degrades it); pendulum-mixed (the
    quickstart's mixed-quality data); pointmaze-goal (scripted: straight at the goal, stalling at
    walls; PointMaze envs of gymnasium-robotics; --quality degrades it)."""
    deterministic: bool = False
    """Act with the policy's mean action instead of sampling (D4RL sampled)."""
    trust_pickle: bool = False
    """Allow loading an sb3:PATH zip or a --behaviour-run replay buffer: they contain pickles,
    which can run code when loaded."""
    vecnormalize: str | None = None
    """sb3:PATH only: Stable-Baselines3 VecNormalize statistics (VecNormalize.save, a pickle: needs
    --trust-pickle) the agent was trained with; it acts on normalized observations, the dataset
    records raw ones. Default: vecnormalize.pkl beside the zip, when there is one."""
    behaviour_run: str | None = None
    """Run directory of dtlab train-behaviour (for the medium-replay preset: its replay buffer,
    a pickle, so it also needs --trust-pickle)."""
    medium_step: int | None = None
    """medium-replay only: the step of --behaviour-run's snapshot that ends the data, one of the
    steps in its manifest.json. Default: the preset's step when the run is the preset's own, else
    D4RL's rule (the snapshot closest to a third of the run's best return), which needs a run that
    went on past its medium snapshot."""
    quality: float = 1.0
    """Quality in [0, 1] of the scripted pendulum-swingup and pointmaze-goal policies."""
    episodes: int | None = None
    """Collect this many complete episodes."""
    transitions: int | None = None
    """Or collect this many transitions (the last episode is cut there and marked truncated);
    presets default to D4RL's 1M."""
    seed: int = 0
    """Seed of the env resets and of the policy's randomness."""
    format: Literal["d4rl", "native", "minari"] | None = None
    """File layout: D4RL's HDF5 keys, dtlab's native HDF5, or a Minari dataset (default: minari
    for --out minari:<id>, else d4rl)."""

    def __post_init__(self) -> None:
        """Refuse conflicting or meaningless options before anything is collected (ConfigError).
        The preset's own env is checked by the caller (dtlab.presets.parse_preset)."""
        from dtlab.errors import ConfigError

        for name in ("episodes", "transitions", "medium_step"):
            check_number(name, getattr(self, name), minimum=1, integer=True)
        check_number("quality", self.quality, minimum=0, maximum=1)
        check_number("seed", self.seed, minimum=0, maximum=MAX_SEED, integer=True)
        to_minari = self.out.startswith(MINARI_PREFIX)
        if to_minari and self.out_format != "minari":
            raise ConfigError(f"out {self.out} is a Minari dataset, but format is {self.out_format}")
        if self.out_format == "minari" and not to_minari:
            raise ConfigError(f"format minari writes a Minari dataset: give out {MINARI_PREFIX}<id>, "
                              f"not {self.out}")
        kind = parse_policy(self.policy).kind
        if self.medium_step is not None and not (self.preset or "").rsplit("-", 1)[0].endswith(
                "-medium-replay"):
            raise ConfigError(f"--medium-step is for a medium-replay --preset, not "
                              f"{self.preset or 'a --policy collection'}")
        if self.vecnormalize is not None and kind != "sb3":
            raise ConfigError(f"--vecnormalize is for --policy sb3:PATH, not {kind}")
        if self.preset:
            if self.episodes is not None:
                raise ConfigError("presets are sized by transitions (D4RL's 1M by default), not "
                                  "episodes")
            return
        if kind == "pendulum-mixed" and self.transitions is not None:
            raise ConfigError("policy pendulum-mixed collects whole episodes: give episodes, not "
                              "transitions")
        if self.env is None:
            raise ConfigError("give env (or preset)")
        if kind in ("pendulum-mixed", "pendulum-swingup") and self.env != "Pendulum-v1":
            raise ConfigError(f"policy {kind} is for Pendulum-v1")
        if kind != "pendulum-mixed" and (self.episodes is None) == (self.transitions is None):
            raise ConfigError("give episodes or transitions" if self.episodes is None else
                              "give episodes or transitions, not both")

    @property
    def policy_spec(self) -> PolicySpec:
        """``policy`` parsed (it was validated when the config was made)."""
        return parse_policy(self.policy)

    @property
    def out_format(self) -> Literal["d4rl", "native", "minari"]:
        """``format``, or its default for ``out``: minari for minari:<id>, else d4rl."""
        return self.format or ("minari" if self.out.startswith(MINARI_PREFIX) else "d4rl")


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
    _check_budget(num_episodes, num_transitions, seed)
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

    episodes = _as_episode_set(recorded, env_id, spec)
    return episodes.with_metadata(_provenance(env_id, names, episode_policy, seed, episodes,
                                              metadata))


def _check_budget(num_episodes: int | None, num_transitions: int | None, seed: int) -> None:
    """ConfigError unless exactly one budget is given, at least 1, and the seed is valid."""
    if (num_episodes is None) == (num_transitions is None):
        raise ConfigError("collect_episodes needs exactly one of num_episodes, num_transitions")
    budget = num_episodes if num_episodes is not None else num_transitions
    if budget < 1:
        raise ConfigError(f"collection budget must be at least 1, got {budget}")
    check_number("collect_episodes's seed", seed, minimum=0, maximum=MAX_SEED, integer=True)


def _as_episode_set(recorded: list[_Episode], env_id: str, spec: ObservationSpec) -> EpisodeSet:
    """The recorded episodes as one EpisodeSet, in the order they ran."""
    lengths = [len(e.rewards) for e in recorded]
    return EpisodeSet(
        *(np.concatenate([getattr(e, f) for e in recorded]) for f in (
            "observations",  # (N, obs_dim)
            "actions",  # (N, act_dim), or (N,) int64 if discrete
            "rewards", "terminations", "truncations")),  # (N,) each
        np.cumsum([0, *lengths[:-1]], dtype=np.int64),  # (E,) episode_starts
        source=f"<collected from {env_id}>",
        final_observations=np.stack([e.final_observation for e in recorded]),  # (E, obs_dim)
        observation_space=spec,
    )


def _provenance(env_id: str, names: list[str], episode_policy: list[int], seed: int,
                episodes: EpisodeSet, metadata: dict | None) -> dict[str, Any]:
    """What collect_episodes records with the data, the caller's ``metadata`` added;
    ConfigError when ``metadata`` would override one of its keys."""
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
    return {**provenance, **(metadata or {})}


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
