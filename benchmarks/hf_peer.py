"""The peer: Hugging Face ``transformers.DecisionTransformerModel`` driven the way the HF blog post
"Train your first Decision Transformer" (huggingface.co/blog/train-decision-transformers) drives it.

Kept as close to the blog's code as a benchmark allows; deviations, each in the peer's favour:
- Episodes are dicts of numpy arrays in memory; the blog indexes a ``datasets.Dataset`` (Arrow),
  where every ``dataset[i]`` converts the whole episode to Python lists first (much slower).
- Training is a plain loop (collator -> forward -> loss -> backward -> clip -> AdamW step) instead
  of ``transformers.Trainer``, so no Trainer/accelerate overhead is counted.
- No ``env.render()`` in the evaluation loop.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

K = 20  # the blog's max_len / the DT paper's context length
SCALE = 1000.0  # return scale (blog and DT paper)


def hf_model(state_dim: int = 11, act_dim: int = 3, dropout: float = 0.1, *, hidden: int = 128,
             layers: int = 3, inner: int = 512):
    """The paper configuration on HF's GPT-2 backbone (sdpa attention, the library default);
    ``hidden``/``layers``/``inner`` give other sizes (bench_train.py --size quickstart)."""
    from transformers import DecisionTransformerConfig, DecisionTransformerModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # GPT-2 token-id warnings that do not apply to a DT
    cfg = DecisionTransformerConfig(
        state_dim=state_dim, act_dim=act_dim, hidden_size=hidden, n_layer=layers, n_head=1, n_inner=inner,
        max_ep_len=1000, action_tanh=True, resid_pdrop=dropout, embd_pdrop=dropout,
        attn_pdrop=dropout)
    return DecisionTransformerModel(cfg)


def hf_optimizer(model: nn.Module, lr: float = 1e-4, weight_decay: float = 1e-4):
    """AdamW as ``transformers.Trainer`` builds it: no decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            (no_decay if name == "bias" or isinstance(module, nn.LayerNorm) else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.999), eps=1e-8)


def hf_loss(model, batch: dict) -> torch.Tensor:
    """The blog's ``TrainableDT.forward``: MSE over the action predictions at unmasked steps."""
    _, action_preds, _ = model(states=batch["states"], actions=batch["actions"],
                               rewards=batch["rewards"], returns_to_go=batch["returns_to_go"],
                               timesteps=batch["timesteps"], attention_mask=batch["attention_mask"],
                               return_dict=False)
    act_dim = action_preds.shape[2]
    keep = batch["attention_mask"].reshape(-1) > 0
    action_preds = action_preds.reshape(-1, act_dim)[keep]
    action_targets = batch["actions"].reshape(-1, act_dim)[keep]
    return torch.mean((action_preds - action_targets) ** 2)


class BlogCollator:
    """``DecisionTransformerGymDataCollator`` from the blog: a Python loop over the batch, per
    sample: slice, discounted cumsum of the rest of the episode (Python loop), pad with
    np.concatenate, normalize; then concatenate and convert.

    ``precompute_rtg=True`` is a stronger variant (not in the blog): returns-to-go computed once
    per episode up front, so only the per-sample slicing/padding loop remains.
    """

    def __init__(self, episodes: list[dict], max_len: int = K, max_ep_len: int = 1000,
                 scale: float = SCALE, precompute_rtg: bool = False) -> None:
        self.dataset = episodes
        self.max_len, self.max_ep_len, self.scale = max_len, max_ep_len, scale
        self.act_dim = len(episodes[0]["actions"][0])
        self.state_dim = len(episodes[0]["observations"][0])
        states, traj_lens = [], []
        for ep in episodes:
            states.extend(ep["observations"])
            traj_lens.append(len(ep["observations"]))
        self.n_traj = len(traj_lens)
        states = np.vstack(states)
        self.state_mean, self.state_std = np.mean(states, axis=0), np.std(states, axis=0) + 1e-6
        traj_lens = np.array(traj_lens)
        self.p_sample = traj_lens / sum(traj_lens)
        self.rtg = ([self._discount_cumsum(np.asarray(ep["rewards"]), 1.0) for ep in episodes]
                    if precompute_rtg else None)

    @staticmethod
    def _discount_cumsum(x, gamma):
        discount_cumsum = np.zeros_like(x)
        discount_cumsum[-1] = x[-1]
        for t in reversed(range(x.shape[0] - 1)):
            discount_cumsum[t] = x[t] + gamma * discount_cumsum[t + 1]
        return discount_cumsum

    def __call__(self, batch_size: int) -> dict:
        batch_inds = np.random.choice(np.arange(self.n_traj), size=batch_size, replace=True,
                                      p=self.p_sample)
        s, a, r, d, rtg, timesteps, mask = [], [], [], [], [], [], []
        for ind in batch_inds:
            feature = self.dataset[int(ind)]
            si = random.randint(0, len(feature["rewards"]) - 1)
            s.append(np.array(feature["observations"][si:si + self.max_len]).reshape(1, -1, self.state_dim))
            a.append(np.array(feature["actions"][si:si + self.max_len]).reshape(1, -1, self.act_dim))
            r.append(np.array(feature["rewards"][si:si + self.max_len]).reshape(1, -1, 1))
            d.append(np.array(feature["dones"][si:si + self.max_len]).reshape(1, -1))
            timesteps.append(np.arange(si, si + s[-1].shape[1]).reshape(1, -1))
            timesteps[-1][timesteps[-1] >= self.max_ep_len] = self.max_ep_len - 1
            if self.rtg is None:
                full = self._discount_cumsum(np.array(feature["rewards"][si:]), gamma=1.0)
            else:
                full = self.rtg[int(ind)][si:]
            rtg.append(full[:s[-1].shape[1]].reshape(1, -1, 1))
            if rtg[-1].shape[1] < s[-1].shape[1]:
                rtg[-1] = np.concatenate([rtg[-1], np.zeros((1, 1, 1))], axis=1)
            tlen = s[-1].shape[1]
            s[-1] = np.concatenate([np.zeros((1, self.max_len - tlen, self.state_dim)), s[-1]], axis=1)
            s[-1] = (s[-1] - self.state_mean) / self.state_std
            a[-1] = np.concatenate([np.ones((1, self.max_len - tlen, self.act_dim)) * -10.0, a[-1]], axis=1)
            r[-1] = np.concatenate([np.zeros((1, self.max_len - tlen, 1)), r[-1]], axis=1)
            d[-1] = np.concatenate([np.ones((1, self.max_len - tlen)) * 2, d[-1]], axis=1)
            rtg[-1] = np.concatenate([np.zeros((1, self.max_len - tlen, 1)), rtg[-1]], axis=1) / self.scale
            timesteps[-1] = np.concatenate([np.zeros((1, self.max_len - tlen)), timesteps[-1]], axis=1)
            mask.append(np.concatenate([np.zeros((1, self.max_len - tlen)), np.ones((1, tlen))], axis=1))
        return {
            "states": torch.from_numpy(np.concatenate(s, axis=0)).float(),
            "actions": torch.from_numpy(np.concatenate(a, axis=0)).float(),
            "rewards": torch.from_numpy(np.concatenate(r, axis=0)).float(),
            "returns_to_go": torch.from_numpy(np.concatenate(rtg, axis=0)).float(),
            "timesteps": torch.from_numpy(np.concatenate(timesteps, axis=0)).long(),
            "attention_mask": torch.from_numpy(np.concatenate(mask, axis=0)).float(),
        }


# ---- evaluation: the blog's get_action and episode loop --------------------------------------------
def get_action(model, states, actions, rewards, returns_to_go, timesteps):
    states = states.reshape(1, -1, model.config.state_dim)
    actions = actions.reshape(1, -1, model.config.act_dim)
    returns_to_go = returns_to_go.reshape(1, -1, 1)
    timesteps = timesteps.reshape(1, -1)
    states = states[:, -K:]
    actions = actions[:, -K:]
    returns_to_go = returns_to_go[:, -K:]
    timesteps = timesteps[:, -K:]
    padding = K - states.shape[1]
    attention_mask = torch.cat([torch.zeros(padding), torch.ones(states.shape[1])])
    attention_mask = attention_mask.to(dtype=torch.long).reshape(1, -1)
    states = torch.cat([torch.zeros((1, padding, model.config.state_dim)), states], dim=1).float()
    actions = torch.cat([torch.zeros((1, padding, model.config.act_dim)), actions], dim=1).float()
    returns_to_go = torch.cat([torch.zeros((1, padding, 1)), returns_to_go], dim=1).float()
    timesteps = torch.cat([torch.zeros((1, padding), dtype=torch.long), timesteps], dim=1)
    _, action_preds, _ = model(states=states, actions=actions, rewards=rewards,
                               returns_to_go=returns_to_go, timesteps=timesteps,
                               attention_mask=attention_mask, return_dict=False)
    return action_preds[0, -1]


def blog_episode(model, env, *, seed: int, target_return: float, state_mean: np.ndarray,
                 state_std: np.ndarray, max_ep_len: int = 1000) -> tuple[int, float]:
    """One episode of the blog's evaluation loop (one env, the whole window re-run every step).
    Returns (steps, episode return)."""
    state_dim = env.observation_space.shape[0]
    act_dim = env.action_space.shape[0]
    state_mean = torch.from_numpy(state_mean.astype(np.float32))
    state_std = torch.from_numpy(state_std.astype(np.float32))
    episode_return, episode_length = 0.0, 0
    state, _ = env.reset(seed=seed)
    target = torch.tensor(target_return / SCALE, dtype=torch.float32).reshape(1, 1)
    states = torch.from_numpy(state).reshape(1, state_dim).to(dtype=torch.float32)
    actions = torch.zeros((0, act_dim), dtype=torch.float32)
    rewards = torch.zeros(0, dtype=torch.float32)
    timesteps = torch.tensor(0, dtype=torch.long).reshape(1, 1)
    for t in range(max_ep_len):
        actions = torch.cat([actions, torch.zeros((1, act_dim))], dim=0)
        rewards = torch.cat([rewards, torch.zeros(1)])
        action = get_action(model, (states - state_mean) / state_std, actions, rewards, target,
                            timesteps)
        actions[-1] = action
        action = action.detach().cpu().numpy()
        state, reward, terminated, truncated, _ = env.step(action)
        cur_state = torch.from_numpy(state).reshape(1, state_dim).to(dtype=torch.float32)
        states = torch.cat([states, cur_state], dim=0)
        rewards[-1] = reward
        pred_return = target[0, -1] - (reward / SCALE)
        target = torch.cat([target, pred_return.reshape(1, 1)], dim=1)
        timesteps = torch.cat([timesteps, torch.ones((1, 1), dtype=torch.long) * (t + 1)], dim=1)
        episode_return += reward
        episode_length += 1
        if terminated or truncated:
            break
    return episode_length, episode_return
