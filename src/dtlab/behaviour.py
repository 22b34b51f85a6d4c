"""Behaviour agents for D4RL-style datasets: train SAC with Stable-Baselines3, keep snapshots.

D4RL built its MuJoCo datasets from SAC agents: "expert" from the fully trained policy, "medium"
from a snapshot reaching about a third of the expert's return, "medium-replay" from the replay
buffer up to that snapshot (Fu et al. 2020, section 5). ``train_behaviour`` reproduces that
protocol: it trains in chunks of ``eval_every`` steps, evaluates after each chunk, saves a snapshot
and the replay buffer, and records everything in ``manifest.json`` so that a killed run resumes
from its last snapshot.

Snapshots of SB3 are zip files containing pickles: they are loaded only from this run directory
(trusted, written by dtlab). The small artifacts meant to be shared -- the actor weights of the
medium and expert snapshots -- are exported to safetensors (``export_actor``), which load without
unpickling anything.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

from dtlab.atomic import replace_into_place, write_text_atomic
from dtlab.config import BehaviourConfig
from dtlab.envs import describe_space, make_env
from dtlab.errors import ConfigError, EnvError

if TYPE_CHECKING:
    from dtlab.data.episodes import EpisodeSet

MANIFEST = "manifest.json"


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


def read_manifest(out: str | Path) -> dict[str, Any]:
    """The run's manifest ({} when there is none yet); ConfigError when it is unreadable."""
    path = Path(out) / MANIFEST
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the behaviour run's manifest: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("snapshots"), list) \
            or not isinstance(manifest.get("env_id"), str):
        raise ConfigError(f"{path}: not a dtlab train-behaviour manifest (needs 'env_id' and a "
                          "'snapshots' list)")
    return manifest


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


def train_behaviour(cfg: BehaviourConfig, log=print) -> dict[str, Any]:
    """Train (or resume) a SAC agent; returns the manifest."""
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
    manifest = read_manifest(out) or {
        "env_id": cfg.env, "algorithm": "SAC (stable-baselines3, default hyperparameters)",
        "seed": cfg.seed, "eval_episodes": cfg.eval_episodes, "snapshots": []}
    if manifest["env_id"] != cfg.env:
        raise ConfigError(f"{out}: holds a run for {manifest['env_id']}, not {cfg.env}")
    done_steps = manifest["snapshots"][-1]["step"] if manifest["snapshots"] else 0
    if done_steps:
        model = SAC.load(snaps / f"step_{done_steps:08d}.zip", env=env, device="cpu")
        if not (out / "replay_buffer.pkl").exists():
            raise ConfigError(f"{out}: replay_buffer.pkl is missing; cannot resume the run")
        model.load_replay_buffer(out / "replay_buffer.pkl")
        buffer = model.replay_buffer
        _check_buffer_at_step(buffer, done_steps, out)
        # learn() resets the env on resume, so the episode running at the snapshot ends here:
        # flag its last stored step as a time-limit cut (SB3's timeouts: done, but bootstrapped),
        # or the replay buffer would join it with the next episode.
        last = (buffer.pos - 1) % buffer.buffer_size
        if not buffer.dones[last, 0]:
            buffer.timeouts[last, 0] = True
            buffer.dones[last, 0] = True
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
        name = f"step_{done_steps:08d}.zip"
        tmp = snaps / f".tmp-{name}"  # ends in .zip, so SB3 saves under exactly this name
        model.save(tmp)
        tmp.replace(snaps / name)
        model.save_replay_buffer(out / ".replay_buffer.tmp.pkl")
        (out / ".replay_buffer.tmp.pkl").replace(out / "replay_buffer.pkl")
        manifest["snapshots"].append({"step": done_steps, "return_mean": mean, "return_std": std,
                                      "seconds": time.perf_counter() - t0})
        write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2))
        log(f"step {done_steps}: return {mean:.1f} +- {std:.1f} "
            f"({chunk / (time.perf_counter() - t0):.0f} steps/s)")
    env.close()
    return manifest


def pick_snapshots(manifest: dict[str, Any]) -> dict[str, int]:
    """D4RL's choice: expert = the best snapshot; medium = the one whose return is closest to a
    third of the best return."""
    snaps = manifest["snapshots"]
    if not snaps:
        raise ConfigError("the behaviour run has no snapshots yet")
    best = max(snaps, key=lambda s: s["return_mean"])
    target = best["return_mean"] / 3.0
    medium = min(snaps, key=lambda s: abs(s["return_mean"] - target))
    return {"expert": best["step"], "medium": medium["step"]}


def export_actor(snapshot: str | Path, out: str | Path, *, env_id: str,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write a SAC snapshot's actor weights (what acting needs, ~0.3 MB for 256x256) to
    safetensors, with the env id and action bounds as metadata. ``snapshot``: an SB3 zip written by
    ``train_behaviour`` (trusted: our own file)."""
    from safetensors.numpy import save_file
    from stable_baselines3 import SAC

    model = SAC.load(snapshot, device="cpu")
    actor = model.actor
    if actor.use_sde:
        raise ConfigError(f"{snapshot}: gSDE actors are not supported")
    weights = {f"latent_pi.{k}": v.cpu().numpy() for k, v in actor.latent_pi.state_dict().items()}
    weights.update({f"mu.{k}": v.cpu().numpy() for k, v in actor.mu.state_dict().items()})
    weights.update({f"log_std.{k}": v.cpu().numpy() for k, v in actor.log_std.state_dict().items()})
    space = model.action_space
    meta = {"env_id": env_id, "algorithm": "SAC", "action_low": json.dumps(space.low.tolist()),
            "action_high": json.dumps(space.high.tolist()), "source_snapshot": Path(snapshot).name,
            **{k: json.dumps(v) if not isinstance(v, str) else v for k, v in (extra or {}).items()}}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        save_file(weights, str(tmp), metadata=meta)
        replace_into_place(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def replay_until_medium(run_dir: str | Path, env_id: str, *, trust: bool = False) -> "EpisodeSet":
    """D4RL's medium-replay: every transition the SAC agent collected up to the medium snapshot,
    read from the run's replay buffer.

    The buffer is a pickle written by SB3: loading it can run code, so it is read only with
    ``trust=True`` (``--trust-pickle``), for runs you made yourself.
    """
    import pickle

    from stable_baselines3.common.save_util import load_from_pkl

    from dtlab.data.episodes import EpisodeSet
    from dtlab.normalizer import from_unit_interval

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    pkl = run_dir / "replay_buffer.pkl"
    if not manifest.get("snapshots") or not pkl.exists():
        raise ConfigError(f"{run_dir}: not a dtlab train-behaviour run (no manifest or replay buffer)")
    if manifest["env_id"] != env_id:
        raise ConfigError(f"{run_dir}: behaviour run is for {manifest['env_id']}, not {env_id}")
    if not trust:
        raise ConfigError(f"{pkl}: the replay buffer is a pickle, which can run code when loaded; "
                          "pass --trust-pickle if you made this behaviour run yourself")
    medium_step = pick_snapshots(manifest)["medium"]
    try:
        buffer = load_from_pkl(pkl)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{pkl}: cannot load the replay buffer: {exc}") from None
    if buffer.n_envs != 1:
        raise ConfigError(f"{pkl}: expected a single-env replay buffer, got {buffer.n_envs} envs")
    if buffer.full and (buffer.pos != 0 or buffer.buffer_size < manifest["snapshots"][-1]["step"]):
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


def _policy_returns(env_id: str, policy, episodes: int, seed: int) -> dict[str, float]:
    from dtlab.collect import collect_episodes

    data = collect_episodes(env_id, policy, num_episodes=episodes, seed=seed)
    ret = data.episode_returns.astype(np.float64)
    return {"mean": float(ret.mean()), "std": float(ret.std()), "episodes": int(ret.size)}


def export_presets(run_dir: str | Path, dest: str | Path, *, env_id: str, episodes: int = 20,
                   seed: int = 0) -> dict[str, Any]:
    """Export the medium and expert actors of a behaviour run to ``dest`` with a manifest of their
    measured returns (stochastic, as used for collection, and deterministic) and the reference
    scores of the presets: min = random policy's mean return, max = expert's."""
    from dtlab.collect import ActorPolicy, RandomPolicy

    run_dir, dest = Path(run_dir), Path(dest)
    manifest = read_manifest(run_dir)
    if not manifest.get("snapshots"):
        raise ConfigError(f"{run_dir}: no behaviour snapshots to export")
    chosen = pick_snapshots(manifest)
    by_step = {s["step"]: s for s in manifest["snapshots"]}
    out: dict[str, Any] = {"env_id": env_id, "algorithm": manifest["algorithm"],
                           "training_seed": manifest["seed"], "measured_over_episodes": episodes,
                           "measurement_seed": seed,
                           "run_steps": manifest["snapshots"][-1]["step"],
                           "snapshot_every": (manifest["snapshots"][1]["step"] - manifest["snapshots"][0]["step"]
                                              if len(manifest["snapshots"]) > 1 else None)}
    for variant, step in chosen.items():
        path = export_actor(run_dir / "snapshots" / f"step_{step:08d}.zip",
                            dest / f"{variant}.safetensors", env_id=env_id,
                            extra={"step": step, "variant": variant})
        out[variant] = {"file": path.name, "step": step,
                        "training_eval_return": by_step[step]["return_mean"],
                        "return_stochastic": _policy_returns(env_id, ActorPolicy(str(path)), episodes, seed),
                        "return_deterministic": _policy_returns(
                            env_id, ActorPolicy(str(path), deterministic=True), episodes, seed)}
    env = make_env(env_id)
    out["random"] = {"return_stochastic": _policy_returns(env_id, RandomPolicy(env.action_space),
                                                          episodes, seed)}
    env.close()
    out["ref_min_score"] = out["random"]["return_stochastic"]["mean"]
    out["ref_max_score"] = out["expert"]["return_stochastic"]["mean"]
    write_text_atomic(dest / "manifest.json", json.dumps(out, indent=2))
    return out
