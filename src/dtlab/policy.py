"""DTPolicy: a stateful, return-conditioned policy over one or many parallel episodes.

``reset(target_return)`` starts episodes, ``act(observation, last_reward)`` returns the next action;
the return-to-go is decremented by each reward received. ``steer(new_return)`` changes the return
asked for in the middle of an episode (run-time steering).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dtlab import checkpoint
from dtlab.checkpoint import PolicyInfo
from dtlab.errors import ConfigError, DtlabWarning
from dtlab.model import DecisionTransformer


class DTPolicy:
    """Run a trained Decision Transformer in an environment.

    Holds the last K steps of every episode as tensors on the model's device; each ``act`` is one
    batched forward pass over the full K-window (exact recomputation, no approximate cache).

    Steering a Pendulum-v1 agent: ask for a high return, then mid-episode for a low one.

    >>> import gymnasium as gym
    >>> policy = DTPolicy.from_checkpoint(getfixture("tiny_checkpoint"))  # any checkpoint dir
    >>> env = gym.make("Pendulum-v1")
    >>> obs, _ = env.reset(seed=0)
    >>> policy.reset(target_return=-150.0)
    >>> reward, rewards = None, []
    >>> for t in range(200):
    ...     if t == 100:
    ...         policy.steer(-900.0)  # from now on, ask for a much lower return
    ...     action = policy.act(obs, reward)
    ...     obs, reward, terminated, truncated, _ = env.step(action)
    ...     rewards.append(reward)
    >>> action.shape, bool(env.action_space.contains(action))
    ((1,), True)

    The last action was conditioned on -900 minus the rewards of steps 100 to 198:

    >>> abs(float(policy.returns_to_go[0] - (-900.0 - sum(rewards[100:199])))) < 1e-3
    True

    For many episodes at once, ``reset`` takes one target per episode and ``act`` a batch of
    observations; ``index`` selects the episodes that advance (see dtlab.evaluate.rollout).
    """

    def __init__(self, model: DecisionTransformer, info: PolicyInfo, device: str | torch.device = "cpu",
                 precision: str = "fp32", kv_cache: bool = False):
        """``kv_cache``: incremental inference with cached keys/values (opt-in, approximate once
        the K-step window slides; see ``DecisionTransformer.predict_cached``); decision-transformer
        models only (ConfigError otherwise)."""
        if kv_cache and info.model.architecture != "decision-transformer":
            raise ConfigError(f"kv_cache: kv-cache rollouts are for decision-transformer models, "
                              f"not {info.model.architecture}; set kv_cache False")
        self.model = model.to(device).eval()
        self.precision = precision  # "fp32", or "bf16" autocast
        self.kv_cache = kv_cache
        self.info = info
        self.device = torch.device(device)
        self.context_len = info.model.context_len
        f32 = dict(dtype=torch.float32, device=self.device)
        self._obs_mean = torch.tensor(info.obs_mean, **f32)
        self._obs_std = torch.tensor(info.obs_std, **f32)
        self._act_low = torch.tensor(info.action_low, **f32)
        self._act_high = torch.tensor(info.action_high, **f32)
        self.num_envs = 0
        self._single = True
        # Targets above this warn (set from the checkpoint's calibration.json by from_checkpoint).
        self.reliable_max_target: float | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", precision: str = "fp32",
                        kv_cache: bool = False) -> "DTPolicy":
        """Load a checkpoint (and its reliable maximum target, when ``dtlab calibrate`` stored
        one)."""
        model, info = checkpoint.load(path, device)
        policy = cls(model, info, device, precision, kv_cache)
        calibration = checkpoint.load_calibration(path)
        if calibration is not None:
            policy.reliable_max_target = float(calibration["reliable_max_target"])
        return policy

    def _warn_above_reliable_max(self, targets: np.ndarray) -> None:
        """One line when a target exceeds the calibrated reliable maximum (the same text for every
        call, so Python's default filter shows it once)."""
        limit = self.reliable_max_target
        if limit is not None and targets.size and float(np.max(targets)) > limit:
            warnings.warn(f"target returns above {limit:g}, the reliable maximum target found by "
                          "calibration (calibration.json), were asked for: achieved returns "
                          "stopped rising there", DtlabWarning, stacklevel=3)

    # ---- episode state ------------------------------------------------------------------------
    def reset(self, target_return: float | Sequence[float] | np.ndarray) -> None:
        """Start new episodes: one per target (a scalar starts one episode and ``act`` then takes
        and returns unbatched arrays). Warns (DtlabWarning) for a target above the checkpoint's
        calibrated reliable maximum target."""
        self._warn_above_reliable_max(np.asarray(target_return, dtype=np.float64))
        targets = np.asarray(target_return, dtype=np.float32)
        self._single = targets.ndim == 0
        targets = targets.reshape(-1)
        n, k, dev = targets.shape[0], self.context_len, self.device
        self.num_envs = n
        self._obs = torch.zeros(n, k, self.info.obs_dim, device=dev)  # (N, K, obs_dim)
        if self.info.discrete:
            self._act = torch.zeros(n, k, dtype=torch.long, device=dev)  # (N, K) action indices
        else:
            self._act = torch.zeros(n, k, self.info.act_dim, device=dev)  # (N, K, act_dim), [-1, 1]
        self._rtg = torch.zeros(n, k, 1, device=dev)  # (N, K, 1), scaled
        self._timesteps = torch.zeros(n, k, dtype=torch.long, device=dev)  # (N, K)
        self._masks = torch.zeros(n, k, dtype=torch.bool, device=dev)  # (N, K)
        self._t = torch.zeros(n, dtype=torch.long, device=dev)  # (N,) steps taken so far
        self._next_rtg = torch.as_tensor(targets, device=dev) / self.info.return_scale  # (N,)
        self._pending = torch.full((n,), float("nan"), device=dev)  # (N,) steer() requests
        self._cache, self._cache_ids, self._cache_t = None, None, -1  # kv_cache mode only

    def steer(self, return_to_go: float | Sequence[float], index: np.ndarray | None = None) -> None:
        """Ask for a different return from the next step on (run-time steering).

        The next ``act`` conditions on exactly ``return_to_go`` (the reward passed to it is not
        subtracted), and the return-to-go tokens already in the context shift by the same amount,
        so the context reads as if this return had been asked for from the start. Warns
        (DtlabWarning) above the checkpoint's calibrated reliable maximum target.
        """
        idx = self._index(index)
        self._warn_above_reliable_max(np.asarray(return_to_go, dtype=np.float64))
        new = np.asarray(return_to_go, dtype=np.float32).reshape(-1) / self.info.return_scale
        self._pending[idx] = torch.as_tensor(new, device=self.device)

    @property
    def returns_to_go(self) -> np.ndarray:
        """Return-to-go each episode conditioned its last action on (unscaled). (N,)"""
        return (self._next_rtg * self.info.return_scale).cpu().numpy()

    def _index(self, index) -> torch.Tensor:
        if index is None:
            return torch.arange(self.num_envs, device=self.device)
        return torch.as_tensor(np.asarray(index, dtype=np.int64).reshape(-1), device=self.device)

    def _predict_cached(self, idx, t, obs_w, act_w, rtg_w, ts_w, mask_w, invalidate: bool) -> torch.Tensor:
        """kv_cache mode: feed only the 3 new tokens (a_{t-1}, R_t, s_t) when the cache holds these
        episodes at this step; otherwise (first step, steering, episodes at different steps)
        rebuild it from the window (an exact pass)."""
        k, t0 = self.context_len, int(t[0])
        same_t = bool((t == t0).all())
        cache = None
        if self._cache is not None and same_t and self._cache_t == t0 and not invalidate:
            ids = idx.tolist()
            if ids == self._cache_ids:
                cache = self._cache
            elif set(ids) <= set(self._cache_ids):  # some episodes ended: keep the others' rows
                pos = {e: i for i, e in enumerate(self._cache_ids)}
                rows = torch.tensor([pos[e] for e in ids], device=self.device)
                cache = [(kk[rows], vv[rows]) for kk, vv in self._cache]
        if cache is not None:
            tokens = self.model.embed(obs_w[:, -2:], act_w[:, -2:], rtg_w[:, -2:], ts_w[:, -2:])
            pred, new_cache = self.model.predict_cached(tokens[:, 2:5], cache, keep=3 * k - 4)
        elif same_t:
            real = min(t0 + 1, k)  # all selected episodes have exactly this many real steps
            tokens = self.model.embed(obs_w[:, -real:], act_w[:, -real:], rtg_w[:, -real:],
                                      ts_w[:, -real:])[:, :-1]  # up to s_t (a_t is not known yet)
            pred, new_cache = self.model.predict_cached(tokens, None, keep=0)
        else:  # episodes at different steps: no shared cache, exact recomputation
            pred = self.model.predict_last(obs_w, act_w, rtg_w, ts_w, mask_w)
            self._cache, self._cache_ids, self._cache_t = None, None, -1
            return pred
        self._cache, self._cache_ids, self._cache_t = new_cache, idx.tolist(), t0 + 1
        return pred

    # ---- acting -------------------------------------------------------------------------------
    @torch.inference_mode()
    def act(self, observation: np.ndarray, last_reward: float | np.ndarray | None = None,
            index: np.ndarray | None = None) -> np.ndarray:
        """Action for the current observation of each episode in ``index`` (default: all).

        ``last_reward`` is the reward received for the previous action (ignored at an episode's
        first step); it is subtracted from the return-to-go before acting.
        """
        idx = self._index(index)
        obs = torch.as_tensor(np.asarray(observation, dtype=np.float32), device=self.device)
        obs = obs.reshape(idx.shape[0], self.info.obs_dim)  # (n, obs_dim)
        t = self._t[idx]  # (n,)
        if last_reward is not None:
            r = torch.as_tensor(np.asarray(last_reward, dtype=np.float32).reshape(-1), device=self.device)
            r = r.expand(idx.shape[0])
            self._next_rtg[idx] -= torch.where(t > 0, r / self.info.return_scale, 0.0)
        pending = self._pending[idx]  # (n,)
        steered = ~torch.isnan(pending)
        any_steered = bool(steered.any())
        if any_steered:
            delta = torch.where(steered, pending - self._next_rtg[idx], 0.0)  # (n,)
            self._next_rtg[idx] += delta
            self._rtg[idx] += delta[:, None, None] * self._masks[idx][..., None]
            self._pending[idx] = float("nan")
        # Slide every selected window one step left and write the new step at the end.
        obs_w = self._obs[idx].roll(-1, dims=1)  # (n, K, obs_dim)
        act_w = self._act[idx].roll(-1, dims=1)  # (n, K, act_dim), or (n, K) if discrete
        rtg_w = self._rtg[idx].roll(-1, dims=1)  # (n, K, 1)
        ts_w = self._timesteps[idx].roll(-1, dims=1)  # (n, K)
        mask_w = self._masks[idx].roll(-1, dims=1)  # (n, K)
        obs_w[:, -1] = (obs - self._obs_mean) / self._obs_std
        act_w[:, -1] = 0  # not yet known; s_t's prediction cannot see it (causal)
        rtg_w[:, -1, 0] = self._next_rtg[idx]
        ts_w[:, -1] = t
        mask_w[:, -1] = True
        all_real = bool(mask_w.all())
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            if self.kv_cache:
                pred = self._predict_cached(idx, t, obs_w, act_w, rtg_w, ts_w, mask_w,
                                            invalidate=any_steered)
            else:
                pred = self.model.predict_last(obs_w, act_w, rtg_w, ts_w, None if all_real else mask_w)
        pred = pred.float()  # (n, A), or (n, n_actions) logits if discrete
        if self.info.discrete:
            pred = pred.argmax(-1)  # (n,) the most likely action (greedy)
        act_w[:, -1] = pred
        self._obs[idx], self._act[idx], self._rtg[idx] = obs_w, act_w, rtg_w
        self._timesteps[idx], self._masks[idx] = ts_w, mask_w
        self._t[idx] = t + 1
        if self.info.discrete:
            action = pred.cpu().numpy()  # (n,) int64
        else:
            action = self._act_low + (pred + 1.0) * 0.5 * (self._act_high - self._act_low)  # (n, A)
            action = action.cpu().numpy()
        return action[0] if self._single and index is None else action
