"""Runs and evaluations never report success with bad numbers (issue 10): impossible targets,
episodes past the model's max_ep_len, runs whose steps were skipped, runs that fail before their
first checkpoint, unavailable devices, resume without a checkpoint, wall-clock checkpoints."""

import json
import math
import shutil
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dtlab.trainer as train_module  # where the step and its loss live
from dtlab import checkpoint
from dtlab.atomic import dumps_json, write_json
from dtlab.cli import main
from dtlab.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from dtlab.evaluate import EvalConfig
from dtlab.data import EpisodeSet
from dtlab.data.formats import save_episodes
from dtlab.errors import ConfigError, DtlabWarning, TrainingError
from dtlab.evaluate import evaluate_checkpoint
from dtlab.train import train
from tests.configs import train_config

TINY = ModelConfig(embed_dim=16, n_layers=1, n_heads=1, context_len=4, max_ep_len=200)


def pendulum_data(n_episodes=3, length=200, seed=0):
    rng = np.random.default_rng(seed)
    n = n_episodes * length
    trunc = np.zeros(n, bool)
    trunc[length - 1::length] = True
    return EpisodeSet.from_flags(rng.normal(size=(n, 3)), rng.uniform(-2, 2, (n, 1)),
                                 -rng.uniform(0, 5, n), np.zeros(n, bool), trunc)


def cfg(tmp_path, name="run", **kw):
    base = dict(dataset="<memory>", env="Pendulum-v1", out=str(tmp_path / name), steps=8,
                batch_size=4, warmup_steps=2, log_every=2, checkpoint_every=4, progress=False,
                tensorboard=False, model=TINY)
    return train_config(**{**base, **kw})


def run_cli(capsys, *argv):
    code = main(list(map(str, argv)))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def short_model_run(tmp_path_factory):
    """A checkpoint trained with max_ep_len 50 on 200-step Pendulum episodes, truncated."""
    out = tmp_path_factory.mktemp("short") / "run"
    train(train_config(dataset="<memory>", env="Pendulum-v1", out=str(out), steps=4, batch_size=4,
                       warmup_steps=2, progress=False, tensorboard=False, truncate_long_episodes=True,
                       model=ModelConfig(embed_dim=16, n_layers=1, context_len=4, max_ep_len=50)),
          pendulum_data())
    return out


def test_evaluation_past_max_ep_len_is_refused_unless_capped(short_model_run, tmp_path, capsys):
    results = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "evaluate", short_model_run, "--targets", -200, "--episodes", 1,
                           "--out", results)
    assert code == 2 and err.count("\n") == 1
    assert "episodes run up to 200 steps but the model's max_ep_len is 50" in err
    assert "--max-steps 50 or fewer" in err and not results.exists()
    code, _, err = run_cli(capsys, "evaluate", short_model_run, "--targets", -200, "--episodes", 1,
                           "--max-steps", 50, "--out", results)
    assert code == 0, err
    data = json.loads(results.read_text())
    assert data["results"][0]["lengths"] == [50]
    assert data["results"][0]["normalized_mean"] is None  # cut below the standard 200 steps


def test_training_refuses_evaluation_past_max_ep_len_before_it_starts(tmp_path):
    short = ModelConfig(embed_dim=16, n_layers=1, context_len=4, max_ep_len=50)
    with pytest.raises(ConfigError, match="episodes run up to 200 steps but the model's max_ep_len "
                                          "is 50"):
        train(cfg(tmp_path, model=short, truncate_long_episodes=True, eval_episodes=1),
              pendulum_data())
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("target", ["nan", "inf", "-inf", "1e30"])
def test_non_finite_or_absurd_targets_are_refused(short_model_run, tmp_path, capsys, target):
    results = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "evaluate", short_model_run, "--targets", target, "--max-steps", 5,
                           "--out", results)
    assert code == 2 and err.startswith("dtlab: error: --targets must be") and err.count("\n") == 1
    assert not results.exists()


@pytest.mark.parametrize("flag,value,field", [
    ("--lr", "nan", "lr"), ("--lr", "-1", "lr"), ("--grad-clip", "inf", "grad_clip"),
    ("--return-scale", "0", "return_scale"), ("--steps", "0", "steps"),
    ("--model.dropout", "1.5", "model.dropout"), ("--eval-targets", "nan", "eval_targets"),
    ("--checkpoint-every-minutes", "-1", "checkpoint_every_minutes"), ("--threads", "0", "threads"),
])
def test_numeric_train_options_refuse_bad_values_naming_the_flag(tmp_path, capsys, flag, value,
                                                                  field):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--dataset", "x.hdf5", "--env", "Pendulum-v1",
                           "--out", out, flag, value)
    assert code == 2 and err.startswith(f"dtlab: error: {flag} must be") and err.count("\n") == 1
    assert not out.exists()


def test_api_configs_validate_themselves():
    with pytest.raises(ConfigError, match=r"^--lr must be > 0, got -0.1$"):
        OptimConfig(lr=-0.1)
    with pytest.raises(ConfigError, match=r"^--episodes must be >= 1, got 0$"):
        EvalConfig("ckpt", episodes=0)
    with pytest.raises(ConfigError, match=r"^--betas must be < 1"):
        OptimConfig(betas=(0.9, 1.0))
    with pytest.raises(ConfigError, match=r"^--return-scale must be a finite number"):
        DataConfig("x", "Pendulum-v1", return_scale=float("nan"))


def test_unavailable_device_is_a_dtlab_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=r"^device: 'cuda' requested but CUDA is not available"):
        train(cfg(tmp_path, device="cuda"), pendulum_data())
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"^device: invalid device 'gpu0'"):
        train(cfg(tmp_path, device="gpu0"), pendulum_data())



def test_run_failing_before_its_first_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    real = train_module.action_loss
    monkeypatch.setattr(train_module, "action_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(TrainingError, match="non-finite loss or gradient at step 1"):
        train(cfg(tmp_path), pendulum_data())
    assert not (tmp_path / "run").exists()
    # In a directory that existed before, only what the run created goes.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(TrainingError):
        train(cfg(tmp_path, "mine"), pendulum_data())
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_a_run_whose_steps_were_mostly_skipped_fails(tmp_path, monkeypatch):
    real = train_module.action_loss
    monkeypatch.setattr(train_module, "action_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(TrainingError, match=r"^10 of 10 steps were skipped as non-finite"):
        train(cfg(tmp_path, steps=40, log_every=10, checkpoint_every=100, skip_nonfinite=True),
              pendulum_data())


def test_likely_cause_names_returns_far_beyond_the_return_scale(tmp_path, monkeypatch):
    data = pendulum_data()
    huge = EpisodeSet.from_flags(data.observations, data.actions, data.rewards * 1e7,
                                 data.terminations, data.truncations)
    real = train_module.action_loss
    monkeypatch.setattr(train_module, "action_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(TrainingError, match=r"likely cause: returns-to-go reach .* times the return "
                                            r"scale \(100\)"):
        train(cfg(tmp_path), huge)


def test_resume_without_a_checkpoint_starts_from_step_zero(tmp_path, capsys):
    data = pendulum_data()
    run = tmp_path / "run"
    run.mkdir()
    full = train(cfg(tmp_path, "full"), data)
    # A run killed before its first save left only its settings behind.
    (run / "train_config.json").write_text((tmp_path / "full" / "train_config.json").read_text()
                                           .replace(str(tmp_path / "full"), str(run)))
    with pytest.warns(DtlabWarning, match="settings but no checkpoint yet; starting from step 0"):
        resumed = train(cfg(tmp_path, resume=True), data)
    assert resumed.steps == 8
    for key, value in load_file(str(full.checkpoint / "model.safetensors")).items():
        assert torch.equal(value, load_file(str(resumed.checkpoint / "model.safetensors"))[key])
    # Different settings are still refused, naming what differs.
    with pytest.raises(ConfigError, match=r"optim.lr: 0.0001 -> 0.001"):
        train(cfg(tmp_path, resume=True, lr=1e-3), data)


def test_resume_without_a_checkpoint_names_the_dataset_as_given(tmp_path, monkeypatch):
    """The note for settings without a checkpoint names the dataset as the user typed it (a
    relative path), not the absolute one the run records, beside the file the settings name;
    a run saved in the flat format of before issue 9 (data fields at the top level) too."""
    monkeypatch.chdir(tmp_path)
    save_episodes(pendulum_data(), tmp_path / "now.hdf5")
    run = tmp_path / "run"
    train(cfg(tmp_path, "full", dataset="now.hdf5"))
    settings = json.loads((tmp_path / "full" / "train_config.json").read_text())
    settings["data"]["dataset"] = "/elsewhere/then.hdf5"
    flat = {**settings["data"], **settings["optim"], "model": settings["model"],
            "steps": settings["run"]["steps"]}
    for recorded in (settings, flat):
        run.mkdir()
        (run / "train_config.json").write_text(json.dumps(recorded))
        with pytest.warns(DtlabWarning) as caught:
            train(cfg(tmp_path, resume=True, dataset="now.hdf5"))
        said = [str(w.message) for w in caught if "no checkpoint yet" in str(w.message)]
        assert len(said) == 1 and said[0].endswith("starting from step 0, on now.hdf5 (the run's "
                                                   "settings name /elsewhere/then.hdf5)"), said
        shutil.rmtree(run)  # the next round starts from settings only again


def test_wall_clock_checkpoints_keep_resume_bit_exact(tmp_path):
    data = pendulum_data()
    # A tiny interval: a checkpoint after every step; resume from step 5 equals the full run.
    every = train(cfg(tmp_path, "every", checkpoint_every=1000, checkpoint_every_minutes=1e-9,
                      keep_checkpoints=10), data)
    steps = sorted(p.name for p in (tmp_path / "every").glob("step_*"))
    assert steps == [f"step_{i:08d}" for i in range(1, 9)]
    plain = train(cfg(tmp_path, "plain"), data)
    for key, value in load_file(str(plain.checkpoint / "model.safetensors")).items():
        assert torch.equal(value, load_file(str(every.checkpoint / "model.safetensors"))[key])


def test_every_json_dtlab_writes_is_strict(tmp_path):
    write_json(tmp_path / "x.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": 2})
    text = (tmp_path / "x.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": 2}
    assert dumps_json({"x": -math.inf}, indent=None) == '{"x": null}'


def test_env_with_a_nonstandard_time_limit_gets_no_normalized_score(short_model_run):
    from gymnasium.envs.classic_control.pendulum import PendulumEnv
    from dtlab.policy import DTPolicy
    from dtlab.rollout import rollout

    gym.register("dtlab-test/Pendulum-v9", entry_point=PendulumEnv, max_episode_steps=40)
    policy = DTPolicy.from_checkpoint(short_model_run)
    report = rollout(policy, "dtlab-test/Pendulum-v9", (-100.0,), 2)
    assert report.max_steps == 40 and report.standard_time_limit == 200 and not report.comparable
    assert report.results[0].normalized_mean is None and report.results[0].lengths == [40, 40]


def test_training_writes_strict_json_metrics_when_no_step_in_a_window_was_applied(tmp_path,
                                                                                monkeypatch):
    real = train_module.action_loss
    calls = {"n": 0}

    def nan_on_first_two(*args):
        calls["n"] += 1
        return real(*args) * (float("nan") if calls["n"] <= 2 else 1.0)

    monkeypatch.setattr(train_module, "action_loss", nan_on_first_two)
    train(cfg(tmp_path, skip_nonfinite=True), pendulum_data())
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert "NaN" not in "".join(lines)
    assert json.loads(lines[0])["loss"] is None and json.loads(lines[0])["skipped_nonfinite"] == 2


def test_policy_refuses_bad_targets_and_acting_before_reset(short_model_run):
    from dtlab.policy import DTPolicy

    policy = DTPolicy.from_checkpoint(short_model_run)
    with pytest.raises(ConfigError, match="call reset"):
        policy.act(np.zeros(3, np.float32))
    with pytest.raises(ConfigError,
                       match=r"^reset's target_return must be a finite number, got nan"):
        policy.reset(float("nan"))
    policy.reset([-100.0, -200.0])
    with pytest.raises(ConfigError, match=r"^steer's return_to_go must be <= 1e\+09"):
        policy.steer(1e30)
    with pytest.raises(ConfigError, match=r"^steer's return_to_go must be a finite number"):
        policy.steer(float("nan"))  # (NaN also marks "no steer pending": never silently ignored)


@pytest.mark.parametrize("field,value", [("batch_size", 1.5), ("steps", 10.5), ("seed", 2**70),
                                         ("schedule", "linear"), ("precision", "fp16")])
def test_configs_refuse_wrong_types_and_choices(tmp_path, field, value):
    with pytest.raises(ConfigError, match=rf"^--{field.replace('_', '-')} must be"):
        cfg(tmp_path, **{field: value})


def test_resume_may_switch_on_skip_nonfinite(tmp_path):
    data = pendulum_data()
    train(cfg(tmp_path, steps=4), data)
    resumed = train(cfg(tmp_path, resume=True, skip_nonfinite=True), data)
    assert resumed.steps == 8


def test_a_run_in_new_nested_directories_that_fails_removes_them_all(tmp_path, monkeypatch):
    real = train_module.action_loss
    monkeypatch.setattr(train_module, "action_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(TrainingError):
        train(cfg(tmp_path, "a/b/run"), pendulum_data())
    assert not (tmp_path / "a").exists()


def test_a_stop_request_while_loading_writes_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path), pendulum_data(), should_stop=lambda: True)
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "p.hdf5").write_bytes(b"keep")
    save_episodes(pendulum_data(n_episodes=1), tmp_path / "data.hdf5")
    for out in (tmp_path / "p.hdf5", tmp_path / "p.hdf5" / "run"):
        code, _, err = run_cli(capsys, "train", "--dataset", tmp_path / "data.hdf5", "--env",
                               "Pendulum-v1", "--out", out, "--steps", 5, "--warmup-steps", 1,
                               "--model.max-ep-len", 200)
        assert code == 2 and "is a file; --out must be a run directory" in err and err.count("\n") == 1
    assert (tmp_path / "p.hdf5").read_bytes() == b"keep"
    code, _, err = run_cli(capsys, "evaluate", tmp_path / "p.hdf5")
    assert code == 2 and "is a file, not a checkpoint or run directory" in err
    code, _, err = run_cli(capsys, "benchmark", "--out", tmp_path / "nothing", "--report-only")
    assert code == 2 and "no benchmark here" in err and not (tmp_path / "nothing").exists()


def test_an_average_too_slow_for_the_run_is_warned(tmp_path):
    """--ema-decay 0.99 over 8 steps: the average gives 0.99^7 = 93% of its weight to the first
    step's weights, warned with a decay that fits (1 - 5/8 = 0.375); 0.5 over 8 steps (0.8%)
    is not."""
    with pytest.warns(DtlabWarning, match=r"--ema-decay 0.99 over --steps 8: the average that "
                                          r"is evaluated and saved still gives 93% of its weight "
                                          r"to the first step's weights at the end; use "
                                          r"--ema-decay 0.375 or lower"):
        train(cfg(tmp_path, ema_decay=0.99), pendulum_data())
    with warnings.catch_warnings():
        warnings.simplefilter("error", DtlabWarning)
        train(cfg(tmp_path / "fits", ema_decay=0.5), pendulum_data())


def test_a_warm_up_longer_than_the_run_is_warned(tmp_path):
    """Warned when the rate never arrives (the last step applies lr x steps / warm-up); not when
    the warm-up ends exactly at the last step, which applies lr itself."""
    with pytest.warns(DtlabWarning, match=r"--warmup-steps 10 > --steps 8: the learning rate "
                                          r"never reaches lr \(0.0001\); it ends at 8e-05"):
        train(cfg(tmp_path, warmup_steps=10), pendulum_data())
    with warnings.catch_warnings():
        warnings.simplefilter("error", DtlabWarning)
        train(cfg(tmp_path / "equal", warmup_steps=8), pendulum_data())
