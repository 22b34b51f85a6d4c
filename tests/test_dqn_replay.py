"""The streamed DQN-Replay (Dopamine replay log) reader against buffers the test writes in
Dopamine's layout, from a simulation of Dopamine's circular buffer (padding rows included)."""

import gzip
from dataclasses import dataclass, field

import numpy as np
import pytest

from dtlab.cli import main
from dtlab.data.formats import load_episodes
from dtlab.data.formats.dqn_replay import buffer_file, parse_source
from dtlab.errors import DatasetError
from dtlab.spaces import ImageObservations

H = W = 36  # the smallest frames the Nature-DQN encoder takes: small files


def save_npy_gz(path, array):
    """What Dopamine's save does per array: np.save into a gzip file."""
    with gzip.open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


@dataclass
class DopamineBuffer:
    """Dopamine's OutOfGraphReplayBuffer.add, as its source describes it: before an episode's
    first transition (after a terminal one, or into an empty buffer) stack - 1 zero transitions;
    every row written at add_count % capacity. Also keeps the truth of every added row."""

    capacity: int
    stack: int = 4
    add_count: int = 0
    rows: dict = field(default_factory=dict)  # array name -> (capacity, ...) storage
    log: list = field(default_factory=list)  # every add: (frame, action, reward, terminal, episode)

    def __post_init__(self):
        self.rows = {"observation": np.zeros((self.capacity, H, W), np.uint8),
                     "action": np.zeros(self.capacity, np.int32),
                     "reward": np.zeros(self.capacity, np.float32),
                     "terminal": np.zeros(self.capacity, np.uint8)}

    def _add(self, frame, action, reward, terminal, episode):
        at = self.add_count % self.capacity
        for name, value in zip(("observation", "action", "reward", "terminal"),
                               (frame, action, reward, terminal)):
            self.rows[name][at] = value
        self.add_count += 1
        self.log.append((frame, action, reward, terminal, episode))

    def add(self, frame, action, reward, terminal, episode):
        if self.add_count == 0 or self.log[-1][3] == 1:
            for _ in range(self.stack - 1):
                self._add(np.zeros((H, W), np.uint8), 0, 0.0, 0, None)  # padding
        self._add(frame, action, reward, terminal, episode)

    def save(self, directory, suffix):
        for name, array in self.rows.items():
            save_npy_gz(buffer_file(directory, name, suffix), array)
        save_npy_gz(buffer_file(directory, "add_count", suffix), np.array(self.add_count))


def play(buffer, rng, lengths, first_episode=0):
    """Add episodes of the given lengths (random frames, actions, rewards; each ends terminal)."""
    for e, length in enumerate(lengths):
        for t in range(length):
            frame = rng.integers(1, 256, (H, W), dtype=np.uint8)  # never all zero
            buffer.add(frame, int(rng.integers(0, 6)), float(rng.integers(0, 3)),
                       int(t == length - 1), first_episode + e)


def expected_rows(buffer):
    """The transitions a reader must return: the last `capacity` adds, without padding, without
    the episode whose first transition was overwritten (its start is not in the buffer)."""
    first = {}  # episode -> index of its first add
    for i, row in enumerate(buffer.log):
        if row[4] is not None:
            first.setdefault(row[4], i)
    oldest = max(0, len(buffer.log) - buffer.capacity)
    return [r for i, r in enumerate(buffer.log[oldest:], oldest)
            if r[4] is not None and first[r[4]] >= oldest]


def assert_matches(episodes, rows):
    np.testing.assert_array_equal(episodes.observations, np.stack([r[0] for r in rows]))
    np.testing.assert_array_equal(episodes.actions, [r[1] for r in rows])
    np.testing.assert_array_equal(episodes.rewards, [r[2] for r in rows])
    np.testing.assert_array_equal(episodes.terminations, [bool(r[3]) for r in rows])
    ids = [r[4] for r in rows]
    starts = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
    np.testing.assert_array_equal(episodes.episode_starts, starts)


def test_an_empty_buffer_reads_whole_without_its_padding(tmp_path):
    buf = DopamineBuffer(capacity=60)
    play(buf, np.random.default_rng(0), [7, 1, 12, 9])  # 29 + 4 x 3 padding = 41 rows
    buf.save(tmp_path, 0)
    episodes = load_episodes(f"dqn-replay:{tmp_path}")
    assert episodes.observation_space == ImageObservations((H, W), 4)
    assert_matches(episodes, expected_rows(buf))
    np.testing.assert_array_equal(episodes.episode_lengths, [7, 1, 12, 9])
    assert episodes.metadata["buffers"] == [0] and episodes.metadata["transitions_per_buffer"] == [29]


def test_a_wrapped_buffer_reads_in_the_order_rows_were_added(tmp_path):
    """add_count > capacity: the oldest row is at add_count % capacity; the episode whose start
    was overwritten is dropped, the last one (not ended) is kept, truncated."""
    buf = DopamineBuffer(capacity=40)
    rng = np.random.default_rng(1)
    play(buf, rng, [9, 11, 6, 14, 8])
    for t in range(5):  # an episode still running when the buffer is saved
        buf.add(rng.integers(1, 256, (H, W), dtype=np.uint8), 1, 1.0, 0, 99)
    assert buf.add_count > buf.capacity and buf.add_count % buf.capacity != 0
    buf.save(tmp_path, 3)
    episodes = load_episodes(f"dqn-replay:{tmp_path}:buffers=3")
    rows = expected_rows(buf)
    assert_matches(episodes, rows)
    assert episodes.truncations[-1] and not episodes.terminations[-1]
    assert episodes.episode_lengths[-1] == 5


def test_several_buffers_share_a_transition_budget_and_are_streamed(tmp_path, monkeypatch):
    """transitions=N spreads N over the buffers; frames are read a chunk at a time and no buffer
    is read past the last row it needs."""
    import dtlab.data.formats.dqn_replay as dqn

    monkeypatch.setattr(dqn, "_CHUNK_ROWS", 7)  # many chunks on small files
    rng = np.random.default_rng(2)
    bufs = []
    for k in range(4):
        buf = DopamineBuffer(capacity=80)
        play(buf, rng, [10, 10, 10, 10, 10], first_episode=10 * k)
        buf.save(tmp_path, k)
        bufs.append(buf)
    reads = []
    original = dqn._NpyStream.read_rows
    monkeypatch.setattr(dqn._NpyStream, "read_rows",
                        lambda self, n: reads.append((self.field, n)) or original(self, n))
    episodes = load_episodes(f"dqn-replay:{tmp_path}:buffers=1-2:transitions=25")
    assert episodes.metadata["buffers"] == [1, 2]
    assert episodes.metadata["transitions_per_buffer"] == [12, 13]
    rows = expected_rows(bufs[1])[:12] + expected_rows(bufs[2])[:13]
    assert_matches(episodes, rows)
    # Each buffer's cut-off episode ends the buffer's part (truncated), as D4RL's files end.
    np.testing.assert_array_equal(np.flatnonzero(episodes.truncations), [11, 24])
    frame_reads = [n for f, n in reads if f == "observation"]
    # 12 kept rows need 3 + 10 + 3 + 2 = 18 stored rows of buffer 1 (padding included), 13 need
    # 19 of buffer 2: read as chunks of at most 7 rows, not the whole 80-row files.
    assert sum(frame_reads) == 18 + 19 and max(frame_reads) == 7


def test_parse_source():
    src = parse_source("dqn-replay:/data/Pong/1/replay_logs:buffers=0,3-5:transitions=500:stack=4")
    assert (str(src.directory), src.buffers, src.transitions, src.stack) == \
        ("/data/Pong/1/replay_logs", (0, 3, 4, 5), 500, 4)
    with pytest.raises(DatasetError, match="unknown options"):
        parse_source("dqn-replay:/x:frames=3")
    with pytest.raises(DatasetError, match="buffers must be distinct"):
        parse_source("dqn-replay:/x:buffers=3-1,2,2")


def _one_buffer(tmp_path):
    buf = DopamineBuffer(capacity=30)
    play(buf, np.random.default_rng(3), [8, 8])
    buf.save(tmp_path, 0)
    return buf


@pytest.mark.parametrize("damage,message", [
    ("truncate_observation", r"observation_ckpt\.0\.gz: 'observation' is (truncated|not a gzip)"),
    ("truncate_reward", r"reward_ckpt\.0\.gz: 'reward' is (truncated|not a gzip)"),
    ("short_action", r"action_ckpt\.0\.gz: 'action' has 29 entries but "
                     r"'\$store\$_observation_ckpt\.0\.gz' \('observation'\) has 30"),
    ("missing_terminal", r"terminal_ckpt\.0\.gz: missing \('terminal'"),
    ("missing_add_count", r"add_count_ckpt\.0\.gz: missing \('add_count'"),
    ("not_gzip", r"action_ckpt\.0\.gz: 'action' is not a gzip-compressed \.npy array"),
])
def test_damaged_buffers_are_one_line_errors_naming_file_and_field(tmp_path, capsys, damage,
                                                                   message):
    data = tmp_path / "replay_logs"
    data.mkdir()
    _one_buffer(data)
    if damage.startswith("truncate"):
        path = buffer_file(data, damage.split("_")[1], 0)
        raw = path.read_bytes()
        path.write_bytes(raw[:len(raw) * 2 // 3])
    elif damage == "short_action":
        save_npy_gz(buffer_file(data, "action", 0), np.zeros(29, np.int32))
    elif damage.startswith("missing"):
        buffer_file(data, damage.split("_", 1)[1], 0).unlink()
    else:
        buffer_file(data, "action", 0).write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match=message) as err:
        load_episodes(f"dqn-replay:{data}")
    assert "\n" not in str(err.value)
    out = tmp_path / "run"
    code = main(["train", "--dataset", f"dqn-replay:{data}", "--env", "ALE/Breakout-v5",
                 "--out", str(out), "--steps", "2", "--no-progress"])
    err_text = capsys.readouterr().err
    assert code == 2 and err_text.startswith("dtlab: error: ") and err_text.count("\n") == 1
    assert not out.exists()


def test_an_episode_behind_a_wrapped_buffers_cut_padding_is_dropped(tmp_path):
    """Documented limitation (docs/formats.md): when a wrapped buffer's oldest rows are the last
    of the zero rows in front of an episode, that episode is dropped although all its transitions
    are there (zero rows cannot be told from real action-0, reward-0 rows without reading their
    frames)."""
    lengths = [6, 8, 5, 7]
    dry = DopamineBuffer(capacity=1000)
    play(dry, np.random.default_rng(2), lengths)
    pads = [i for i, r in enumerate(dry.log) if r[4] is None]  # 3 padding rows per episode
    oldest = pads[4]  # the 2nd of the 3 zero rows in front of episode 1
    buf = DopamineBuffer(capacity=len(dry.log) - oldest)
    play(buf, np.random.default_rng(2), lengths)
    buf.save(tmp_path, 0)
    episodes = load_episodes(f"dqn-replay:{tmp_path}")
    np.testing.assert_array_equal(episodes.episode_lengths, lengths[2:])  # episode 1 dropped
    assert_matches(episodes, [r for r in buf.log if r[4] in (2, 3)])
