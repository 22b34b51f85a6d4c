"""Behaviour agents for D4RL-style datasets: train SAC with Stable-Baselines3, keep snapshots.

D4RL built its MuJoCo datasets from SAC agents: "expert" from the fully trained policy, "medium"
from a snapshot reaching about a third of the expert's return, "medium-replay" from the replay
buffer up to that snapshot (Fu et al. 2020, section 5). ``train_behaviour`` reproduces that
protocol: it trains in chunks of ``eval_every`` steps, evaluates after each chunk, saves a snapshot
and the replay buffer, and records everything in the run's ``manifest.json`` (``RunManifest``,
read and written only here) so that a killed run resumes from its last snapshot.

Snapshots of SB3 are zip files containing pickles: they are loaded only from this run directory
(trusted, written by dtlab). The small artifacts meant to be shared -- the actor weights of the
medium and expert snapshots -- are exported to safetensors (``export_actor``, in the format of
``dtlab.behaviour.policies.write_actor``), which load without unpickling anything.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

from dtlab.atomic import atomic_path, dumps_json, write_text_atomic
from dtlab.behaviour.policies import SacActorWeights, write_actor
from dtlab.config import MAX_SEED, check_number
from dtlab.envs import describe_space, make_env
from dtlab.errors import ConfigError, EnvError

if TYPE_CHECKING:
    from dtlab.data.episodes import EpisodeSet

@dataclass(frozen=True)
class BehaviourConfig:
    """Train a SAC behaviour agent (Stable-Baselines3) with periodic evaluation and snapshots."""

    env: str
    """Gymnasium environment id, e.g. Hopper-v5."""
    out: str
    """Run directory: snapshots/, replay_buffer.pkl, manifest.json."""
    steps: int = 1_000_000
    """Total environment steps (D4RL trained its SAC agents for 1M steps)."""
    eval_every: int = 20_000
    """Evaluate and snapshot every this many steps."""
    eval_episodes: int = 10
    """Deterministic evaluation episodes per snapshot."""
    learning_starts: int = 10_000
    """Random-action steps before learning starts (SB3 zoo's MuJoCo setting)."""
    buffer_size: int = 1_000_000
    """Replay buffer capacity (SB3's default; medium-replay needs it to hold the whole run)."""
    seed: int = 0
    """Seed of SAC, the env and evaluation."""
    threads: int = 1
    """torch CPU threads for SAC updates."""

    def __post_init__(self) -> None:
        for name in ("steps", "eval_every", "eval_episodes", "buffer_size", "threads"):
            check_number(name, getattr(self, name), minimum=1, integer=True)
        check_number("learning_starts", self.learning_starts, minimum=0, integer=True)
        check_number("seed", self.seed, minimum=0, maximum=MAX_SEED, integer=True)


MANIFEST = "manifest.json"
ALGORITHM = "SAC (stable-baselines3, default hyperparameters)"


# ---- the run's manifest ------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """One evaluated snapshot, saved as ``snapshots/step_{step:08d}.zip``."""

    step: int  # environment steps trained
    return_mean: float  # deterministic evaluation return over the run's eval_episodes
    return_std: float
    seconds: float  # wall time of the training chunk that ended here (evaluation included)


@dataclass(frozen=True)
class RunManifest:
    """``OUT/manifest.json`` of a ``train_behaviour`` run (JSON, keys in this order)."""

    env_id: str
    algorithm: str
    seed: int
    eval_episodes: int
    snapshots: tuple[Snapshot, ...] = ()  # in training order

    @property
    def last_step(self) -> int:
        return self.snapshots[-1].step if self.snapshots else 0

    def to_json(self) -> str:
        return dumps_json(dataclasses.asdict(self))  # snapshots: a list of objects


def read_run_manifest(out: str | Path) -> RunManifest | None:
    """The manifest of the run in ``out`` (None when there is none yet).

    ConfigError naming the file when it is unreadable or not a train-behaviour manifest.
    """
    path = Path(out) / MANIFEST
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the behaviour run's manifest: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("snapshots"), list) \
            or not isinstance(raw.get("env_id"), str):
        raise ConfigError(f"{path}: not a dtlab train-behaviour manifest (needs 'env_id' and a "
                          "'snapshots' list)")
    try:
        snapshots = tuple(Snapshot(int(s["step"]), float(s["return_mean"]), float(s["return_std"]),
                                   float(s["seconds"])) for s in raw["snapshots"])
        return RunManifest(raw["env_id"], str(raw["algorithm"]), int(raw["seed"]),
                           int(raw["eval_episodes"]), snapshots)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: not a dtlab train-behaviour manifest ({type(exc).__name__}: "
                          f"{exc})") from None


def _write_run_manifest(out: Path, manifest: RunManifest) -> None:
    write_text_atomic(out / MANIFEST, manifest.to_json())


def pick_snapshots(manifest: RunManifest) -> dict[str, int]:
    """D4RL's choice, as {"expert": step, "medium": step}: expert = the best snapshot; medium = the
    one whose return is closest to a third of the best return. ConfigError without snapshots."""
    snaps = manifest.snapshots
    if not snaps:
        raise ConfigError("the behaviour run has no snapshots yet")
    best = max(snaps, key=lambda s: s.return_mean)
    target = best.return_mean / 3.0
    medium = min(snaps, key=lambda s: abs(s.return_mean - target))
    return {"expert": best.step, "medium": medium.step}


# ---- training ----------------------------------------------------------------------------------


def _evaluate(model, env_id: str, episodes: int, seed: int) -> tuple[float, float]:
    env = make_env(env_id)
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done, total = False, 0.0
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, r, terminated, truncated, _ = env.step(action)
            total += float(r)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return float(np.mean(returns)), float(np.std(returns))


def _check_buffer_at_step(buffer, step: int, run_dir: Path) -> None:
    """One env: replay-buffer row t is env step t, so a buffer saved with the snapshot of ``step``
    has ``step`` rows (modulo wrap-around). A mismatch means the run stopped between writing the
    snapshot, the buffer and the manifest (written in that order)."""
    size = buffer.buffer_size
    if buffer.n_envs != 1 or buffer.pos != step % size or bool(buffer.full) != (step >= size):
        rows = f"{size} (full, next row {buffer.pos})" if buffer.full else str(buffer.pos)
        raise ConfigError(
            f"{run_dir}: replay_buffer.pkl holds {rows} transitions, but the last snapshot in "
            f"{MANIFEST} is at step {step}: the run was interrupted between writing its snapshot, "
            f"replay buffer and manifest, so they do not belong together; train again in a new "
            f"run directory")


def _resume(out: Path, step: int, env: gym.Env):
    """The SAC model and replay buffer of the run in ``out`` at its last snapshot ``step``."""
    from stable_baselines3 import SAC

    model = SAC.load(out / "snapshots" / f"step_{step:08d}.zip", env=env, device="cpu")
    if not (out / "replay_buffer.pkl").exists():
        raise ConfigError(f"{out}: replay_buffer.pkl is missing; cannot resume the run")
    model.load_replay_buffer(out / "replay_buffer.pkl")
    buffer = model.replay_buffer
    _check_buffer_at_step(buffer, step, out)
    # learn() resets the env on resume, so the episode running at the snapshot ends here: flag its
    # last stored step as a time-limit cut (SB3's timeouts: done, but bootstrapped), or the replay
    # buffer would join it with the next episode.
    last = (buffer.pos - 1) % buffer.buffer_size
    if not buffer.dones[last, 0]:
        buffer.timeouts[last, 0] = True
        buffer.dones[last, 0] = True
    return model


def train_behaviour(cfg: BehaviourConfig, log=print) -> RunManifest:
    """Train (or resume) a SAC agent in ``cfg.out``; returns the run's manifest.

    EnvError for an env without Box actions; ConfigError when ``cfg.out`` holds another env's run,
    or a run whose snapshot, replay buffer and manifest do not belong together.
    """
    import torch
    from stable_baselines3 import SAC

    torch.set_num_threads(cfg.threads)
    env = make_env(cfg.env)
    if not isinstance(env.action_space, gym.spaces.Box):
        env.close()
        raise EnvError(f"{cfg.env}: SAC needs a continuous (Box) action space, got "
                       f"{describe_space(env.action_space)}; collect discrete-action data with "
                       "'dtlab collect --policy sb3:PATH' from a PPO or DQN agent instead")
    out = Path(cfg.out)
    snaps = out / "snapshots"
    snaps.mkdir(parents=True, exist_ok=True)
    manifest = read_run_manifest(out) or RunManifest(cfg.env, ALGORITHM, cfg.seed,
                                                     cfg.eval_episodes)
    if manifest.env_id != cfg.env:
        raise ConfigError(f"{out}: holds a run for {manifest.env_id}, not {cfg.env}")
    done_steps = manifest.last_step
    if done_steps:
        model = _resume(out, done_steps, env)
        log(f"resumed at step {done_steps} from {snaps}")
    else:
        model = SAC("MlpPolicy", env, seed=cfg.seed, device="cpu", verbose=0,
                    learning_starts=cfg.learning_starts, buffer_size=cfg.buffer_size)
    while done_steps < cfg.steps:
        chunk = min(cfg.eval_every, cfg.steps - done_steps)
        t0 = time.perf_counter()
        model.learn(chunk, reset_num_timesteps=False, progress_bar=False)
        done_steps = int(model.num_timesteps)
        mean, std = _evaluate(model, cfg.env, cfg.eval_episodes, seed=cfg.seed + 10_000)
        # Temporary names keep the destination's suffix, so SB3 saves under exactly that name.
        with atomic_path(snaps / f"step_{done_steps:08d}.zip") as tmp:
            model.save(tmp)
        with atomic_path(out / "replay_buffer.pkl") as tmp:
            model.save_replay_buffer(tmp)
        snapshot = Snapshot(done_steps, mean, std, time.perf_counter() - t0)
        manifest = dataclasses.replace(manifest, snapshots=(*manifest.snapshots, snapshot))
        _write_run_manifest(out, manifest)
        log(f"step {done_steps}: return {mean:.1f} +- {std:.1f} "
            f"({chunk / (time.perf_counter() - t0):.0f} steps/s)")
    env.close()
    return manifest


# ---- what a run yields -------------------------------------------------------------------------


def _weight_and_bias(linear) -> tuple[np.ndarray, np.ndarray]:
    """A torch ``nn.Linear``'s weight (out, in) and bias (out,) as numpy arrays."""
    return linear.weight.detach().cpu().numpy(), linear.bias.detach().cpu().numpy()


def export_actor(snapshot: str | Path, out: str | Path, *, env_id: str,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write a SAC snapshot's actor weights (what acting needs, ~0.3 MB for 256x256) as a SAC
    actor file (``dtlab.behaviour.policies.write_actor``), with the env id, the action bounds, the
    snapshot's file name and ``extra`` (JSON-encoded unless strings) as metadata. ``snapshot``: an
    SB3 zip written by ``train_behaviour`` (trusted: our own file). ConfigError for gSDE actors."""
    from stable_baselines3 import SAC

    model = SAC.load(snapshot, device="cpu")
    actor = model.actor
    if actor.use_sde:
        raise ConfigError(f"{snapshot}: gSDE actors are not supported")
    linear = sorted({int(k.split(".")[0]) for k in actor.latent_pi.state_dict()})
    space = model.action_space
    meta = {"env_id": env_id, "algorithm": "SAC", "source_snapshot": Path(snapshot).name,
            **{k: json.dumps(v) if not isinstance(v, str) else v for k, v in (extra or {}).items()}}
    return write_actor(out, SacActorWeights(
        hidden=tuple(_weight_and_bias(actor.latent_pi[i]) for i in linear),
        mu=_weight_and_bias(actor.mu), log_std=_weight_and_bias(actor.log_std),
        low=space.low, high=space.high, metadata=meta))


def replay_until_medium(run_dir: str | Path, env_id: str, *, trust: bool = False,
                        medium_step: int | None = None) -> EpisodeSet:
    """D4RL's medium-replay: every transition the SAC agent collected up to the medium snapshot,
    read from the run's replay buffer. ``medium_step``: that snapshot's step, one of the run's
    snapshot steps (a preset's, fixed by its committed manifest, or the user's ``--medium-step``);
    None: picked from the run's own snapshots (``pick_snapshots``), which needs the run to have
    gone on past its medium snapshot.

    The buffer is a pickle written by SB3: loading it can run code, so it is read only with
    ``trust=True`` (``--trust-pickle``), for runs you made yourself. ConfigError otherwise, and
    when the run, its manifest and its buffer do not fit together.
    """
    import pickle

    from stable_baselines3.common.save_util import load_from_pkl

    from dtlab.data.episodes import EpisodeSet
    from dtlab.normalizer import from_unit_interval

    run_dir = Path(run_dir)
    manifest = read_run_manifest(run_dir)
    pkl = run_dir / "replay_buffer.pkl"
    if manifest is None or not manifest.snapshots or not pkl.exists():
        raise ConfigError(f"{run_dir}: not a dtlab train-behaviour run (no manifest or replay buffer)")
    if manifest.env_id != env_id:
        raise ConfigError(f"{run_dir}: behaviour run is for {manifest.env_id}, not {env_id}")
    if not trust:
        raise ConfigError(f"{pkl}: the replay buffer is a pickle, which can run code when loaded; "
                          "pass --trust-pickle if you made this behaviour run yourself")
    if medium_step is None:
        medium_step = pick_snapshots(manifest)["medium"]
    steps = [s.step for s in manifest.snapshots]
    if medium_step not in steps:
        raise ConfigError(f"{run_dir}: no snapshot at step {medium_step} (--medium-step); its "
                          f"snapshots are at steps {', '.join(map(str, steps))}")
    try:
        buffer = load_from_pkl(pkl)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{pkl}: cannot load the replay buffer: {exc}") from None
    if buffer.n_envs != 1:
        raise ConfigError(f"{pkl}: expected a single-env replay buffer, got {buffer.n_envs} envs")
    if buffer.full and (buffer.pos != 0 or buffer.buffer_size < manifest.last_step):
        raise ConfigError(f"{run_dir}: the replay buffer wrapped around; the transitions up to the "
                          "medium snapshot are no longer all in it")
    if not buffer.full and buffer.pos < medium_step:
        raise ConfigError(f"{pkl}: holds {buffer.pos} transitions, fewer than the medium "
                          f"snapshot's {medium_step} steps: it does not belong to this run's manifest")
    n = medium_step  # one env: buffer row t is environment step t
    obs = buffer.observations[:n, 0]  # (n, obs_dim)
    scaled = buffer.actions[:n, 0]  # (n, act_dim): SAC stores actions scaled to [-1, 1]
    low, high = buffer.action_space.low, buffer.action_space.high
    actions = from_unit_interval(scaled, low, high)
    rewards = buffer.rewards[:n, 0]
    dones = buffer.dones[:n, 0].astype(bool)
    timeouts = buffer.timeouts[:n, 0].astype(bool)  # time-limit ends (SB3 handle_timeout_termination)
    return EpisodeSet.from_flags(obs, actions, rewards, dones & ~timeouts, timeouts,
                                 source=f"<replay buffer {run_dir}>",
                                 metadata={"env_id": env_id, "policy_training_steps": medium_step,
                                           "policies": ["sac replay buffer up to the medium snapshot"]})
