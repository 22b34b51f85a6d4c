"""The Online Decision Transformer's stochastic head, its loss and temperature, against
torch.distributions and hand computations."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Normal, TransformedDistribution
from torch.distributions.transforms import TanhTransform

sys.path.insert(0, str(Path(__file__).parent))
from configs import pendulum_like, train_config  # noqa: E402

from dtlab.config import ModelConfig  # noqa: E402
from dtlab.model import LOG_STD_MAX, LOG_STD_MIN, StochasticActionHead  # noqa: E402
from dtlab.spaces import ContinuousActions, DiscreteActions  # noqa: E402
from dtlab.train import EntropyTemperature, stochastic_action_loss, unit_scaler  # noqa: E402


def _squashed(mean, log_std):
    return TransformedDistribution(Normal(mean, log_std.exp()), TanhTransform())


def test_log_likelihood_is_the_squashed_gaussians():
    torch.manual_seed(0)
    head = StochasticActionHead(8, ContinuousActions(3, [-1] * 3, [1] * 3))
    out = head(torch.randn(2, 5, 8))  # (B, K, 2A)
    mean, log_std = out[..., :3], out[..., 3:]
    actions = torch.rand(2, 5, 3) * 1.8 - 0.9
    expected = _squashed(mean, log_std).log_prob(actions).sum(-1)  # (B, K)
    torch.testing.assert_close(head.log_likelihood(out, actions), expected, rtol=1e-5, atol=1e-5)


def test_log_std_is_clamped_to_the_papers_range():
    head = StochasticActionHead(1, ContinuousActions(1, [-1], [1]))
    with torch.no_grad():
        head.weight.fill_(1.0)
        head.bias.zero_()
    out = head(torch.tensor([[100.0], [-100.0], [0.5]]))
    assert out[:, 1].tolist() == [LOG_STD_MAX, LOG_STD_MIN, 0.5]


def test_entropy_estimate_matches_the_squashed_gaussians_entropy():
    # Reference: -E[log p(a)] by quadrature over u for a 1-D squashed Gaussian.
    head = StochasticActionHead(1, ContinuousActions(1, [-1], [1]))
    mean, log_std = torch.tensor([0.7]), torch.tensor([0.3])
    u = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    dist = _squashed(mean.double(), log_std.double())
    density = Normal(mean.double(), log_std.double().exp()).log_prob(u).exp()
    reference = float(-(density * dist.log_prob(torch.tanh(u).clamp(-1 + 1e-15, 1 - 1e-15)))
                      .sum() * (u[1] - u[0]))
    out = torch.cat([mean, log_std]).expand(200_000, 2)
    noise = torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0))
    estimate = head.entropy(out, noise)
    assert abs(float(estimate.mean()) - reference) < 0.01
    # The Gaussian part alone would be 0.5 log(2 pi e) + log std: tanh lowers it.
    assert reference < 0.5 * math.log(2 * math.pi * math.e) + 0.3 - 0.1


def test_discrete_head_is_a_categorical():
    torch.manual_seed(1)
    head = StochasticActionHead(4, DiscreteActions(5))
    logits = head(torch.randn(3, 2, 4))  # (B, K, n)
    idx = torch.randint(0, 5, (3, 2))
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(head.log_likelihood(logits, idx),
                               torch.log(p.gather(-1, idx[..., None]))[..., 0])
    torch.testing.assert_close(head.entropy(logits), -(p * p.log()).sum(-1))
    torch.testing.assert_close(head.log_likelihood(logits, idx),
                               Categorical(logits=logits).log_prob(idx))


def test_loss_is_nll_minus_alpha_times_entropy_over_real_positions():
    torch.manual_seed(2)
    head = StochasticActionHead(6, ContinuousActions(2, [-1] * 2, [1] * 2))
    out = head(torch.randn(2, 3, 6))
    actions = torch.rand(2, 3, 2) * 1.6 - 0.8
    masks = torch.tensor([[False, True, True], [True, True, True]])
    torch.manual_seed(3)
    loss, entropy = stochastic_action_loss(head, out, actions, masks, torch.tensor(0.25))
    torch.manual_seed(3)
    noise = torch.randn(2, 3, 2)  # the same draws the loss took
    dist = _squashed(out[..., :2], out[..., 2:])
    nll = -dist.log_prob(actions).sum(-1)[masks].mean()
    mean, std = out[..., :2].double(), out[..., 2:].double().exp()  # float64: 1 - tanh^2 exact
    u = mean + std * noise.double()
    by_hand = (Normal(mean, std).entropy() + torch.log(1 - torch.tanh(u) ** 2)).sum(-1)
    by_hand = by_hand[masks].mean().float()
    torch.testing.assert_close(entropy, by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, nll - 0.25 * by_hand, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("entropy, grows", [(-5.0, True), (0.0, False)])
def test_temperature_moves_toward_the_target_entropy(entropy, grows):
    temperature = EntropyTemperature(ContinuousActions(2, [-1] * 2, [1] * 2), torch.device("cpu"))
    assert temperature.target == -2.0 and math.isclose(float(temperature.alpha), 0.1, rel_tol=1e-6)
    before = float(temperature.log_alpha.detach())
    temperature.step(torch.tensor(entropy), unit_scaler(torch.device("cpu")))
    # Adam's first step moves log alpha by lr (1e-4) against the sign of the gradient.
    assert math.isclose(float(temperature.log_alpha.detach()) - before, 1e-4 if grows else -1e-4,
                        rel_tol=0, abs_tol=5e-7)


def test_stochastic_training_resumes_bit_for_bit(tmp_path, capsys):
    from dtlab.checkpoint import load_trainer_state
    from dtlab.train import train

    model = ModelConfig(embed_dim=16, n_layers=1, context_len=4, max_ep_len=200, dropout=0.1,
                        policy="stochastic")
    common = dict(dataset="x", env="Pendulum-v1", lr=1e-3, warmup_steps=1, progress=False,
                  tensorboard=False, batch_size=8, checkpoint_every=3)
    train(train_config(model=model, out=str(tmp_path / "a"), steps=6, **common), pendulum_like())
    assert "(embed 16, 1 layer, K 4, stochastic head) on cpu" in capsys.readouterr().out
    train(train_config(model=model, out=str(tmp_path / "b"), steps=3, **common), pendulum_like())
    train(train_config(model=model, out=str(tmp_path / "b"), steps=6, resume=True, **common),
          pendulum_like())
    from safetensors.torch import load_file
    a = load_file(tmp_path / "a" / "step_00000006" / "model.safetensors")
    b = load_file(tmp_path / "b" / "step_00000006" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ta, tb = (load_trainer_state(tmp_path / r)["temperature"]["log_alpha"] for r in "ab")
    assert torch.equal(ta, tb) and not torch.equal(ta, torch.full((1,), math.log(0.1)))
