"""The benchmark scripts that take a checkpoint run end to end on a tiny one (their figures are
in docs/benchmarks.md; a script that no longer runs would leave those figures unreproducible)."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def sensitive_checkpoint(tiny_checkpoint, out: Path, context_len: int) -> Path:
    """The tiny checkpoint's records with a 2-layer model of large random weights (N(0, 0.3), as
    tests/test_model.py uses): its actions move with every input, so a rollout that computes
    anything other than the exact model shows in the returns within a few steps."""
    from dtlab import checkpoint
    from dtlab.baselines import build_model

    _, info = checkpoint.load(tiny_checkpoint)
    info = replace(info, model=replace(info.model, n_layers=2, context_len=context_len,
                                       dropout=0.0))
    torch.manual_seed(0)
    model = build_model(info.model, info.observation_space, info.action_space)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return checkpoint.save(out, "step_00000000", model, info)


def test_eval_variants_quality_compares_separate_rollouts(tiny_checkpoint, tmp_path):
    """Every variant is its own rollout, compared with a separate exact reference rollout: a
    second exact rollout repeats it exactly; episodes of K steps lie inside the kv-cache's
    window, so its returns equal the exact ones up to float rounding; bf16 differs (the
    difference is measured, not a value compared with itself)."""
    k = 20
    ckpt = sensitive_checkpoint(tiny_checkpoint, tmp_path / "run", k)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "eval_variants_quality.py"), str(ckpt),
         "--episodes", "2", "--targets", "-300", "-100", "--max-steps", str(k)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{\n"):])
    assert summary["targets"] == [-300.0, -100.0] and summary["episodes"] == 2
    assert summary["context_len"] == k and summary["max_steps"] == k
    for name in ("exact_fp32", "bf16", "kv_cache", "kv_cache_bf16"):
        assert len(summary[name]["mean"]) == 2 and summary[name]["env_steps_per_s"] > 0
    diff = {name: summary[name]["max_abs_episode_diff_vs_exact"]
            for name in ("exact_fp32", "bf16", "kv_cache", "kv_cache_bf16")}
    assert diff["exact_fp32"] == 0.0, diff  # rollouts from the same seeds repeat exactly
    # Float rounding only (6e-7 measured); a wrong mask, embedding or cache write gives 4e-4 to 1.
    assert diff["kv_cache"] < 3e-5, diff
    assert diff["bf16"] > 1e-4 and diff["kv_cache_bf16"] > 1e-4, diff  # 5e-3 measured


def test_stability_summary_against_hand_computed_values(monkeypatch):
    """benchmarks/stability.py's per-seed figures on a curve worked by hand: evaluations every
    2,500 steps of 15,000; the late swing uses the evaluations from step 7,500 on."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from stability import summary

    curve = {2500: {"1": 10.0}, 5000: {"1": 30.0}, 7500: {"1": 20.0}, 10000: {"1": 40.0},
             12500: {"1": 10.0}, 15000: {"1": 30.0}}
    out = summary([curve], "1", reps=10, steps=15_000)
    by_hand = {"last": 30.0, "final": (40 + 10 + 30) / 3, "best": 40.0,
               "swing": (20 + 10 + 20 + 30 + 20) / 5,  # |30-10|, |20-30|, ...
               "late_swing": (20 + 30 + 20) / 3,  # 20 -> 40 -> 10 -> 30
               "gap": 40.0 - 30.0}
    for key, value in by_hand.items():
        assert abs(out[key]["per_seed"][0] - value) < 1e-9, key
    # Of 20,000 steps, a run stopped at 10,000 has one late evaluation: no late swing (not
    # NaN), and the IQM is the other seed's, (30 + 20) / 2 from 40 -> 10 -> 30.
    stopped = {step: curve[step] for step in (2500, 5000, 7500, 10000)}
    out = summary([curve, stopped], "1", reps=10, steps=20_000)
    assert out["late_swing"]["per_seed"] == [25.0, None]
    assert out["late_swing"]["iqm"] == 25.0


def test_stability_include_joins_earlier_seeds_and_refuses_other_settings(tmp_path, monkeypatch,
                                                                         capsys):
    """--include: an earlier report's seeds join the summary (by hand: two seeds' last scores
    10 and 30 at target 1, IQM of two = their mean 20); a report run at other targets, or one
    holding a seed reported twice, or one run at another learning rate, is refused in one line
    with exit code 2."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from stability import main

    def record(path, seeds, targets, last):
        curves = {"ema": [{"2500": 0.0, "5000": v} for v in last],
                  "raw": [{"2500": 5.0, "5000": v + 1} for v in last]}
        settings = {"dataset": "elsewhere/data.hdf5", "env": "Hopper-v5", "seeds": seeds,
                    "steps": 5000, "warmup_steps": 1000, "eval_every": 2500, "eval_episodes": 10,
                    "ema_decay": 0.999, "schedule": "constant", "targets": targets}
        path.write_text(json.dumps({"settings": settings, "targets": {
            f"{t:g}": {"curves": curves} for t in targets}}))
        return str(path)

    a = record(tmp_path / "a.json", [0], [1], [10.0])
    b = record(tmp_path / "b.json", [1], [1.0], [30.0])
    base = ["--dataset", "data.hdf5", "--env", "Hopper-v5", "--out", str(tmp_path / "out"),
            "--steps", "5000", "--targets", "1", "--report-only", "--reps", "10"]
    args = base + ["--seeds", "7", "8"]
    seed7 = tmp_path / "out" / "seed7"  # a run here whose raw weights are not evaluated yet
    seed7.mkdir(parents=True)
    (tmp_path / "out" / "seed8").mkdir()  # a run that has not evaluated yet: left out too
    (tmp_path / "out" / "seed8" / "metrics.jsonl").write_text(json.dumps({"step": 100,
                                                                         "loss": 1.0}))
    (seed7 / "metrics.jsonl").write_text(json.dumps({"step": 2500, "eval/normalized_1": 4.0}))
    assert main(args + ["--include", a, b]) == 0
    err = capsys.readouterr().err
    assert "seed 7: raw weights evaluated at 0 of the average's 1" in err
    assert "seed 8: raw weights evaluated at 0 of the average's 0" in err
    report = json.loads((tmp_path / "out" / "stability.json").read_text())
    assert report["settings"]["seeds"] == [0, 1]  # seed 7 is left out until it has both curves
    png = (tmp_path / "out" / "stability.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["targets"]["1"]["ema"]["last"]["per_seed"] == [10.0, 30.0]
    assert report["targets"]["1"]["ema"]["last"]["iqm"] == 20.0
    assert report["targets"]["1"]["raw"]["swing"]["per_seed"] == [6.0, 26.0]  # |11-5|, |31-5|
    (seed7 / "raw_evaluations.json").write_text(json.dumps({"2500": {"1": 6.0}}))
    assert main(args + ["--include", a]) == 0
    report = json.loads((tmp_path / "out" / "stability.json").read_text())
    assert report["settings"]["seeds"] == [0, 7]  # in seed order, wherever each came from
    assert report["targets"]["1"]["raw"]["last"]["per_seed"] == [11.0, 6.0]
    capsys.readouterr()
    uneven = record(tmp_path / "d.json", [3], [1], [1.0])
    data = json.loads(Path(uneven).read_text())
    del data["targets"]["1"]["curves"]["raw"][0]["5000"]  # raw weights not evaluated at 5000
    Path(uneven).write_text(json.dumps(data))
    for bad, message in ((record(tmp_path / "c.json", [2], [2], [1.0]), "its targets is [2.0]"),
                         (a, "seeds [0] are reported twice"),
                         (uneven, "seed 3's average and raw weights were evaluated at "
                                  "different steps ([2500, 5000] and [2500])")):
        assert main(base + ["--seeds", "9", "--include", a, bad]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    # a report from before --lr existed ran at dtlab's default 1e-4: refused beside another lr;
    # one from before --precision ran at fp32: refused beside bf16
    assert main(base + ["--seeds", "9", "--lr", "3e-4", "--include", a]) == 2
    err = capsys.readouterr().err
    assert "its lr is 0.0001, this report's is 0.0003" in err, err
    assert main(base + ["--seeds", "9", "--precision", "bf16", "--include", a]) == 2
    err = capsys.readouterr().err
    assert "its precision is 'fp32', this report's is 'bf16'" in err, err


def test_odt_control_copies_the_offline_run_and_redoes_a_cut_copy(tmp_path, monkeypatch):
    """benchmarks/odt.py's control starts from a copy of the offline run: its files (`latest`
    a text file naming the checkpoint, as dtlab writes it), no lock, the saved out path
    rewritten; a copy cut short (left as control.partial) is made again, and a finished copy
    is continued, not copied over."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import odt

    offline = tmp_path / "offline"
    (offline / "step_00000010").mkdir(parents=True)
    (offline / "step_00000010" / "model.safetensors").write_bytes(b"weights")
    (offline / "latest").write_text("step_00000010")
    (offline / ".lock").write_text("123")
    (offline / "train_config.json").write_text(json.dumps({"run": {"out": str(offline)}}))
    calls = []
    monkeypatch.setattr(odt, "dtlab", lambda *args: calls.append(args))
    out = tmp_path / "control"
    (tmp_path / "control.partial").mkdir()  # the cut copy: only a `latest`, nothing it names
    (tmp_path / "control.partial" / "latest").write_text("step_00000010")
    odt.control(offline, out, 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["control", "offline"]
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step_00000010",
                                                      "train_config.json"]
    assert (out / "step_00000010" / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((out / "train_config.json").read_text())["run"]["out"] == str(out)
    assert calls == [("train", "--out", str(out), "--resume", "--steps", "20", "--no-progress")]
    (out / "step_00000020").mkdir()  # trained on since: continued as it is
    odt.control(offline, out, 30)
    assert (out / "step_00000020").exists() and len(calls) == 2


def test_stability_refuses_a_run_trained_with_other_settings_in_one_line(tmp_path, monkeypatch,
                                                                        capsys):
    """A run in --out/seedN trained with another learning rate (here 1e-3 against --lr's 1e-4)
    is refused in one line naming the setting, exit code 2, not reported under this --lr."""
    from tests.configs import pendulum_like
    from tests.test_train import config

    from dtlab.train import train

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from stability import main

    train(config(tmp_path / "out", "seed9", steps=2, lr=1e-3), pendulum_like())
    assert main(["--dataset", "data.hdf5", "--env", "Pendulum-v1", "--out", str(tmp_path / "out"),
                 "--seeds", "9", "--report-only", "--reps", "10"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.001 -> 0.0001" in err and len(err.strip().splitlines()) == 1, err


def test_stability_evaluates_raw_weights_at_the_runs_precision(tmp_path, monkeypatch):
    """The raw weights are evaluated at the precision the run trained (and evaluated its average)
    at: a bf16 run's raw weights act under bf16, as its average did during training."""
    from types import SimpleNamespace

    from tests.configs import pendulum_like
    from tests.test_train import config

    from dtlab.train import train

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import stability

    cfg = config(tmp_path, "run", steps=2, checkpoint_every=2, ema_decay=0.5, precision="bf16",
                 eval_every=2, eval_episodes=1, eval_targets=(-300.0,))
    train(cfg, pendulum_like())
    acted = []

    def evaluator(*args, **kwargs):
        def evaluate(policy):
            acted.append(policy.precision)
            return SimpleNamespace(results=[SimpleNamespace(target=-300.0, normalized_mean=1.0)])
        return evaluate

    monkeypatch.setattr(stability, "Evaluator", evaluator)
    assert stability.raw_curve(tmp_path / "run", cfg) == {2: {"-300": 1.0}}
    assert acted == ["bf16"]


def test_raw_checkpoint_holds_the_weights_a_run_without_the_average_trains(tmp_path, monkeypatch,
                                                                           capsys):
    """benchmarks/raw_checkpoint.py on an averaged run: its model is the run's raw weights, which
    are exactly the weights of the same run trained without the average (the reference), with
    the same config.json; a run without raw weights, or an existing OUT, is refused in one line
    with exit code 2."""
    from dtlab import checkpoint
    from dtlab.train import train
    from tests.configs import pendulum_like
    from tests.test_train import config, weights

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from raw_checkpoint import main

    episodes = pendulum_like()
    train(config(tmp_path, "plain", steps=5), episodes)
    train(config(tmp_path, "ema", steps=5, ema_decay=0.8), episodes)
    assert main([str(tmp_path / "ema"), str(tmp_path / "copy")]) == 0
    plain, copy, average = (weights(tmp_path / n) for n in ("plain", "copy", "ema"))
    assert all(torch.equal(copy[k], plain[k]) for k in plain)
    assert not torch.equal(copy["predict_action.weight"], average["predict_action.weight"])
    info = [checkpoint.load_info(tmp_path / n)[1].to_json() for n in ("copy", "ema")]
    assert info[0] == info[1]
    capsys.readouterr()
    for argv, words in (([tmp_path / "plain", tmp_path / "other"], "no raw weights"),
                        ([tmp_path / "ema", tmp_path / "copy"], "exists")):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "other").exists()
    state = checkpoint.load_trainer_state(checkpoint.resolve(tmp_path / "ema"))
    del state["raw_weights"]["predict_action.weight"]  # raw weights another model's
    monkeypatch.setattr(checkpoint, "load_trainer_state", lambda path: state)
    assert main([str(tmp_path / "ema"), str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "raw weights do not fit its model" in err and "predict_action.weight" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "other").exists(), err


def test_checkpoint_average_is_the_mean_of_the_raw_weights_so_far(tmp_path, monkeypatch):
    """benchmarks/checkpoint_average.py: at each step, the average is the plain mean of the raw
    weights of the checkpoints from the first step to that one (the reference: the weights of
    the same run trained without --ema-decay, whose checkpoints hold its raw weights), and the
    evaluation steps are the multiples of eval_every from --from-step on, and the last."""
    from dtlab.train import train
    from tests.configs import pendulum_like
    from tests.test_train import config, weights

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from checkpoint_average import averaged, eval_steps

    episodes = pendulum_like()
    for name, decay in (("plain", 0.0), ("ema", 0.8)):
        train(config(tmp_path, name, steps=6, checkpoint_every=2, keep_checkpoints=10,
                     ema_decay=decay), episodes)
    raw = [weights(tmp_path / "plain" / f"step_{s:08d}") for s in (2, 4, 6)]
    got = {step: {k: v.detach().clone() for k, v in model.state_dict().items()}
           for step, model, _ in averaged(tmp_path / "ema", [2, 4, 6])}
    for step, n in ((2, 1), (4, 2), (6, 3)):
        for key in raw[0]:
            mean = sum(w[key] for w in raw[:n]) / n
            assert torch.allclose(got[step][key], mean, atol=1e-6), (step, key)
    assert not torch.allclose(got[6]["predict_action.weight"], raw[2]["predict_action.weight"])
    settings = {"evaluation": {"eval_every": 2500}, "run": {"steps": 15000}}
    assert eval_steps(settings, 7500) == [7500, 10000, 12500, 15000]
    settings["run"]["steps"] = 14000
    assert eval_steps(settings, 7500) == [7500, 10000, 12500, 14000]


def test_eval_noise_floor_by_hand_by_simulation_and_on_a_run(tmp_path, monkeypatch, capsys):
    """benchmarks/eval_noise.py: the predicted floor 2 s / sqrt(pi n) (s = 1, n = 10: 0.35682),
    agreeing with a simulation of normal evaluations; the measured floor of hand-made scores
    (means 1, 4, 2: |3| and |2|, 2.5; sample variances 2, 0, 2 pooled: sqrt(4/3)); on a trained
    Pendulum run, a JSON report with one mean per repeat at each target, the repeats on disjoint
    env seeds at the run's precision; fewer than 2 repeats refused in one line, exit code 2."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import eval_noise
    from eval_noise import expected_max_of_normals, floor_of, main, predicted_floor

    from dtlab.rundir import RunDirectory
    from dtlab.train import train
    from tests.configs import pendulum_like
    from tests.test_train import config

    assert predicted_floor(1.0, 10) == pytest.approx(0.356825, abs=1e-6)
    draws = np.random.default_rng(0).normal(5.0, 3.0, size=(20_000, 10)).mean(axis=1)
    assert np.mean(np.abs(np.diff(draws))) == pytest.approx(predicted_floor(3.0, 10), rel=0.02)
    row = floor_of([[0.0, 2.0], [4.0, 4.0], [1.0, 3.0]])
    assert row["means"] == [1.0, 4.0, 2.0] and row["measured"] == 2.5
    assert row["episode_std"] == pytest.approx((4 / 3) ** 0.5)
    assert row["predicted"] == pytest.approx(2 * (4 / 3) ** 0.5 / np.sqrt(2 * np.pi))
    # the gap: E[max of 2 normals] = 1 / sqrt(pi) by hand; of 6, against a simulation
    assert expected_max_of_normals(2) == pytest.approx(1 / np.sqrt(np.pi), abs=1e-9)
    six = np.random.default_rng(1).normal(size=(200_000, 6)).max(axis=1).mean()
    assert expected_max_of_normals(6) == pytest.approx(six, rel=0.01)
    assert row["gap_measured"] == 2.0  # best 4, last 2
    assert row["gap_predicted"] == pytest.approx(expected_max_of_normals(6) * (4 / 3 / 2) ** 0.5)
    train(config(tmp_path, "run", steps=4, checkpoint_every=4, eval_targets=(-300.0,)),
          pendulum_like())
    seeds, real = [], eval_noise.Evaluator

    def recording(env, targets, episodes, seed):
        seeds.append(range(seed, seed + episodes))
        return real(env, targets, episodes, seed=seed)

    monkeypatch.setattr(eval_noise, "Evaluator", recording)
    out = tmp_path / "noise.json"
    assert main([str(tmp_path / "run"), "--episodes", "2", "--repeats", "3", "--out",
                 str(out)]) == 0
    assert [list(r) for r in seeds] == [[1000, 1001], [1002, 1003], [1004, 1005]]
    report = json.loads(out.read_text())
    assert list(report["targets"]) == ["-300"] and len(report["targets"]["-300"]["means"]) == 3
    assert report["precision"] == RunDirectory(tmp_path / "run").saved_precision()
    assert "target -300: means " in capsys.readouterr().out
    assert main([str(tmp_path / "run"), "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "--repeats 1 --episodes 10: a floor needs at least 2" in err
    assert len(err.strip().splitlines()) == 1
