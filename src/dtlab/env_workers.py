"""Gymnasium environments stepped in worker processes, one step of many episodes at a time.

Evaluation (``--eval-workers N``) keeps the model in its own process, batched over all episodes,
and hands each step's actions to N worker processes that own the environments (env slot i lives in
worker i % N) and step only the slots still running. Every env is reset, seeded and stepped
exactly as the in-process path does (``LocalEnvs``), so the returns are identical.

Why not ``gymnasium.vector.AsyncVectorEnv``: it runs one process per env (a 256-episode wave would
start 256 processes), steps every sub-env on every call (dtlab's finished episodes must stay
untouched), and autoresets finished envs (on the next step by default in Gymnasium 1.x).

Workers are started with ``spawn`` (no fork of a process running torch's threads), so they know
the env ids Gymnasium registers on import; an env registered at run time by the caller must be
given as ``"module:EnvId"`` (Gymnasium imports the module first).
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

import numpy as np

from dtlab.envs import make_env, make_render_env
from dtlab.errors import EnvError

StepResult = tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]
# (observations of the stepped slots, rewards (a,) float64, terminated (a,) bool, truncated (a,))


def reset_envs(envs: list, seeds) -> list[np.ndarray]:
    """Reset each env with its seed (the action space too, as dtlab always seeds it); the first
    observations."""
    out = []
    for env, seed in zip(envs, seeds):
        obs, _ = env.reset(seed=int(seed))
        env.action_space.seed(int(seed))
        out.append(obs)
    return out


def step_envs(envs: list, actions) -> StepResult:
    """Step each env with its action (a row of ``actions``), in order."""
    obs, rewards = [], np.zeros(len(envs))
    terminated, truncated = np.zeros(len(envs), bool), np.zeros(len(envs), bool)
    for row, env in enumerate(envs):
        o, rewards[row], terminated[row], truncated[row], _ = env.step(actions[row])
        obs.append(o)
    return obs, rewards, terminated, truncated


class LocalEnvs:
    """``count`` envs of ``env_id`` in this process, addressed by slot; ``video_folder``: where
    ``record`` writes its videos."""

    def __init__(self, env_id: str, count: int, video_folder: str | None = None) -> None:
        self.env_id = env_id
        self.video_folder = video_folder
        self.envs = [make_env(env_id) for _ in range(count)]

    def record(self, slot: int, name: str) -> None:
        """Record the next episode of ``slot`` to ``video_folder/<name>/<name>-episode-0.mp4``
        (Gymnasium's ``RecordVideo``: the reset frame and one frame per step, at the env's
        ``render_fps``; written when the slot is next reset or closed). The slot gets a fresh
        rgb_array env (``make_render_env``); reset with the same seed it runs the same episode.
        """
        from gymnasium.wrappers import RecordVideo

        if self.video_folder is None:
            raise EnvError(f"{self.env_id}: recording needs a video folder")
        env = make_render_env(self.env_id)
        try:
            # A folder of its own: RecordVideo warns when its folder exists.
            recorder = RecordVideo(env, os.path.join(self.video_folder, name),
                                   episode_trigger=_first_episode, name_prefix=name)
        except Exception:
            env.close()
            raise
        self.envs[slot].close()
        self.envs[slot] = recorder

    def reset(self, slots: np.ndarray, seeds: np.ndarray) -> list[np.ndarray]:
        return reset_envs([self.envs[i] for i in slots], seeds)

    def step(self, slots: np.ndarray, actions: np.ndarray) -> StepResult:
        return step_envs([self.envs[i] for i in slots], actions)

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _first_episode(episode_id: int) -> bool:
    """RecordVideo's episode trigger: record an env's first episode only."""
    return episode_id == 0


def _serve(conn, env_id: str, count: int) -> None:
    """A worker: make ``count`` envs, then answer ("reset", local slots, seeds), ("step", local
    slots, actions) and ("close",) messages; errors go back to the caller as exceptions."""
    try:
        envs = [make_env(env_id) for _ in range(count)]
    except BaseException as exc:  # noqa: BLE001 (sent back and raised there)
        conn.send(("error", exc))
        return
    conn.send(("ok", None))
    try:
        while True:
            message = conn.recv()
            if message[0] == "close":
                break
            kind, slots, values = message
            try:
                chosen = [envs[i] for i in slots]
                if kind == "reset":
                    conn.send(("ok", np.stack(reset_envs(chosen, values))))
                else:  # observations as one array: one pickled buffer per message
                    obs, rewards, terminated, truncated = step_envs(chosen, values)
                    conn.send(("ok", (np.stack(obs), rewards, terminated, truncated)))
            except Exception as exc:  # noqa: BLE001
                conn.send(("error", exc))
    except (EOFError, KeyboardInterrupt):  # the caller went away, or Ctrl-C reached the group
        pass
    finally:
        for env in envs:
            env.close()


class EnvWorkers:
    """``count`` envs of ``env_id`` in ``workers`` processes (slot i in worker i % workers), with
    the interface of ``LocalEnvs``. Use as a context manager, or call ``close``.

    Raises EnvError when a worker cannot make its envs or exits while in use; an exception an env
    raises while stepping is raised here as it was there.
    """

    def __init__(self, env_id: str, count: int, workers: int) -> None:
        if workers < 1 or count < 1:
            raise EnvError(f"{env_id}: env workers need at least one worker and one env, got "
                           f"{workers} workers for {count} envs")
        self.env_id = env_id
        self.workers = min(workers, count)
        context = multiprocessing.get_context("spawn")
        self._conns, self._procs = [], []
        try:
            for w in range(self.workers):
                parent, child = context.Pipe()
                proc = context.Process(target=_serve, daemon=True, name=f"dtlab-env-worker-{w}",
                                       args=(child, env_id, len(range(w, count, self.workers))))
                proc.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(proc)
            for w in range(self.workers):
                self._receive(w)
        except BaseException:
            self.close()
            raise

    def _exited(self, w: int) -> EnvError:
        self._procs[w].join(timeout=5)
        return EnvError(f"{self.env_id}: env worker {w} exited (exit code "
                        f"{self._procs[w].exitcode})")

    def _send(self, w: int, message: tuple) -> None:
        try:
            self._conns[w].send(message)
        except OSError:  # BrokenPipeError: the worker is gone
            raise self._exited(w) from None

    def _receive(self, w: int) -> Any:
        try:
            status, value = self._conns[w].recv()
        except (EOFError, OSError):
            raise self._exited(w) from None
        if status == "error":
            raise value
        return value

    def _scatter(self, kind: str, slots: np.ndarray, values: np.ndarray) -> list:
        """Send each worker its share of ``slots`` (and the matching rows of ``values``); the
        answers, and for each worker the positions in ``slots`` it answered for."""
        slots = np.asarray(slots, dtype=np.int64)
        owner = slots % self.workers
        busy = []
        for w in range(self.workers):
            rows = np.flatnonzero(owner == w)
            if rows.size:
                self._send(w, (kind, slots[rows] // self.workers, values[rows]))
                busy.append((w, rows))
        return [(rows, self._receive(w)) for w, rows in busy]

    def reset(self, slots: np.ndarray, seeds: np.ndarray) -> list[np.ndarray]:
        out: list = [None] * len(slots)
        for rows, obs in self._scatter("reset", slots, np.asarray(seeds)):
            for row, o in zip(rows, obs):
                out[row] = o
        return out

    def step(self, slots: np.ndarray, actions: np.ndarray) -> StepResult:
        n = len(slots)
        obs: list = [None] * n
        rewards, terminated, truncated = np.zeros(n), np.zeros(n, bool), np.zeros(n, bool)
        for rows, (o, r, te, tr) in self._scatter("step", slots, np.asarray(actions)):
            for j, row in enumerate(rows):
                obs[row] = o[j]
            rewards[rows], terminated[rows], truncated[rows] = r, te, tr
        return obs, rewards, terminated, truncated

    def close(self) -> None:
        """Stop the workers (they close their envs); a worker that does not exit within 5 s is
        terminated."""
        for conn in self._conns:
            try:
                conn.send(("close",))
            except (OSError, BrokenPipeError):
                pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []

    def __enter__(self) -> "EnvWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
