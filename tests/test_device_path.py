"""The GPU path's logic, run on the CPU: windows gathered by torch indexing equal the numpy
sampler's; a fused optimizer skips a non-finite step on the device; the loop that reads the device
only at log points counts, skips and refuses non-finite steps as the per-step loop does."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dtlab.trainer as train_module  # where the step and its loss live
from dtlab import checkpoint
from dtlab.config import ModelConfig
from dtlab.data import EpisodeSet
from dtlab.data.sampling import SequenceSampler
from dtlab.errors import TrainingError
from dtlab.baselines import build_model
from dtlab.normalizer import Normalizer
from dtlab.spaces import ContinuousActions, DiscreteActions, VectorObservations
from dtlab.train import train
from dtlab.trainer import DeviceSampler, to_tensors, train_step
from tests.test_reliability import cfg, episodes, nan_on_call

CPU = torch.device("cpu")


def _episodes(discrete: bool) -> EpisodeSet:
    rng = np.random.default_rng(1)
    lengths = [3, 7, 1, 12]  # episodes shorter than K: padded windows
    n = sum(lengths)
    term = np.zeros(n, bool)
    term[np.cumsum(lengths) - 1] = True
    actions = rng.integers(0, 4, n) if discrete else rng.uniform(-2, 2, (n, 2))
    return EpisodeSet.from_flags(rng.normal(size=(n, 3)), actions, rng.normal(size=n), term,
                                 np.zeros(n, bool))


@pytest.mark.parametrize("discrete", [False, True])
def test_device_gather_equals_the_numpy_sampler(discrete):
    data = _episodes(discrete)
    space = DiscreteActions(4) if discrete else ContinuousActions(2, (-2.0, -2.0), (2.0, 2.0))
    sampler = SequenceSampler(data, 5, Normalizer.from_episodes(data, 10.0, space))
    on_device = DeviceSampler(sampler, CPU)
    for seed in range(3):
        a = on_device.sample(16, np.random.default_rng(seed))
        b = to_tensors(sampler.sample(16, np.random.default_rng(seed)), CPU)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        assert not bool(b["masks"].all())  # padded windows were drawn


def test_fused_optimizer_skips_a_nonfinite_step_without_reading_it():
    torch.manual_seed(0)
    model = build_model(ModelConfig(embed_dim=8, n_layers=1, context_len=5, max_ep_len=50),
                        VectorObservations(3), ContinuousActions(2, (-2.0, -2.0), (2.0, 2.0)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    data = _episodes(False)
    sampler = SequenceSampler(data, 5, Normalizer.from_episodes(
        data, 10.0, ContinuousActions(2, (-2.0, -2.0), (2.0, 2.0))))
    batch = to_tensors(sampler.sample(8, np.random.default_rng(0)), CPU)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {**batch, "observations": batch["observations"] * float("nan")}
    _, grad_norm = train_step(model, optimizer, bad, grad_clip=0.25)
    assert not torch.isfinite(grad_norm)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(float(s["step"]) == 0 for s in optimizer.state.values())
    assert not hasattr(optimizer, "found_inf")
    _, grad_norm = train_step(model, optimizer, batch, grad_clip=0.25)
    assert torch.isfinite(grad_norm)
    assert all(float(s["step"]) == 1 for s in optimizer.state.values())
    assert not torch.equal(before["predict_action.weight"], model.predict_action.weight)


@pytest.fixture
def device_side(monkeypatch):
    """Train on the CPU as on CUDA: fused AdamW, device gather, reads at log points only."""
    monkeypatch.setattr(train_module, "_device_side", lambda device: True)


def test_device_side_loop_trains_like_the_per_step_loop(tmp_path, monkeypatch):
    plain = train(cfg(tmp_path, "plain", precision="fp32"), episodes())
    monkeypatch.setattr(train_module, "_device_side", lambda device: True)
    side = train(cfg(tmp_path, "side", precision="fp32"), episodes())
    assert side.steps == plain.steps == 8
    assert side.final_loss == pytest.approx(plain.final_loss, rel=1e-4)
    a, b = (load_file(str(r.checkpoint / checkpoint.WEIGHTS_FILE)) for r in (plain, side))
    for key in a:  # fused and foreach AdamW round differently
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_device_side_loop_skips_and_counts_nonfinite_steps(tmp_path, monkeypatch, device_side):
    monkeypatch.setattr(train_module, "action_loss", nan_on_call(3))
    result = train(cfg(tmp_path, skip_nonfinite=True), episodes())
    assert result.skipped_nonfinite == 1 and result.steps == 8
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_nonfinite"] for r in records] == [0, 1, 1, 1]
    assert all(np.isfinite(r["loss"]) for r in records)
    weights = load_file(str(result.checkpoint / checkpoint.WEIGHTS_FILE))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_device_side_loop_refuses_a_nonfinite_step_at_the_next_read(tmp_path, monkeypatch,
                                                                    device_side):
    monkeypatch.setattr(train_module, "action_loss", nan_on_call(6))
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient at step 6 \(1 of the "
                                            r"steps up to 6\); last good checkpoint: "
                                            r".*step_00000004"):
        train(cfg(tmp_path), episodes())
    model, info = checkpoint.load(tmp_path / "run")
    assert info.step == 4 and all(torch.isfinite(p).all() for p in model.parameters())
