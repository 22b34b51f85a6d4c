"""Shared test setup: one torch thread (2-core CI machine), fixtures for doctests."""

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A briefly trained Pendulum-v1 checkpoint (for doctests and policy tests)."""
    from dtlab.config import ModelConfig
    from tests.configs import train_config
    from dtlab.data import EpisodeSet
    from dtlab.train import train

    rng = np.random.default_rng(0)
    n = 400
    obs = rng.normal(size=(n, 3)).astype(np.float32)
    act = rng.uniform(-2, 2, size=(n, 1)).astype(np.float32)
    rew = -rng.uniform(0, 10, size=n).astype(np.float32)
    trunc = np.zeros(n, bool)
    trunc[199::200] = True
    episodes = EpisodeSet.from_flags(obs, act, rew, np.zeros(n, bool), trunc)
    out = tmp_path_factory.mktemp("tiny") / "run"
    cfg = train_config(dataset="<memory>", env="Pendulum-v1", out=str(out), steps=4, batch_size=4,
                      warmup_steps=2, progress=False, tensorboard=False, log_every=2,
                      model=ModelConfig(embed_dim=16, n_layers=1, context_len=4, max_ep_len=200))
    train(cfg, episodes)
    return str(out)


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace, request):
    doctest_namespace["np"] = np
