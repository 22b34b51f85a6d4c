"""Image and Dict observations (issue 12): the Nature-DQN encoder, frame stacking by index, the
specs through JSON, checkpoints and the policy, the HDF5 formats, --preset atari, --temperature."""

import json

import gymnasium as gym
import h5py
import numpy as np
import pytest
import tyro
import torch

from dtlab import checkpoint
from dtlab.checkpoint import PolicyInfo
from dtlab.config import ModelConfig, TRAIN_PRESETS, TrainConfig, train_preset
from dtlab.data import EpisodeSet, SequenceSampler
from dtlab.data.formats import load_episodes, read_d4rl, write_d4rl, write_native
from dtlab.errors import ConfigError, DatasetError, DtlabWarning, EnvError
from dtlab.baselines import build_model
from dtlab.model import DecisionTransformer, ImageEncoder
from dtlab.normalizer import Normalizer
from dtlab.policy import DTPolicy
from dtlab.spaces import (ContinuousActions, DictObservations, DiscreteActions,
                          ImageObservations, VectorObservations, check_against_env,
                          flatten_observation, observation_space_from_gym,
                          observation_space_from_json)
from dtlab.trainer import to_tensors

TINY = ModelConfig(embed_dim=16, n_layers=1, n_heads=1, context_len=4, max_ep_len=64, dropout=0.0)


def image_episodes(lengths=(5, 1, 2, 9), shape=(36, 40), stack=4, seed=0) -> EpisodeSet:
    """Episodes of random uint8 frames; every frame differs, so a wrong index shows."""
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    frames = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    frames[:, 0, 0] = np.arange(n) % 256  # distinct frames
    ends = np.cumsum(lengths) - 1
    term = np.zeros(n, bool)
    term[ends] = True
    return EpisodeSet.from_flags(frames, rng.integers(0, 3, n), rng.normal(size=n), term,
                                 np.zeros(n, bool), observation_space=ImageObservations(shape, stack))


# ---- the encoder ---------------------------------------------------------------------------------
def test_nature_dqn_encoder_shapes_by_hand():
    """84 x 84: (84 - 8) / 4 + 1 = 20, (20 - 4) / 2 + 1 = 9, 9 - 3 + 1 = 7: 64 x 7 x 7 = 3136 values
    into the embedding, as in the DT Atari model (Linear(3136, n_embd))."""
    enc = ImageEncoder(ImageObservations((84, 84), 4), 128)
    x = torch.rand(2, 3, 4, 84, 84)
    shapes, h = [], x.reshape(-1, 4, 84, 84)
    for layer in enc.conv:
        h = layer(h)
        if isinstance(layer, torch.nn.Conv2d):
            shapes.append(tuple(h.shape[1:]))
    assert shapes == [(32, 20, 20), (64, 9, 9), (64, 7, 7)]
    assert enc.fc.in_features == 3136
    out = enc(x)
    assert out.shape == (2, 3, 128) and out.abs().max() <= 1.0  # tanh
    kernels = [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in enc.conv
               if isinstance(m, torch.nn.Conv2d)]
    assert kernels == [(4, 32, (8, 8), (4, 4)), (32, 64, (4, 4), (2, 2)), (64, 64, (3, 3), (1, 1))]
    # Other frame sizes and depths: 64 x 48 -> 15 x 11 -> 6 x 4 -> 4 x 2.
    other = ImageEncoder(ImageObservations((64, 48), 2), 8)
    assert other.fc.in_features == 64 * 4 * 2 and other(torch.rand(5, 2, 64, 48)).shape == (5, 8)
    with pytest.raises(ConfigError, match=r"'shape' must be at least 36 x 36"):
        ImageObservations((35, 84), 4)


def test_image_model_forward_and_predict_last_agree():
    spec = ImageObservations((36, 36), 3)
    torch.manual_seed(0)
    model = DecisionTransformer(TINY, spec, DiscreteActions(5)).eval()
    obs = torch.rand(2, 4, 3, 36, 36)
    act = torch.randint(0, 5, (2, 4))
    rtg, ts = torch.randn(2, 4, 1), torch.arange(4).expand(2, 4)
    masks = torch.tensor([[False, True, True, True], [True] * 4])
    full = model(obs, act, rtg, ts, masks)
    assert full.shape == (2, 4, 5)
    torch.testing.assert_close(model.predict_last(obs, act, rtg, ts, masks), full[:, -1])
    # The conv weights are decayed like Linear weights (the DT Atari code's whitelist).
    from dtlab.train import param_groups
    decayed = {id(p) for p in param_groups(model, 0.1)[0]["params"]}
    assert id(model.embed_state.conv[0].weight) in decayed
    assert id(model.embed_state.conv[0].bias) not in decayed
    mlp = build_model(ModelConfig(embed_dim=8, n_layers=1, context_len=1, architecture="mlp-bc"),
                      spec, DiscreteActions(5))
    assert mlp(obs[:, :1]).shape == (2, 1, 5)


# ---- frame stacking by index ---------------------------------------------------------------------
class _ReplayFrames(gym.Env):
    """Plays the stored frames of one episode after another (the reference env)."""

    def __init__(self, episodes: EpisodeSet):
        self.frames, self.starts = episodes.observations, episodes.episode_starts
        self.ends = np.append(self.starts[1:], episodes.num_transitions)
        shape = episodes.observation_space.shape
        self.observation_space = gym.spaces.Box(0, 255, shape, np.uint8)
        self.action_space = gym.spaces.Discrete(1)
        self.episode = -1

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.t = self.starts[self.episode]
        return self.frames[self.t], {}

    def step(self, action):
        self.t += 1
        done = self.t + 1 >= self.ends[self.episode]
        return self.frames[min(self.t, self.ends[self.episode] - 1)], 0.0, done, False, {}


def test_frame_stacks_gathered_by_index_equal_gymnasiums_frame_stack():
    """Every window the sampler builds, at every end, equals the stacks Gymnasium's
    FrameStackObservation gives when the same frames are played (first frame repeated at a reset),
    with left padding zeroed; episodes shorter than the stack included."""
    episodes = image_episodes(lengths=(5, 1, 2, 9), stack=4)
    env = gym.wrappers.FrameStackObservation(_ReplayFrames(episodes), 4)
    reference = []  # (N, 4, H, W): the env's observation at every stored step
    for e in range(episodes.num_episodes):
        obs, _ = env.reset()
        reference.append(obs)
        for _ in range(int(episodes.episode_lengths[e]) - 1):
            obs, *_ = env.step(0)
            reference.append(obs)
    reference = np.stack(reference)
    k = 5
    norm = Normalizer.for_images(1.0)
    batch = SequenceSampler(episodes, k, norm).gather(np.arange(episodes.num_transitions))
    assert batch.observations.dtype == np.uint8
    assert batch.observations.shape == (episodes.num_transitions, k, 4, 36, 40)
    start_of = np.repeat(episodes.episode_starts, episodes.episode_lengths)
    for end in range(episodes.num_transitions):
        for j in range(k):
            t = end - (k - 1 - j)
            if t >= start_of[end]:
                np.testing.assert_array_equal(batch.observations[end, j], reference[t])
                assert batch.masks[end, j]
            else:
                assert not batch.masks[end, j] and not batch.observations[end, j].any()
    # The frames themselves were never copied: the sampler holds the EpisodeSet's array.
    sampler = SequenceSampler(episodes, k, norm)
    assert sampler._obs is episodes.observations
    # On the device: scaled to [0, 1] by the normalizer (x / 255).
    t = to_tensors(batch, torch.device("cpu"), norm)
    assert t["observations"].dtype == torch.float32
    torch.testing.assert_close(t["observations"],
                               torch.from_numpy(batch.observations.astype(np.float32) / 255.0))


# ---- specs -----------------------------------------------------------------------------------------
def test_specs_from_gymnasium_spaces_and_json():
    frames = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    assert observation_space_from_gym(frames) == ImageObservations((84, 84), 4)
    maze = gym.spaces.Dict({"observation": gym.spaces.Box(-1, 1, (4,)),
                            "desired_goal": gym.spaces.Box(-1, 1, (2,)),
                            "achieved_goal": gym.spaces.Box(-1, 1, (2,))})
    spec = observation_space_from_gym(maze)  # Gymnasium sorts the keys of a plain dict
    assert spec == DictObservations(("achieved_goal", "desired_goal", "observation"), (2, 2, 4))
    chosen = spec.select(["observation", "desired_goal"])
    assert chosen == DictObservations(("observation", "desired_goal"), (4, 2)) and chosen.dim == 6
    np.testing.assert_array_equal(spec.columns(["observation", "desired_goal"]), [4, 5, 6, 7, 2, 3])
    with pytest.raises(ConfigError, match=r"no observation key 'goal' \(available keys: "
                                          r"achieved_goal, desired_goal, observation\)"):
        spec.select(["goal"])
    obs = {"observation": np.arange(4.0), "desired_goal": np.array([8.0, 9.0]), "extra": 1}
    np.testing.assert_array_equal(flatten_observation(chosen, obs), [[0, 1, 2, 3, 8, 9]])
    batched = {"observation": np.ones((3, 4)), "desired_goal": np.zeros((3, 2))}
    assert flatten_observation(chosen, batched).shape == (3, 6)
    with pytest.raises(EnvError, match="has no key 'observation'"):
        flatten_observation(chosen, {"desired_goal": [0, 0]})
    for s in (ImageObservations((84, 84), 4), chosen, VectorObservations(3)):
        assert observation_space_from_json(json.loads(json.dumps(s.to_json()))) == s
    with pytest.raises(ConfigError, match=r"^'observation_space': 'stack' must be a positive"):
        observation_space_from_json({"type": "image", "shape": [84, 84], "stack": 0})
    with pytest.raises(ConfigError, match=r"'observation_space': 'dims' must be one positive"):
        observation_space_from_json({"type": "dict", "keys": ["a", "b"], "dims": [1]})


def test_check_against_env_names_frame_shape_and_stack_depth():
    env = gym.make("CartPole-v1")  # stands in: only the spaces are read
    env.observation_space = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    check_against_env(env, ImageObservations((84, 84), 4), DiscreteActions(2), what="c",
                      exact_n=True, advice="A")
    with pytest.raises(EnvError, match=r"^the checkpoint has observations \(3, 84, 84\) uint8 "
                                       r"frame stacks and 2 actions, but CartPole-v1 has "
                                       r"observations \(4, 84, 84\) and 2 actions; A$"):
        check_against_env(env, ImageObservations((84, 84), 3), DiscreteActions(2),
                          what="the checkpoint", exact_n=True, advice="A")
    with pytest.raises(EnvError, match=r"observations \(4, 64, 64\) uint8 frame stacks"):
        check_against_env(env, ImageObservations((64, 64), 4), DiscreteActions(2), what="d",
                          exact_n=False, advice="A")


# ---- checkpoints and the policy ------------------------------------------------------------------
def _save_checkpoint(tmp_path, spec, actions, normalizer, name="ckpt"):
    torch.manual_seed(0)
    model = build_model(TINY, spec, actions)
    info = PolicyInfo(model=TINY, observation_space=spec, action_space=actions,
                      normalizer=normalizer, env_id="Test-v0")
    return model, checkpoint.save(tmp_path / name, "step_00000001", model, info)


def test_checkpoint_round_trip_of_image_and_dict_specs(tmp_path):
    for spec, norm in ((ImageObservations((36, 36), 2), Normalizer.for_images(1.0)),
                       (DictObservations(("observation", "desired_goal"), (4, 2)),
                        Normalizer([0.0] * 6, [1.0] * 6, 100.0, [-1.0, -1.0], [1.0, 1.0]))):
        actions = (DiscreteActions(3) if isinstance(spec, ImageObservations)
                   else ContinuousActions(2, (-1.0, -1.0), (1.0, 1.0)))
        model, path = _save_checkpoint(tmp_path, spec, actions, norm, name=type(spec).__name__)
        config = json.loads((path / "config.json").read_text())
        assert config["observation_space"] == spec.to_json()
        loaded, info = checkpoint.load(path)
        assert info.observation_space == spec and info.normalizer.to_json() == norm.to_json()
        for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
            torch.testing.assert_close(a, b)
    # An image checkpoint's normalizer has one mean and std for every pixel.
    bad = json.loads((tmp_path / "ImageObservations" / "step_00000001" / "config.json").read_text())
    bad["normalizer"]["obs_mean"], bad["normalizer"]["obs_std"] = [0.0, 0.0], [255.0, 255.0]
    with pytest.raises(Exception, match="image observations take one"):
        PolicyInfo.from_json(bad, "x/config.json")


def test_policy_acts_on_frame_stacks_and_dict_observations(tmp_path):
    spec = ImageObservations((36, 36), 2)
    model, path = _save_checkpoint(tmp_path, spec, DiscreteActions(3), Normalizer.for_images(1.0))
    policy = DTPolicy.from_checkpoint(path)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 2, 36, 36), dtype=np.uint8)
    policy.reset([1.0, 2.0, 3.0])
    action = policy.act(frames)
    expected = model.eval().predict_last(torch.from_numpy(frames[:, None] / 255.0).float(),
                                         torch.zeros(3, 1, dtype=torch.long),
                                         torch.tensor([[[1.0]], [[2.0]], [[3.0]]]),
                                         torch.zeros(3, 1, dtype=torch.long)).argmax(-1)
    np.testing.assert_array_equal(action, expected.numpy())
    with pytest.raises(EnvError, match=r"shape \(3, 1, 36, 36\) \(uint8\) for 3 episodes; expected "
                                       r"\(3, 2, 36, 36\) uint8"):
        policy.act(frames[:, :1])  # one frame instead of a stack of 2
    # Dict observations are flattened with the checkpoint's keys, in its order.
    dspec = DictObservations(("observation", "desired_goal"), (4, 2))
    bounds = ([-1.0, -1.0], [1.0, 1.0])
    _, dpath = _save_checkpoint(tmp_path, dspec, ContinuousActions(2, *bounds),
                                Normalizer([0.5] * 6, [2.0] * 6, 100.0, *bounds), name="d")
    a, b = DTPolicy.from_checkpoint(dpath), DTPolicy.from_checkpoint(dpath)
    obs = {"observation": rng.normal(size=(2, 4)), "desired_goal": rng.normal(size=(2, 2)),
           "achieved_goal": rng.normal(size=(2, 2))}
    a.reset([10.0, 20.0])
    b.reset([10.0, 20.0])
    flat = np.concatenate([obs["observation"], obs["desired_goal"]], axis=1)
    np.testing.assert_array_equal(a.act(obs), b.act(flat))
    per_episode = [{k: v[i] for k, v in obs.items()} for i in range(2)]  # as a rollout stacks them
    np.testing.assert_array_equal(a.act(per_episode, np.zeros(2)), b.act(flat, np.zeros(2)))


@pytest.mark.parametrize("architecture", ["decision-transformer", "mlp-bc"])
def test_policy_keeps_encodings_and_matches_recomputing_every_window(tmp_path, architecture):
    """The policy encodes each step's frames once; its actions equal recomputing the whole
    window of frame stacks at every step, past the point where the window slides."""
    spec, k = ImageObservations((36, 36), 2), 3
    cfg = ModelConfig(embed_dim=16, n_layers=1, context_len=1 if architecture == "mlp-bc" else k,
                      max_ep_len=64, dropout=0.0, architecture=architecture)
    k = cfg.context_len
    torch.manual_seed(0)
    model = build_model(cfg, spec, DiscreteActions(3)).eval()
    info = PolicyInfo(model=cfg, observation_space=spec, action_space=DiscreteActions(3),
                      normalizer=Normalizer.for_images(10.0), env_id="Test-v0")
    policy = DTPolicy(model, info)
    rng = np.random.default_rng(0)
    targets = np.array([5.0, -3.0])
    policy.reset(targets)
    frames, acts, rtgs = [], [], []
    rtg = targets / 10.0
    for t in range(6):
        stack = rng.integers(0, 256, (2, 2, 36, 36), dtype=np.uint8)
        reward = rng.normal(size=2).astype(np.float32)
        action = policy.act(stack, reward)
        if t > 0:
            rtg = rtg - reward / 10.0
        frames.append(torch.from_numpy(stack).float() / 255.0)
        rtgs.append(torch.tensor(rtg, dtype=torch.float32))
        lo = max(0, t + 1 - k)
        obs_w = torch.stack(frames[lo:], 1)  # (2, n, 2, 36, 36)
        act_w = torch.stack(acts[lo:] + [torch.zeros(2, dtype=torch.long)], 1)
        rtg_w = torch.stack(rtgs[lo:], 1)[..., None]
        ts = torch.arange(lo, t + 1).expand(2, -1)
        with torch.no_grad():
            expected = model.predict_last(obs_w, act_w, rtg_w, ts).argmax(-1)
        np.testing.assert_array_equal(action, expected.numpy())
        acts.append(torch.from_numpy(action))


def test_temperature_samples_from_the_softmax_of_the_logits(tmp_path):
    """Greedy at 0; at T > 0 the action frequencies match softmax(logits / T) (a model whose
    logits are fixed by its bias; 6000 draws: every frequency within 4 standard errors)."""
    spec = VectorObservations(2)
    model, path = _save_checkpoint(tmp_path, spec, DiscreteActions(3), Normalizer([0.0] * 2,
                                                                                  [1.0] * 2, 1.0))
    logits = torch.tensor([1.0, 0.0, -1.0])
    with torch.no_grad():
        model.predict_action.weight.zero_()
        model.predict_action.bias.copy_(logits)
    info = checkpoint.load(path)[1]
    greedy = DTPolicy(model, info)
    greedy.reset(np.zeros(50))
    assert (greedy.act(np.zeros((50, 2))) == 0).all()
    for temperature in (1.0, 2.0):
        policy = DTPolicy(model, info, temperature=temperature, seed=1)
        draws = []
        for _ in range(20):
            policy.reset(np.zeros(300))
            draws.append(policy.act(np.zeros((300, 2))))
        freq = np.bincount(np.concatenate(draws), minlength=3) / 6000
        p = torch.softmax(logits / temperature, 0).numpy()
        assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / 6000)), (freq, p)
    again = DTPolicy(model, info, temperature=2.0, seed=1)  # the last loop's settings
    again.reset(np.zeros(300))
    np.testing.assert_array_equal(again.act(np.zeros((300, 2))), draws[0])  # seeded
    continuous = _save_checkpoint(tmp_path, spec, ContinuousActions(1, (-1.0,), (1.0,)),
                                  Normalizer([0.0] * 2, [1.0] * 2, 1.0, [-1.0], [1.0]), "c")[1]
    with pytest.raises(ConfigError, match="sampling is for discrete actions"):
        DTPolicy.from_checkpoint(continuous, temperature=1.0)


# ---- formats ---------------------------------------------------------------------------------------
def test_frames_stay_uint8_chunked_and_compressed_in_both_hdf5_layouts(tmp_path):
    episodes = image_episodes(shape=(36, 36), stack=3)
    native, d4rl = tmp_path / "frames.native.hdf5", tmp_path / "frames.d4rl.hdf5"
    write_native(episodes, native)
    write_d4rl(episodes, d4rl)
    for path in (native, d4rl):
        with h5py.File(path) as f:
            dset = f["observations"]
            assert dset.dtype == np.uint8 and dset.compression == "gzip"
            assert dset.chunks == (episodes.num_transitions, 36, 36)  # fewer than 64 frames
            assert "next_observations" not in f
        back = load_episodes(path)
        assert back.observation_space == ImageObservations((36, 36), 3)
        np.testing.assert_array_equal(back.observations, episodes.observations)
        np.testing.assert_array_equal(back.episode_starts, episodes.episode_starts)
    # Frames without a recorded spec: read as stacks of 4, with a warning saying so.
    plain = tmp_path / "plain.hdf5"
    with h5py.File(plain, "w") as f:
        f["observations"] = episodes.observations
        for key, value in (("actions", episodes.actions), ("rewards", episodes.rewards),
                           ("terminals", episodes.terminations), ("timeouts", episodes.truncations)):
            f[key] = value
    with pytest.warns(DtlabWarning, match=r"read as stacks of 4 frames"):
        assert read_d4rl(plain).observation_space == ImageObservations((36, 36), 4)


def test_dict_observations_round_trip_through_native_and_d4rl_and_select_keys(tmp_path):
    spec = DictObservations(("achieved_goal", "desired_goal", "observation"), (2, 2, 4))
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(10, 8)).astype(np.float32)
    episodes = EpisodeSet.from_flags(obs, rng.uniform(-1, 1, (10, 2)), rng.normal(size=10),
                                     np.eye(10, dtype=bool)[4] | np.eye(10, dtype=bool)[9],
                                     np.zeros(10, bool), observation_space=spec,
                                     final_observations=rng.normal(size=(2, 8)))
    for writer in (write_native, write_d4rl):
        path = tmp_path / f"{writer.__name__}.hdf5"
        writer(episodes, path)
        back = load_episodes(path)
        assert back.observation_space == spec
        chosen = back.select_observation_keys(["observation", "desired_goal"])
        np.testing.assert_array_equal(chosen.observations, np.concatenate([obs[:, 4:], obs[:, 2:4]], 1))
        assert chosen.observation_space == DictObservations(("observation", "desired_goal"), (4, 2))
        assert chosen.metadata["obs_keys"] == ["observation", "desired_goal"]
    with pytest.raises(ConfigError, match=r"obs_keys: no observation key 'goal' .* in "):
        episodes.select_observation_keys(["goal"])


def test_image_episode_set_refuses_wrong_frames():
    frames = np.zeros((4, 36, 36), np.uint8)
    with pytest.raises(DatasetError, match=r"'observations' must be uint8 frames \(N, 40, 40\)"):
        EpisodeSet.from_flags(frames, np.zeros(4, int), np.zeros(4), np.zeros(4, bool),
                              np.zeros(4, bool), observation_space=ImageObservations((40, 40), 4))
    with pytest.raises(DatasetError, match=r"uint8 frames of shape \(4, 36, 36\) need "
                                           r"observation_space=ImageObservations"):
        EpisodeSet.from_flags(frames, np.zeros(4, int), np.zeros(4), np.zeros(4, bool),
                              np.zeros(4, bool))


# ---- the Atari preset --------------------------------------------------------------------------
def test_preset_atari_expands_to_the_dt_papers_settings_and_later_flags_win(tmp_path, capsys):
    """Presets are config objects: `dtlab train --preset atari` parses with their values as the
    defaults, and the command line's own flags win."""
    from dtlab.cli_errors import train_defaults

    args, defaults = train_defaults(["--dataset", "d", "--env", "ALE/Pong-v5", "--preset",
                                     "atari", "--lr", "1e-4"])
    assert "--preset" not in args and defaults == train_preset("atari")
    cfg = tyro.cli(TrainConfig, args=args, default=defaults)
    m, o = cfg.model, cfg.optim
    assert (m.n_layers, m.n_heads, m.embed_dim, m.context_len, m.activation, m.max_ep_len) == \
        (6, 8, 128, 30, "gelu", 27_000)
    assert (o.batch_size, o.betas, o.weight_decay, o.grad_clip, o.schedule, o.warmup_steps) == \
        (128, (0.9, 0.95), 0.1, 1.0, "cosine", 3)
    assert o.lr == 1e-4  # the command line's own flag wins over the preset's 6e-4
    pong = tyro.cli(TrainConfig, args=["--dataset", "d", "--env", "e"],
                    default=train_preset("atari-pong"))
    assert (pong.model.context_len, pong.optim.batch_size, pong.optim.lr) == (50, 512, 6e-4)
    cpu = tyro.cli(TrainConfig, args=["--dataset", "d", "--env", "e"], default=train_preset("cpu"))
    assert (cpu.run.steps, cpu.optim.warmup_steps, cpu.evaluation.eval_every,
            cpu.optim.ema_decay) == (15_000, 1_000, 2_500, 0.999)
    assert TRAIN_PRESETS == ("cpu", "atari", "atari-pong")
    with pytest.raises(ConfigError, match=r"unknown --preset 'mujoco' \(cpu, atari, atari-pong\)"):
        train_preset("mujoco")
