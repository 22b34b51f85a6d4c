"""dtlab evaluate --video: one mp4 per target (its first episode), read back with ffmpeg."""

import json

import pytest

from dtlab.cli import main
from dtlab.spaces import DiscreteActions, VectorObservations
from tests.configs import make_checkpoint

imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")  # comes with moviepy ('.[video]')


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):
    """A tiny CartPole checkpoint: it renders through pygame surfaces (no OpenGL, no display)
    and its episodes end after a few steps, at lengths that differ by start state."""
    return make_checkpoint(tmp_path_factory.mktemp("video"), "CartPole-v1", VectorObservations(4),
                           DiscreteActions(2))


def evaluate(capsys, run, *flags, targets=(100, 50)):
    code = main(["evaluate", str(run), "--targets", *map(str, targets), "--episodes", "2",
                 "--max-steps", "100", *map(str, flags)])
    return code, capsys.readouterr()


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_one_video_per_target_of_its_first_episode(tmp_path, capsys, monkeypatch, cartpole_run):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")  # what dtlab sets when unset; restored after
    videos = tmp_path / "videos"
    code, out = evaluate(capsys, cartpole_run, "--video", videos, "--out", tmp_path / "r.json")
    assert code == 0, out.err
    data = json.loads((tmp_path / "r.json").read_text())
    assert files_under(videos) == ["target-100.mp4", "target-50.mp4"]  # no staging left behind
    assert data["videos"] == [str(videos / "target-100.mp4"), str(videos / "target-50.mp4")]
    for result, video in zip(data["results"], data["videos"]):
        first, second = result["lengths"]
        assert first != second  # else recording the wrong episode could pass unnoticed
        frames, _ = imageio_ffmpeg.count_frames_and_secs(video)  # decoded by ffmpeg
        assert frames == first + 1  # the reset frame and one per step
    assert "target-50.mp4" in out.out  # the "wrote ..." line names them

    code, out = evaluate(capsys, cartpole_run, "--out", tmp_path / "plain.json")
    assert code == 0, out.err
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert "videos" not in plain and plain["results"] == data["results"]  # recording changes none
    assert files_under(tmp_path) == ["plain.json", "r.json", "videos", "videos/target-100.mp4",
                                     "videos/target-50.mp4"]


def test_recording_in_waves_that_reuse_envs(tmp_path, monkeypatch, cartpole_run):
    """One env slot: each target's first episode follows the other target's episodes in it."""
    from dtlab.policy import DTPolicy
    from dtlab.rollout import rollout

    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    policy = DTPolicy.from_checkpoint(cartpole_run, device="cpu")
    report = rollout(policy, "CartPole-v1", (100.0, 50.0), 2, max_steps=100, max_parallel=1,
                     video=str(tmp_path))
    assert report.videos == (str(tmp_path / "target-100.mp4"), str(tmp_path / "target-50.mp4"))
    assert files_under(tmp_path) == ["target-100.mp4", "target-50.mp4"]
    for result, video in zip(report.results, report.videos):
        assert imageio_ffmpeg.count_frames_and_secs(video)[0] == result.lengths[0] + 1


@pytest.mark.parametrize("flags, targets, words", [
    (["--eval-workers", "1"], (100, 50), "--eval-workers"),
    (["--offline"], (100, 50), "--offline"),
    ([], (100, 100.0), "--targets"),  # both would be target-100.mp4
])
def test_video_refusals(tmp_path, capsys, cartpole_run, flags, targets, words):
    code, out = evaluate(capsys, cartpole_run, "--video", tmp_path / "videos", *flags,
                         targets=targets)
    assert code == 2 and words in out.err and "--video" in out.err
    assert len(out.err.strip().splitlines()) == 1
    assert not (tmp_path / "videos").exists()


def test_video_path_that_is_a_file(tmp_path, capsys, cartpole_run):
    (tmp_path / "videos").write_text("not a directory")
    code, out = evaluate(capsys, cartpole_run, "--video", tmp_path / "videos")
    assert code == 2 and "--video" in out.err and str(tmp_path / "videos") in out.err
    assert (tmp_path / "videos").read_text() == "not a directory"


# Gymnasium's half-made MuJoCo viewer fails again in its __del__ (ignored by Python).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_render_failure_is_one_env_error_naming_mujoco_gl(monkeypatch):
    from dtlab.envs import make_env, make_render_env
    from dtlab.errors import EnvError

    make_env("Hopper-v5").close()  # mujoco imported: MUJOCO_GL is now read by the renderer only
    monkeypatch.setenv("MUJOCO_GL", "no-such-backend")
    with pytest.raises(EnvError, match="Hopper-v5: cannot render.*MUJOCO_GL=egl"):
        make_render_env("Hopper-v5")
