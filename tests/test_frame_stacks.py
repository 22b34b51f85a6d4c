"""D4RL-layout files whose uint8 observations are frame stacks (issue 21, item 5): (N, S, H, W)
and (N, H, W, S) are unstacked to each step's newest frame after checking that consecutive
stacks overlap; (N, 1, H, W) is squeezed; stacks that do not overlap are refused naming the
layout."""

import warnings

import h5py
import numpy as np
import pytest

from dtlab.data.formats import load_episodes
from dtlab.errors import DatasetError, DtlabWarning
from dtlab.spaces import ImageObservations

H = W = 36
LENGTHS = (5, 7)  # two episodes


def frames_and_stacks(depth):
    """Per-step frames (N, H, W) and their stacks (N, depth, H, W), oldest first; each episode's
    first stack is padded with its reset frame (Gymnasium's FrameStackObservation default)."""
    rng = np.random.default_rng(depth)
    frames, stacks = [], []
    for length in LENGTHS:
        ep = rng.integers(0, 256, size=(length, H, W), dtype=np.uint8)
        padded = np.concatenate([np.repeat(ep[:1], depth - 1, 0), ep])  # (depth - 1 + T, H, W)
        stacks.append(np.stack([padded[t:t + depth] for t in range(length)]))
        frames.append(ep)
    return np.concatenate(frames), np.concatenate(stacks)


def write(path, observations):
    n = observations.shape[0]
    ends = np.zeros(n, bool)
    ends[np.cumsum(LENGTHS) - 1] = True
    with h5py.File(path, "w") as f:
        f["observations"] = observations
        f["actions"] = np.arange(n) % 3
        f["rewards"] = np.ones(n, np.float32)
        f["terminals"] = ends
        f["timeouts"] = np.zeros(n, bool)
    return path


@pytest.mark.parametrize("last", [False, True], ids=["N,S,H,W", "N,H,W,S"])
def test_stacked_frames_are_unstacked(tmp_path, last):
    frames, stacks = frames_and_stacks(4)
    stored = np.moveaxis(stacks, 1, -1) if last else stacks
    with warnings.catch_warnings():
        warnings.simplefilter("error", DtlabWarning)  # the depth is known: no guess, no warning
        data = load_episodes(write(tmp_path / "s.hdf5", stored))
    np.testing.assert_array_equal(data.observations, frames)
    assert data.observation_space == ImageObservations((H, W), 4)
    assert data.episode_lengths.tolist() == list(LENGTHS)


def test_single_frame_stacks_are_squeezed(tmp_path):
    frames, _ = frames_and_stacks(1)
    with pytest.warns(DtlabWarning, match="read as stacks of 4"):
        data = load_episodes(write(tmp_path / "one.hdf5", frames[:, None]))
    np.testing.assert_array_equal(data.observations, frames)


@pytest.mark.parametrize("last", [False, True], ids=["N,S,H,W", "N,H,W,S"])
def test_stacks_that_do_not_overlap_are_refused(tmp_path, last):
    _, stacks = frames_and_stacks(4)
    stacks[8, 1] = stacks[8, 1] ^ 1  # step 8 (episode 2, its 4th step): a frame that changed
    stored = np.moveaxis(stacks, 1, -1) if last else stacks
    layout = r"\(N, H, W, S\)" if last else r"\(N, S, H, W\)"
    with pytest.raises(DatasetError, match=rf"read as frame stacks {layout}.*step 8's stack does "
                                           r"not continue step 7's.*store one frame per step, "
                                           r"\(N, H, W\) uint8"):
        load_episodes(write(tmp_path / "bad.hdf5", stored))
