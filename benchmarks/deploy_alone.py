"""The deploy runtime installed alone (no torch) against DTPolicy's actions (docs/deploy.md).

1. With dtlab installed: run DTPolicy over whole Hopper-v5 episodes (batch of N targets, a steer
   mid-episode) and save the observations, rewards and actions it produced:

       python benchmarks/deploy_alone.py record RUN ARTIFACT actions.npz

2. In a fresh venv with only ``pip install ./deploy`` (numpy + onnxruntime + dtlab-deploy): replay
   the same observations and rewards through ``dtlab_deploy.DeployedPolicy`` and compare:

       python benchmarks/deploy_alone.py check ARTIFACT actions.npz

``check`` prints whether torch is importable, the largest action difference and the steps
compared, and exits 1 if a difference exceeds 1e-5.
"""

from __future__ import annotations

import sys

import numpy as np

TARGETS = (3600.0, 1800.0, 900.0)
STEER_AT, STEER_TO = 30, 1200.0
STEPS = 200


def record(run: str, out: str) -> None:
    from dtlab.envs import make_env
    from dtlab.policy import DTPolicy

    policy = DTPolicy.from_checkpoint(run)
    envs = [make_env("Hopper-v5") for _ in TARGETS]
    obs = np.stack([env.reset(seed=i)[0] for i, env in enumerate(envs)]).astype(np.float32)
    rewards = np.zeros(len(TARGETS), np.float32)
    live = np.ones(len(TARGETS), bool)
    policy.reset(list(TARGETS))
    rows = []  # (step, live mask, observations, rewards, actions) of every step
    for t in range(STEPS):
        idx = np.flatnonzero(live)
        if not idx.size:
            break
        if t == STEER_AT:
            policy.steer(STEER_TO, index=idx)
        actions = policy.act(obs[idx], None if t == 0 else rewards[idx], index=idx)
        rows.append((live.copy(), obs.copy(), rewards.copy(), actions))
        for j, i in enumerate(idx):
            o, r, terminated, truncated, _ = envs[i].step(actions[j])
            obs[i], rewards[i] = o, r
            live[i] = not (terminated or truncated)
    np.savez(out, live=np.stack([r[0] for r in rows]), observations=np.stack([r[1] for r in rows]),
             rewards=np.stack([r[2] for r in rows]),
             actions=np.concatenate([r[3] for r in rows]))
    print(f"{out}: {len(rows)} steps, {sum(int(r[0].sum()) for r in rows)} actions")


def check(artifact: str, saved: str) -> int:
    try:
        from dtlab_deploy import DeployedPolicy
    except ImportError:
        from dtlab.deploy import DeployedPolicy
    try:
        import torch  # noqa: F401
        has_torch = True
    except ImportError:
        has_torch = False
    data = np.load(saved)
    policy = DeployedPolicy(artifact)
    policy.reset(list(TARGETS))
    got = []
    for t, live in enumerate(data["live"]):
        idx = np.flatnonzero(live)
        if t == STEER_AT:
            policy.steer(STEER_TO, index=idx)
        got.append(policy.act(data["observations"][t][idx],
                              None if t == 0 else data["rewards"][t][idx], index=idx))
    diff = float(np.abs(np.concatenate(got) - data["actions"]).max())
    print(f"torch importable: {has_torch}; steps {len(data['live'])}, actions "
          f"{len(data['actions'])}, max |deployed - DTPolicy| = {diff:.2e}")
    return 0 if diff <= 1e-5 else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["record"] and len(sys.argv) == 5:
        record(sys.argv[2], sys.argv[4])
    elif sys.argv[1:2] == ["check"] and len(sys.argv) == 4:
        sys.exit(check(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
