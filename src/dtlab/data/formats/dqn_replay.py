"""Dopamine replay logs (the DQN Replay Dataset the DT paper trains its Atari models on), streamed.

A source is ``dqn-replay:DIR[:buffers=A-B][:transitions=N][:stack=S]``: DIR holds Dopamine's
per-buffer checkpoint files (for the DQN Replay Dataset, ``<game>/<run>/replay_logs``), written by
``OutOfGraphReplayBuffer.save`` / ``OutOfGraphLoggedReplayBuffer._log_buffer``
(github.com/google/dopamine, dopamine/replay_memory/circular_replay_buffer.py;
github.com/google-research/batch_rl, batch_rl/baselines/replay_memory/logged_replay_buffer.py):

    $store$_observation_ckpt.<k>.gz  gzip of an .npy array (C, 84, 84) uint8: one frame per row
    $store$_action_ckpt.<k>.gz       (C,) int32 action indices (the game's minimal action set)
    $store$_reward_ckpt.<k>.gz       (C,) float32
    $store$_terminal_ckpt.<k>.gz     (C,) uint8, 1 at an episode's last transition
    add_count_ckpt.<k>.gz            how many rows were ever added (a 0-d .npy array; Dopamine
                                     saves every public attribute, add_count among them)

The buffer is circular with capacity C: once ``add_count`` exceeds C, the oldest row is at
``add_count % C``. Rows are read in the order they were added. Before every episode (after a
terminal row, and at the start of an empty buffer) Dopamine adds ``stack - 1`` zero rows (action
0, reward 0, terminal 0, a black frame) so that frame stacks never reach into the previous
episode; they are dropped here (stack 4 by default, Dopamine's Atari setting). A buffer that
starts in the middle of an episode (it wrapped around) loses that partial episode (its start,
and so its timesteps, are unknown): every row up to the first terminal row. When a wrapped
buffer's oldest rows are instead some or all of the stack - 1 zero rows in front of an
episode, that whole episode is dropped the same way (at most one per buffer: zero rows cannot be
told from real action-0, reward-0 rows without reading their frames). The episode that a
buffer, or the ``transitions`` budget, cuts off is kept and marked truncated, as D4RL's files
end.

Memory: only the selected frames are held, in one (N, 84, 84) uint8 array. The frame file is
decompressed as a stream, ``_CHUNK_ROWS`` rows at a time, and read only as far as the last row
needed; the small arrays (9 bytes per row) of one buffer at a time are read whole. Several
buffers are never held at once. ``transitions=N`` spreads N evenly over the buffers (a buffer
with fewer rows leaves the rest of its share to the following ones).

Every failure is a one-line DatasetError naming the file and the field: a missing file, a file
that is not a gzip-compressed .npy array, a truncated one, arrays of different lengths.
Torch-free; numpy and the standard library only.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dtlab.data.episodes import EpisodeSet
from dtlab.errors import DatasetError
from dtlab.spaces import ImageObservations

PREFIX = "dqn-replay:"
FIELDS = ("observation", "action", "reward", "terminal")
# Dopamine's file names: STORE_FILENAME_PREFIX "$store$_" for the stored arrays, then
# '{name}_ckpt.{suffix}.gz' (circular_replay_buffer.py, _generate_filename).
_STORE = "$store$_"
_CHUNK_ROWS = 4096  # frames decompressed per read: 4096 x 84 x 84 bytes = 29 MB
_DOPAMINE_STACK = 4  # Dopamine's Atari agents stack 4 frames (its zero padding is stack - 1 rows)


def buffer_file(directory: Path, field: str, suffix: int) -> Path:
    """Dopamine's file of ``field`` ("observation", "action", ..., or "add_count") in buffer
    ``suffix``."""
    name = field if field == "add_count" else _STORE + field
    return Path(directory) / f"{name}_ckpt.{suffix}.gz"


@dataclass(frozen=True)
class ReplaySource:
    """A parsed ``dqn-replay:`` source."""

    directory: Path
    buffers: tuple[int, ...] | None  # None: every buffer in the directory
    transitions: int | None  # None: every row of every buffer
    stack: int = _DOPAMINE_STACK


def split_source(text: str) -> tuple[str, str]:
    """``dqn-replay:DIR[:OPTIONS]`` -> (DIR, ":OPTIONS" or ""), both as written (DIR is not
    normalized, so DIR + OPTIONS is the text after the prefix). Options are the trailing
    ``:key=value`` parts, so DIR may itself contain ':'."""
    rest = text[len(PREFIX):] if text.startswith(PREFIX) else text
    parts = rest.split(":")
    n = 0
    while len(parts) - n > 1 and "=" in parts[-1 - n]:
        n += 1
    directory = ":".join(parts[:len(parts) - n])
    return directory, rest[len(directory):]


def parse_source(text: str) -> ReplaySource:
    """``dqn-replay:DIR[:buffers=A-B|A,B,...][:transitions=N][:stack=S]`` -> ReplaySource.
    Options are taken from the end, so DIR may itself contain ':'. DatasetError naming the
    option when one is malformed."""
    directory, tail = split_source(text)
    options: dict[str, str] = {}
    for item in tail[1:].split(":") if tail else ():
        key, _, value = item.partition("=")
        options[key] = value
    unknown = sorted(set(options) - {"buffers", "transitions", "stack"})
    if unknown or not directory:
        raise DatasetError(f"{text}: expected dqn-replay:DIR[:buffers=A-B][:transitions=N]"
                           f"[:stack=S]" + (f", got unknown options {unknown}" if unknown else ""))
    buffers = None
    try:
        if "buffers" in options:
            buffers = []
            for item in options["buffers"].split(","):
                lo, sep, hi = item.partition("-")
                buffers += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
            if not buffers or min(buffers) < 0 or len(set(buffers)) != len(buffers):
                raise ValueError
        transitions = int(options["transitions"]) if "transitions" in options else None
        stack = int(options.get("stack", _DOPAMINE_STACK))
        if (transitions is not None and transitions < 1) or stack < 1:
            raise ValueError
    except ValueError:
        raise DatasetError(f"{text}: buffers must be distinct non-negative numbers or ranges "
                           "(e.g. 1-3 or 0,5,9), transitions and stack positive integers") from None
    return ReplaySource(Path(directory), None if buffers is None else tuple(buffers), transitions,
                        stack)


def read_dqn_replay(source: str | ReplaySource) -> EpisodeSet:
    """Read the transitions a ``dqn-replay:`` source selects (module docstring) as an EpisodeSet
    of 84 x 84 frames, ``ImageObservations(shape, stack)``, and Discrete action indices."""
    src = parse_source(source) if isinstance(source, str) else source
    name = source if isinstance(source, str) else f"{PREFIX}{src.directory}"
    directory = src.directory
    if not directory.is_dir():
        raise DatasetError(f"{directory}: directory not found (dqn-replay source {name})")
    buffers = src.buffers if src.buffers is not None else _buffers_in(directory)
    # Pass 1: headers, the small arrays and which rows to keep, one buffer at a time.
    plans, left = [], src.transitions
    for i, k in enumerate(buffers):
        share = None if left is None else left // (len(buffers) - i)
        plan = _plan_buffer(directory, k, src.stack, share)
        plans.append(plan)
        if left is not None:
            left -= plan.rows.size
    total = sum(p.rows.size for p in plans)
    if total == 0:
        raise DatasetError(f"{name}: no complete episode start in buffers {list(buffers)}")
    shape = plans[0].frame_shape
    for p in plans[1:]:
        if p.frame_shape != shape:
            raise DatasetError(f"{buffer_file(directory, 'observation', p.suffix)}: 'observation' "
                               f"frames are {p.frame_shape}, buffer {plans[0].suffix}'s {shape}")
    # Pass 2: the selected frames, streamed into one array.
    frames = np.empty((total, *shape), dtype=np.uint8)  # (N, H, W)
    at = 0
    for p in plans:
        _read_frames(directory, p, frames[at:at + p.rows.size])
        at += p.rows.size
    cat = lambda name: np.concatenate([getattr(p, name) for p in plans])  # noqa: E731
    metadata = {"dataset_format": "dqn-replay", "dqn_replay_dir": str(directory),
                "buffers": [p.suffix for p in plans],
                "transitions_per_buffer": [int(p.rows.size) for p in plans],
                "stack": src.stack}
    return EpisodeSet.from_flags(frames, cat("actions"), cat("rewards"), cat("terminations"),
                                 cat("truncations"), source=name, metadata=metadata,
                                 observation_space=ImageObservations(shape, src.stack))


def _buffers_in(directory: Path) -> tuple[int, ...]:
    suffixes = []
    for path in directory.glob(f"{_STORE}observation_ckpt.*.gz"):
        middle = path.name[len(f"{_STORE}observation_ckpt."):-len(".gz")]
        if middle.isdigit():
            suffixes.append(int(middle))
    if not suffixes:
        raise DatasetError(f"{directory}: no Dopamine replay buffers "
                           f"({_STORE}observation_ckpt.<k>.gz files)")
    return tuple(sorted(suffixes))


@dataclass(frozen=True)
class _Plan:
    """What to read from one buffer: storage rows of the kept transitions, in order."""

    suffix: int
    frame_shape: tuple[int, int]
    rows: np.ndarray  # (n,) storage row of each kept transition, in the order they were added
    actions: np.ndarray  # (n,) int64
    rewards: np.ndarray  # (n,) float32
    terminations: np.ndarray  # (n,) bool
    truncations: np.ndarray  # (n,) bool: the buffer's (or the budget's) cut-off episode


def _plan_buffer(directory: Path, suffix: int, stack: int, budget: int | None) -> _Plan:
    streams = {f: _NpyStream(buffer_file(directory, f, suffix), f) for f in FIELDS}
    try:
        obs = streams["observation"]
        if len(obs.shape) != 3 or obs.dtype != np.uint8:
            raise DatasetError(f"{obs.path}: 'observation' must be (C, H, W) uint8 frames, got "
                               f"{obs.dtype} {obs.shape}")
        capacity = obs.shape[0]
        for f in FIELDS[1:]:
            s = streams[f]
            if len(s.shape) != 1 or s.dtype.kind not in "biuf":
                raise DatasetError(f"{s.path}: '{f}' must be a 1-D numeric array, got {s.dtype} "
                                   f"{s.shape}")
            if s.shape[0] != capacity:
                raise DatasetError(f"{s.path}: '{f}' has {s.shape[0]} entries but '{obs.path.name}'"
                                   f" ('observation') has {capacity}")
        action, reward, terminal = (streams[f].read_all() for f in FIELDS[1:])
    finally:
        for s in streams.values():
            s.close()
    count = _add_count(directory, suffix)
    if count <= capacity:  # never wrapped: rows 0 .. count - 1 in order (the rest never written)
        order = np.arange(count)
        started_empty = True
    else:  # wrapped: the oldest row is at the cursor
        cursor = count % capacity
        order = np.concatenate([np.arange(cursor, capacity), np.arange(cursor)])
        started_empty = False
    act, rew, term = action[order], reward[order], terminal[order].astype(bool)  # (L,) each
    zero = (act == 0) & (rew == 0) & ~term  # (L,) rows that can be Dopamine's padding
    keep = np.ones(order.size, dtype=bool)
    # Padding: the stack - 1 rows after every terminal row (and at the start of an empty buffer).
    starts = np.flatnonzero(term) + 1
    if started_empty:
        starts = np.concatenate([[0], starts])
    for s in starts:
        pad = np.arange(s, min(s + stack - 1, order.size))
        if not zero[pad].all():
            raise DatasetError(
                f"{buffer_file(directory, 'action', suffix)}: row {int(order[pad[0]])} starts an "
                f"episode but is not one of the {stack - 1} zero rows Dopamine adds there "
                f"(stack {stack}); give the right :stack=")
        keep[pad] = False
    if not started_empty:  # the first episode began before this buffer: drop it
        first_end = np.flatnonzero(term)
        keep[:first_end[0] + 1 if first_end.size else order.size] = False
    kept = np.flatnonzero(keep)  # (n,) positions in the added order
    if budget is not None:
        kept = kept[:budget]
    trunc = np.zeros(kept.size, dtype=bool)
    if kept.size and not term[kept[-1]]:
        trunc[-1] = True  # cut off by the buffer's end or the budget
    return _Plan(suffix, tuple(obs.shape[1:]), order[kept], act[kept].astype(np.int64),
                 rew[kept].astype(np.float32), term[kept], trunc)


def _add_count(directory: Path, suffix: int) -> int:
    path = buffer_file(directory, "add_count", suffix)
    stream = _NpyStream(path, "add_count")
    try:
        value = stream.read_all()
    finally:
        stream.close()
    if value.size != 1 or value.dtype.kind not in "iu" or int(value.reshape(-1)[0]) < 0:
        raise DatasetError(f"{path}: 'add_count' must be one non-negative integer")
    return int(value.reshape(-1)[0])


def _read_frames(directory: Path, plan: _Plan, out: np.ndarray) -> None:
    """Stream buffer ``plan.suffix``'s frame file up to the last needed row, copying the rows of
    ``plan.rows`` into ``out`` (n, H, W) in their order."""
    if plan.rows.size == 0:
        return
    position = np.full(int(plan.rows.max()) + 1, -1, dtype=np.int64)  # storage row -> out index
    position[plan.rows] = np.arange(plan.rows.size)
    stream = _NpyStream(buffer_file(directory, "observation", plan.suffix), "observation")
    try:
        for first in range(0, position.size, _CHUNK_ROWS):
            chunk = stream.read_rows(min(_CHUNK_ROWS, position.size - first))  # (c, H, W)
            where = position[first:first + chunk.shape[0]]  # (c,)
            wanted = where >= 0
            out[where[wanted]] = chunk[wanted]
    finally:
        stream.close()


class _NpyStream:
    """A gzip-compressed .npy file read as a stream: the header at once, rows on demand."""

    def __init__(self, path: Path, field: str) -> None:
        self.path, self.field = path, field
        if not path.is_file():
            raise DatasetError(f"{path}: missing ('{field}' of a Dopamine replay buffer)")
        try:
            self._file = gzip.open(path, "rb")
            version = np.lib.format.read_magic(self._file)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            self.shape, fortran, self.dtype = read_header(self._file)
        except (OSError, EOFError, ValueError, zlib.error) as e:
            self.close()
            raise DatasetError(f"{path}: '{field}' is not a gzip-compressed .npy array, or is "
                               f"truncated ({_reason(e)})") from None
        if fortran and len(self.shape) > 1:
            self.close()
            raise DatasetError(f"{path}: '{field}' is stored in Fortran order; expected C order")
        if self.dtype.hasobject:
            self.close()
            raise DatasetError(f"{path}: '{field}' holds Python objects; expected numbers")
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._rows_read = 0

    def read_rows(self, count: int) -> np.ndarray:
        """The next ``count`` rows, (count, *shape[1:])."""
        want = count * self._row_bytes
        try:
            data = self._file.read(want)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"{self.path}: '{self.field}' is truncated or corrupt after row "
                               f"{self._rows_read} of {self.shape[0]} ({_reason(e)})") from None
        if len(data) != want:
            got = self._rows_read + len(data) // max(1, self._row_bytes)
            raise DatasetError(f"{self.path}: '{self.field}' is truncated: {got} of "
                               f"{self.shape[0]} rows")
        self._rows_read += count
        return np.frombuffer(data, dtype=self.dtype).reshape(count, *self.shape[1:])

    def read_all(self) -> np.ndarray:
        rows = self.shape[0] if self.shape else None
        if rows is None:  # a 0-d array (add_count)
            return self.read_rows(1).reshape(())
        return self.read_rows(rows)

    def close(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()


def _reason(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:200]
