"""Hugging Face Transformers' DecisionTransformerModel in and out (dtlab.interop.huggingface),
against the real library: a model built by transformers and its dtlab conversion predict the same
actions; dtlab -> HF -> dtlab is bit for bit; what cannot be mapped is refused in one line."""

import json

import h5py
import numpy as np
import pytest
import torch
from transformers import DecisionTransformerConfig, DecisionTransformerModel

from dtlab import checkpoint
from dtlab.errors import ConfigError
from dtlab.interop.huggingface import from_hf, to_hf
from tests.configs import HOPPER_DATA, box, make_checkpoint
from dtlab.spaces import VectorObservations

CONFIGS = [  # (env, transformers config)
    ("Hopper-v5", dict(state_dim=11, act_dim=3, hidden_size=32, n_layer=2, n_head=2,
                       max_ep_len=100)),
    ("Pendulum-v1", dict(state_dim=3, act_dim=1, hidden_size=24, n_layer=1, n_head=3,
                         activation_function="gelu", n_inner=48, max_ep_len=50)),
    ("HalfCheetah-v5", dict(state_dim=17, act_dim=6, hidden_size=16, n_layer=3, n_head=4,
                            max_ep_len=1000, reorder_and_upcast_attn=True, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)),
]


def hf_model(tmp_path, seed=0, **config):
    torch.manual_seed(seed)
    model = DecisionTransformerModel(DecisionTransformerConfig(**config, bos_token_id=None,
                                                               eos_token_id=None)).eval()
    with torch.no_grad():  # wider than the 0.02 init, so that every weight (wpe[0] too) matters
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape))
    path = tmp_path / f"hf{seed}"
    model.save_pretrained(path)
    return model, path


def inputs(b, k, state_dim, act_dim, max_ep_len, seed=0, pad=(0, 2, 5)):
    """Windows with left padding of ``pad[i]`` steps for batch row i (zeros there, as dtlab's)."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(b, k, state_dim, generator=g)
    actions = torch.rand(b, k, act_dim, generator=g) * 2 - 1
    rtg = torch.randn(b, k, 1, generator=g)
    start = torch.randint(0, max_ep_len - k, (b, 1), generator=g)
    timesteps = start + torch.arange(k)
    masks = torch.ones(b, k, dtype=torch.bool)
    for i, p in enumerate(pad[:b]):
        masks[i, :p] = False
    keep = masks[..., None]
    return states * keep, actions * keep, rtg * keep, timesteps * masks, masks


@pytest.mark.parametrize("env,config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_a_transformers_model_and_its_conversion_predict_the_same_actions(tmp_path, env, config):
    hf, path = hf_model(tmp_path, **config)
    k = 8
    out = from_hf(str(path), tmp_path / "run", env=env, obs_mean=[0.0] * config["state_dim"],
                  obs_std=[1.0] * config["state_dim"], context_len=k)
    model, info = checkpoint.load(out)
    assert info.model.context_len == k and info.model.n_heads == config["n_head"]
    s, a, r, t, m = inputs(3, k, config["state_dim"], config["act_dim"], config["max_ep_len"])
    with torch.no_grad():
        ours = model(s, a, r, t, m)  # (B, K, act_dim)
        theirs = hf(states=s, actions=a, rewards=torch.zeros_like(r), returns_to_go=r,
                    timesteps=t, attention_mask=m.long(), return_dict=True).action_preds
    assert ours.abs().max() > 0.3  # actions far from 0: the comparison is not trivially met
    torch.testing.assert_close(ours[m], theirs[m], atol=1e-5, rtol=0)


def test_dtlab_to_hf_to_dtlab_is_bit_for_bit_and_transformers_loads_it(tmp_path):
    run = make_checkpoint(tmp_path, "Hopper-v5", VectorObservations(11), box("Hopper-v5"),
                          k=5, max_ep_len=200, returns=(0.0, 3000.0))
    hf_dir = to_hf(run, tmp_path / "hf")
    back = from_hf(str(hf_dir), tmp_path / "back")
    model, info = checkpoint.load(run)
    model2, info2 = checkpoint.load(back)
    for (key, value), (key2, value2) in zip(model.state_dict().items(),
                                           model2.state_dict().items()):
        assert key == key2 and torch.equal(value, value2), key
    first, second = info.to_json(), info2.to_json()
    assert second["dataset"].pop("converted_from") == str(hf_dir)
    assert first == second

    hf = DecisionTransformerModel.from_pretrained(hf_dir).eval()  # Transformers reads it
    s, a, r, t, m = inputs(3, 5, 11, 3, 200, seed=1, pad=(0, 1, 3))
    with torch.no_grad():
        ours = model(s, a, r, t, m)
        theirs = hf(states=s, actions=a, rewards=torch.zeros_like(r), returns_to_go=r,
                    timesteps=t, attention_mask=m.long(), return_dict=True).action_preds
    torch.testing.assert_close(ours[m], theirs[m], atol=1e-5, rtol=0)
    assert json.loads((hf_dir / "config.json").read_text())["dtlab"]["normalizer"] == \
        info.normalizer.to_json()


def test_pickled_weights_load_only_as_tensors_and_stats_come_from_a_dataset(tmp_path):
    hf, path = hf_model(tmp_path, state_dim=11, act_dim=3, hidden_size=16, n_layer=1,
                        max_ep_len=1000)
    (path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), path / "pytorch_model.bin")
    out = from_hf(str(path), tmp_path / "run", env="Hopper-v5", dataset=str(HOPPER_DATA))
    _, info = checkpoint.load(out)
    with h5py.File(HOPPER_DATA) as f:
        obs = f["observations"][:].astype(np.float64)
    np.testing.assert_allclose(info.normalizer.obs_mean, obs.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(info.normalizer.obs_std, obs.std(0) + 1e-6, rtol=1e-5)
    assert info.normalizer.return_scale == 1000.0 and info.model.context_len == 20
    assert info.dataset["episodes"] > 0  # the dataset's record, for calibrate and the model card

    (path / "pytorch_model.bin").write_bytes(b"\x80\x02cos\nsystem\n.")  # a pickle calling code
    with pytest.raises(Exception, match="cannot read the weights safely"):
        from_hf(str(path), tmp_path / "run2", env="Hopper-v5", dataset=str(HOPPER_DATA))


@pytest.mark.parametrize("change,words", [
    (dict(activation_function="gelu_new"), "activation_function 'gelu_new'"),
    (dict(action_tanh=False), "action_tanh"),
    (dict(resid_pdrop=0.2), "differ"),
    (dict(n_inner=20), "n_inner 20"),
    (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
])
def test_what_dtlab_cannot_represent_is_refused_in_one_line(tmp_path, capsys, change, words):
    from dtlab.cli import main

    _, path = hf_model(tmp_path, state_dim=3, act_dim=1, hidden_size=8, n_layer=1,
                       max_ep_len=10, **change)
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["interop", "from-hf", str(path), str(tmp_path / "run"), "--env", "Pendulum-v1",
                 "--obs-mean", "0", "0", "0", "--obs-std", "1", "1", "1"]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_missing_statistics_or_env_name_the_flags(tmp_path):
    _, path = hf_model(tmp_path, state_dim=3, act_dim=1, hidden_size=8, n_layer=1, max_ep_len=10)
    with pytest.raises(ConfigError, match="--env"):
        from_hf(str(path), tmp_path / "a")
    with pytest.raises(ConfigError, match="--dataset FILE .* --obs-mean and --obs-std"):
        from_hf(str(path), tmp_path / "b", env="Pendulum-v1")


def test_an_env_whose_spaces_do_not_fit_is_refused_naming_it(tmp_path):
    """A Pendulum-shaped model (state_dim 3, act_dim 1) converted with --env Hopper-v5 (11
    observations, 3 actions) or with the right actions but the wrong observations."""
    from dtlab.errors import EnvError

    _, path = hf_model(tmp_path, state_dim=3, act_dim=1, hidden_size=8, n_layer=1, max_ep_len=10)
    with pytest.raises(EnvError, match=r"^Hopper-v5: action space .* does not fit .*act_dim 1 "
                                       r"\(continuous, bounded\) \(--env\)"):
        from_hf(str(path), tmp_path / "a", env="Hopper-v5", obs_mean=[0.0] * 3, obs_std=[1.0] * 3)
    _, path = hf_model(tmp_path / "m", state_dim=4, act_dim=1, hidden_size=8, n_layer=1,
                       max_ep_len=10)
    with pytest.raises(EnvError, match=r"^Pendulum-v1: observations .* do not fit .*state_dim 4"):
        from_hf(str(path), tmp_path / "b", env="Pendulum-v1", obs_mean=[0.0] * 4,
                obs_std=[1.0] * 4)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_to_hf_and_back(tmp_path, capsys):
    from dtlab.cli import main

    run = make_checkpoint(tmp_path, "Pendulum-v1", VectorObservations(3), box("Pendulum-v1"))
    assert main(["interop", "to-hf", str(run), str(tmp_path / "hf")]) == 0
    assert main(["interop", "from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "latest").is_file()
    discrete = make_checkpoint(tmp_path / "d", "CartPole-v1", VectorObservations(4),
                               __import__("dtlab.spaces").spaces.DiscreteActions(2))
    capsys.readouterr()
    assert main(["interop", "to-hf", str(discrete), str(tmp_path / "hf2")]) == 2
    assert "discrete actions" in capsys.readouterr().err and not (tmp_path / "hf2").exists()
