"""Fuzzing the dataset readers: a damaged file loads as a valid EpisodeSet or raises DatasetError.

Valid D4RL and native files written by dtlab's writers are corrupted at the byte level (bit flips,
random bytes, truncation, zeroed blocks, junk appended/prepended) and structurally with h5py
(missing keys, wrong shapes/dtypes, groups for datasets, NaN/inf, bad attributes, ...). Every
copy goes to ``load_episodes``, which must return a valid EpisodeSet or raise dtlab's
DatasetError whose message starts with the file's path: no KeyError/RuntimeError/... leaking from
h5py, no hang, no crash.

The loads run in a worker process (a damaged HDF5 file can make the HDF5 C library hang or
crash, which would take pytest down with it); a load that takes longer than ``TIMEOUT_S`` or kills
the worker is a failure. All randomness comes from seeded numpy generators: a failing case is
reproduced by its name.
"""

from __future__ import annotations

import json
import os
import queue
import re
import struct
import subprocess
import sys
import threading
import zlib
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from dtlab.cli import main
from dtlab.data.episodes import EpisodeSet
from dtlab.data.formats import load_episodes, write_d4rl, write_native
from dtlab.errors import DatasetError

SEED = 20240611
TIMEOUT_S = 20.0  # one load takes ~3 ms; anything near this is a hang
CASES_PER_KIND = 20  # byte-level: 2 base files x 6 kinds x 20 = 240 files

# Runs in the worker: load each path read from stdin, check the result, answer one JSON line.
# Address space is capped so a corrupted shape cannot make a load allocate the machine's memory.
WORKER = r"""
import json, resource, sys, traceback, warnings
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
import numpy as np
from dtlab.data.formats import load_episodes
from dtlab.errors import DatasetError

def problems(eps):
    out = []
    n = eps.observations.shape[0]
    for name in ("observations", "actions"):
        arr = getattr(eps, name)
        if arr.dtype != np.float32 or arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] < 1:
            out.append(f"{name}: dtype {arr.dtype} shape {arr.shape}")
    for name, dtype in (("rewards", np.float32), ("returns_to_go", np.float32),
                        ("terminations", np.bool_), ("truncations", np.bool_)):
        arr = getattr(eps, name)
        if arr.dtype != dtype or arr.shape != (n,):
            out.append(f"{name}: dtype {arr.dtype} shape {arr.shape}")
    for name in ("observations", "actions", "rewards", "returns_to_go"):
        if not np.isfinite(getattr(eps, name)).all():
            out.append(f"{name} not finite")
    starts = eps.episode_starts
    if (n == 0 or starts.size == 0 or starts[0] != 0 or np.any(starts[1:] <= starts[:-1])
            or starts[-1] >= n):
        out.append(f"episode_starts {starts[:10]} for {n} transitions")
    else:
        ends = np.append(starts[1:], n) - 1
        flags = eps.terminations | eps.truncations
        both = eps.terminations & eps.truncations
        if not flags[ends].all() or flags.sum() != starts.size or both.any():
            out.append("episode flags inconsistent with episode_starts")
    eps.summary()  # what `dtlab data info` prints
    return out

for line in sys.stdin:
    path = line.rstrip("\n")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. float64 overflow when cast to float32
            eps = load_episodes(path)
        answer = {"kind": "ok", "problems": problems(eps)}
    except DatasetError as e:
        answer = {"kind": "DatasetError", "message": str(e)}
    except BaseException as e:
        answer = {"kind": type(e).__name__, "message": str(e)[:300],
                  "traceback": traceback.format_exc()[-2000:]}
    print(json.dumps(answer), flush=True)
"""


class Worker:
    """A child process that loads files; restarted after a hang or a crash."""

    def __init__(self) -> None:
        self._start()

    def _start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}  # under RLIMIT_AS
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        # Each worker gets its own queue, bound here: a killed worker's pump thread must not put
        # its end-of-stream marker into its successor's queue (a false "crash").
        self.lines: queue.Queue = queue.Queue()
        stdout, lines = self.proc.stdout, self.lines

        def pump() -> None:
            for line in stdout:
                lines.put(line)
            lines.put(None)  # the worker died

        threading.Thread(target=pump, daemon=True).start()

    def load(self, path: Path, timeout: float = TIMEOUT_S) -> dict:
        """The worker's answer for ``path``: kind "ok", "DatasetError", an exception name, "hang"
        or "crash"."""
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            line = "hang"
        if line in (None, "hang"):
            code = self.proc.poll()
            self.close()
            self._start()
            return {"kind": "crash" if line is None else "hang",
                    "message": f"worker exit code {code}" if line is None else f"> {timeout} s"}
        return json.loads(line)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def failure(path: Path, answer: dict) -> str | None:
    """Why ``answer`` breaks the contract, or None."""
    if answer["kind"] == "ok":
        return f"loaded but invalid: {answer['problems']}" if answer["problems"] else None
    if answer["kind"] == "DatasetError":
        message = answer["message"]
        if not message.startswith(f"{path}: "):
            return f"DatasetError not naming the file first: {message!r}"
        if "\n" in message:
            return f"DatasetError message is not one line: {message!r}"
        return None
    return f"{answer['kind']}: {answer['message']}\n{answer.get('traceback', '')}"


# ---- base files ----------------------------------------------------------------------------------
def base_episodes() -> EpisodeSet:
    """5 episodes (lengths 10, 1, 15, 9, 5; terminated, truncated, ..., cut off at the end)."""
    rng = np.random.default_rng(SEED)
    n = 40
    term = np.zeros(n, bool)
    trunc = np.zeros(n, bool)
    term[[9, 25]] = True
    trunc[[10, 34]] = True
    meta = {"algorithm": "SAC", "iteration": 3, "score": 1.5, "seeds": [1, 2], "none": None,
            "policy": {"nonlinearity": "relu"}, "note": "ünïcode"}
    return EpisodeSet.from_flags(rng.normal(size=(n, 3)), rng.uniform(-1, 1, (n, 2)),
                                 rng.normal(size=n), term, trunc, metadata=meta)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fuzz-bases")
    paths = {"d4rl": folder / "base.hdf5", "native": folder / "base.h5"}
    write_d4rl(base_episodes(), paths["d4rl"])
    write_native(base_episodes(), paths["native"])
    return paths


def test_base_files_load_and_hold_no_variable_length_strings(bases):
    for path in bases.values():
        eps = load_episodes(path)
        assert eps.num_transitions == 40 and eps.num_episodes == 5
        assert eps.metadata["algorithm"] == "SAC" and eps.metadata["note"] == "ünïcode"
        # Regression: dtlab wrote metadata strings as variable-length strings, which live in a
        # global heap ("GCOL"); a zeroed free-space entry in it made HDF5 loop forever, and other
        # damage crashed it (segfault), as soon as the string was read.
        assert b"GCOL" not in path.read_bytes()


def zero_global_heap_free_space(path: Path) -> None:
    """Zero the size of the free-space object in the file's first global heap collection."""
    data = bytearray(path.read_bytes())
    at = data.find(b"GCOL") + 16  # signature, version, reserved, collection size
    while True:  # objects: index (2), reference count (2), reserved (4), size (8), data (8-aligned)
        index, size = struct.unpack_from("<H6xQ", data, at)
        if index == 0:
            data[at + 8:at + 16] = bytes(8)
            break
        at += 16 + (size + 7) // 8 * 8
    path.write_bytes(data)


def test_worker_reports_a_hang_and_recovers(bases, worker, tmp_path):
    """Why the writers store no variable-length strings, and proof that the fuzz tests would
    see a hang: HDF5 2.0 loops forever reading a variable-length string whose global heap has a
    zero-size free-space object."""
    path = tmp_path / "vlen.h5"
    path.write_bytes(bases["native"].read_bytes())
    with h5py.File(path, "r+") as f:
        f.attrs["metadata"] = '{"a": 1}'  # a str: variable-length, in a global heap
    assert load_episodes(path).metadata == {"a": 1}
    zero_global_heap_free_space(path)
    assert worker.load(path, timeout=2.0)["kind"] == "hang"
    assert worker.load(bases["native"])["kind"] == "ok"


# ---- byte-level corruption -----------------------------------------------------------------------
def flip_bits(data: bytearray, rng) -> bytearray:
    for _ in range(rng.integers(1, 9)):
        data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
    return data


def random_bytes(data: bytearray, rng) -> bytearray:
    for _ in range(rng.integers(1, 5)):
        data[rng.integers(len(data))] = rng.integers(256)
    return data


def truncate(data: bytearray, rng) -> bytearray:
    return data[: rng.integers(len(data))]


def zero_block(data: bytearray, rng) -> bytearray:
    start = int(rng.integers(len(data)))
    stop = min(len(data), start + int(rng.integers(1, 513)))
    data[start:stop] = bytes(stop - start)
    return data


def append_junk(data: bytearray, rng) -> bytearray:
    return data + rng.bytes(int(rng.integers(1, 4097)))


def prepend_junk(data: bytearray, rng) -> bytearray:
    # 512, 1024, ...: where HDF5 looks for a superblock after a user block.
    size = int(rng.choice([1, 8, 511, 512, 1024, 2048, int(rng.integers(1, 4097))]))
    return bytearray(rng.bytes(size)) + data


BYTE_CORRUPTIONS = [flip_bits, random_bytes, truncate, zero_block, append_junk, prepend_junk]


def test_byte_corruptions_load_or_raise_dataset_error(bases, worker, tmp_path):
    outcomes: Counter = Counter()
    failures = []
    for j, (fmt, base) in enumerate(bases.items()):
        data = base.read_bytes()
        for k, corrupt in enumerate(BYTE_CORRUPTIONS):
            for i in range(CASES_PER_KIND):
                rng = np.random.default_rng([SEED, j, k, i])
                path = tmp_path / f"{fmt}-{corrupt.__name__}-{i}.hdf5"
                path.write_bytes(corrupt(bytearray(data), rng))
                answer = worker.load(path)
                outcomes[answer["kind"]] += 1
                if (why := failure(path, answer)) is not None:
                    failures.append(f"{path.name}: {why}")
                else:
                    path.unlink()  # keep only the failing files
    assert not failures, "\n".join(failures)
    assert sum(outcomes.values()) == 2 * len(BYTE_CORRUPTIONS) * CASES_PER_KIND
    assert outcomes["DatasetError"] > 50 and outcomes["ok"] > 50, outcomes  # both paths exercised


def header_byte(path: Path, key: str) -> int:
    """File offset of the object header of ``key`` (its first byte is the header version)."""
    with h5py.File(path, "r") as f:
        return h5py.h5o.get_info(f[key].id).addr


def test_regression_damaged_object_headers_and_heaps(bases, tmp_path):
    """h5py reports damaged headers as KeyError/RuntimeError, which used to leak."""
    cases = [  # (base, what to damage, expected message after the path)
        ("d4rl", "observations",  # was KeyError
         r"cannot open 'observations' \(.*bad object header version number.*\)"),
        ("native", "episode_starts",  # was KeyError
         r"cannot open 'episode_starts' \(.*bad object header version number.*\)"),
        ("d4rl", "metadata/algorithm",  # was RuntimeError
         r"reading failed, file truncated or corrupt \(.*bad object header version number.*\)"),
    ]
    for i, (fmt, key, message) in enumerate(cases):
        data = bytearray(bases[fmt].read_bytes())
        data[header_byte(bases[fmt], key)] = 0
        path = tmp_path / f"header-{i}.hdf5"
        path.write_bytes(data)
        with pytest.raises(DatasetError) as err:
            load_episodes(path)
        assert re.fullmatch(re.escape(f"{path}: ") + message, str(err.value)), str(err.value)
    # The root group's local heap (link names): was RuntimeError "Unable to synchronously
    # check link existence (bad local heap signature)".
    data = bytearray(bases["d4rl"].read_bytes())
    at = data.find(b"HEAP")
    data[at:at + 4] = b"XXXX"
    path = tmp_path / "heap.hdf5"
    path.write_bytes(data)
    with pytest.raises(DatasetError, match="bad local heap signature") as err:
        load_episodes(path)
    assert str(err.value).startswith(f"{path}: ")


# ---- structural corruption with h5py -------------------------------------------------------------
D4RL_ARRAYS = ["observations", "actions", "rewards", "terminals", "timeouts"]
NATIVE_ARRAYS = ["observations", "actions", "rewards", "terminations", "truncations",
                 "episode_starts"]


def replace(f: h5py.File, key: str, value) -> None:
    """Put ``value`` (an array, h5py.Empty, or "group") where ``key`` was."""
    if key in f or key in f.attrs:
        del f[key]
    if isinstance(value, str) and value == "group":
        f.create_group(key).create_dataset("x", data=np.zeros(3))
    else:
        f.create_dataset(key, data=value)


def arrays_of(fmt: str) -> list[str]:
    return D4RL_ARRAYS if fmt == "d4rl" else NATIVE_ARRAYS


def _delete(f, fmt, key, rng):
    del f[key]


def _group(f, fmt, key, rng):
    replace(f, key, "group")


def _scalar(f, fmt, key, rng):
    replace(f, key, np.float32(1.0))


def _null(f, fmt, key, rng):
    replace(f, key, h5py.Empty("<f4"))


def _empty(f, fmt, key, rng):
    replace(f, key, np.zeros((0,) + f[key].shape[1:], f[key].dtype))


def _zero_width(f, fmt, key, rng):
    replace(f, key, np.zeros((f[key].shape[0], 0), np.float32))


def _3d(f, fmt, key, rng):
    n = f[key].shape[0]
    replace(f, key, rng.normal(size=(n, 2, 2)).astype(np.float32))


def _wide(f, fmt, key, rng):
    n = f[key].shape[0]
    replace(f, key, rng.normal(size=(n, int(rng.integers(2, 5)))).astype(np.float32))


def _shorter(f, fmt, key, rng):
    old = f[key][()]
    replace(f, key, old[: int(rng.integers(0, old.shape[0]))])


def _longer(f, fmt, key, rng):
    old = f[key][()]
    replace(f, key, np.concatenate([old, old[: int(rng.integers(1, old.shape[0] + 1))]]))


def _strings(f, fmt, key, rng):
    replace(f, key, np.array([b"abc"] * f[key].shape[0]))


def _vlen_strings(f, fmt, key, rng):
    replace(f, key, np.array(["abc"] * f[key].shape[0], dtype=h5py.string_dtype()))


def _complex(f, fmt, key, rng):
    replace(f, key, f[key][()].astype(np.complex64))


def _compound(f, fmt, key, rng):
    n = f[key].shape[0]
    replace(f, key, np.zeros(n, dtype=[("a", "<f4"), ("b", "<i4")]))


def _int_dtype(f, fmt, key, rng):
    replace(f, key, rng.integers(-5, 5, size=f[key].shape).astype(np.int16))


def _float16(f, fmt, key, rng):
    replace(f, key, f[key][()].astype(np.float16))


def _nonfinite(f, fmt, key, rng):
    arr = f[key][()].astype(np.float64)
    idx = tuple(rng.integers(0, s) for s in arr.shape)
    arr[idx] = rng.choice([np.nan, np.inf, -np.inf])
    replace(f, key, arr)


def _huge_float64(f, fmt, key, rng):  # finite in the file, inf once cast to float32
    arr = f[key][()].astype(np.float64)
    arr[tuple(rng.integers(0, s) for s in arr.shape)] = 1e300
    replace(f, key, arr)


def _random_values(f, fmt, key, rng):
    replace(f, key, rng.normal(scale=1e6, size=f[key].shape).astype(f[key].dtype))


def _huge_declared_shape(f, fmt, key, rng):  # chunked, never written: all fill value
    shape = (2**40,) + f[key].shape[1:]
    del f[key]
    f.create_dataset(key, shape=shape, dtype=np.float32, chunks=True)


def _dangling_soft_link(f, fmt, key, rng):
    del f[key]
    f[key] = h5py.SoftLink("/nowhere")


def _external_link(f, fmt, key, rng):
    del f[key]
    f[key] = h5py.ExternalLink("missing-file.h5", "/data")


def _named_datatype(f, fmt, key, rng):
    del f[key]
    f[key] = np.dtype("<f4")  # a committed datatype, not a dataset


def _transposed(f, fmt, key, rng):
    replace(f, key, f[key][()].T.copy())


ARRAY_MUTATIONS = [_delete, _group, _scalar, _null, _empty, _zero_width, _3d, _wide, _shorter,
                   _longer, _strings, _vlen_strings, _complex, _compound, _int_dtype, _float16,
                   _nonfinite, _huge_float64, _random_values, _huge_declared_shape,
                   _dangling_soft_link, _external_link, _named_datatype, _transposed]


def _format_attr(value):
    def mutate(f, fmt, rng):
        if isinstance(value, str) and value == "delete":
            del f.attrs["dtlab_format"]
        else:
            f.attrs["dtlab_format"] = value
    mutate.__name__ = f"dtlab_format={value!r}"
    return mutate


def _metadata_attr(value):
    def mutate(f, fmt, rng):
        f.attrs["metadata"] = value
    mutate.__name__ = f"metadata={value!r}"[:60]
    return mutate


def _all_empty(f, fmt, rng):
    for key in arrays_of(fmt):
        replace(f, key, np.zeros((0,) + f[key].shape[1:], f[key].dtype))


def _starts(value):
    def mutate(f, fmt, rng):
        replace(f, "episode_starts", np.asarray(value))
    mutate.__name__ = f"episode_starts={value!r}"
    return mutate


def _flag_mid_episode(f, fmt, rng):
    key = "terminations" if fmt == "native" else "terminals"
    arr = f[key][()]
    arr[3] = True  # inside the first episode: native must refuse, D4RL splits there
    replace(f, key, arr)


def _metadata_group_damage(f, fmt, rng):
    f["metadata/algorithm"].attrs["dtlab_json"] = True  # "SAC" is no JSON: kept as a string
    f["metadata/deep"] = "[" * 100_000 + "]" * 100_000
    f["metadata/deep"].attrs["dtlab_json"] = True
    f["metadata/compound"] = np.zeros((), dtype=[("a", "<f4")])
    f["metadata/bad_utf8"] = np.bytes_(b"\xff\xfe")
    f["metadata/array"] = np.zeros((3, 3))


def _metadata_is_dataset(f, fmt, rng):
    del f["metadata"]
    f["metadata"] = np.arange(3)


def _newline_key(f, fmt, rng):
    f["extra\nkey"] = np.zeros(3)  # harmless next to a valid layout


FILE_MUTATIONS = [
    # (formats, mutation, expected: "ok", a regex the DatasetError must match, or None for either)
    (("native",), _format_attr("1"), "invalid 'dtlab_format' attribute"),
    (("native",), _format_attr(1.0), "invalid 'dtlab_format' attribute"),
    (("native",), _format_attr(np.array([1, 1])), "invalid 'dtlab_format' attribute"),
    (("native",), _format_attr(True), "invalid 'dtlab_format' attribute"),
    (("native",), _format_attr(-3), "invalid 'dtlab_format' attribute"),
    (("native",), _format_attr(h5py.Empty("<i8")), "invalid 'dtlab_format' attribute"),
    (("native",), _format_attr(2**62), "written by a newer dtlab"),
    (("native",), _format_attr("delete"), "unrecognized HDF5 layout"),
    (("native",), _metadata_attr("not json {"), "'metadata' attribute is not valid JSON"),
    (("native",), _metadata_attr(np.bytes_(b"\xff\xfe{}")),
     "'metadata' attribute is not valid JSON"),
    (("native",), _metadata_attr(7), "'metadata' attribute is not valid JSON"),
    (("native",), _metadata_attr(np.array(["{}", "{}"], dtype=h5py.string_dtype())),
     "'metadata' attribute is not valid JSON"),
    (("native",), _metadata_attr(h5py.Empty("S1")), "'metadata' attribute is not valid JSON"),
    (("native",), _metadata_attr("[1, 2]"), "'metadata' attribute must be a JSON object"),
    (("native",), _metadata_attr("[" * 100_000 + "]" * 100_000),  # was RecursionError
     "'metadata' attribute is not valid JSON"),
    (("native",), _metadata_attr('{"a": NaN}'), "ok"),
    (("native",), _starts([0, 3, 3, 20]), "strictly increasing"),
    (("native",), _starts([0, 50]), "strictly increasing and inside the data"),
    (("native",), _starts([1, 10]), "must begin with 0"),
    (("native",), _starts([0, -5]), "strictly increasing"),
    (("native",), _starts([0.0, np.nan]), "strictly increasing"),
    (("native",), _starts(np.zeros(0, np.int64)), "must begin with 0"),
    (("native",), _starts([0]), "episode flag set in the middle"),
    (("d4rl", "native"), _all_empty, r"empty \(0 transitions\)"),
    (("native",), _flag_mid_episode, "episode flag set in the middle of an episode"),
    (("d4rl",), _flag_mid_episode, "ok"),
    (("d4rl",), _metadata_group_damage, "ok"),  # was RecursionError on the deep JSON
    (("d4rl",), _metadata_is_dataset, "ok"),
    (("d4rl", "native"), _newline_key, "ok"),
]

# Expected outcome of an array mutation where it is fixed (else: either outcome is fine).
EXPECTED = {
    "_delete": "missing key",
    "_group": "is a group, expected a dataset",
    "_named_datatype": "is an HDF5 Datatype, expected a dataset",
    "_null": r"has no data \(null dataspace\)",  # was TypeError from numpy
    "_zero_width": "need at least one dimension",  # loaded as obs_dim 0 before
    "_3d": "must be 2-D|must have shape|entries but|episode_starts must",
    "_strings": "unsupported dtype",
    "_vlen_strings": "unsupported dtype",
    "_complex": "unsupported dtype",
    "_compound": "unsupported dtype",
    "_nonfinite": "contains NaN or inf",
    "_huge_declared_shape": "does not fit in memory|has .* entries but",  # was MemoryError
    "_dangling_soft_link": r"cannot open '\w+' \(.*component not found",  # was KeyError
    "_external_link": r"cannot open '\w+' \(.*can't open file",  # was KeyError from h5py
}


def structural_cases() -> list[tuple[str, str, object, str | None]]:
    cases = []
    for fmt in ("d4rl", "native"):
        for key in arrays_of(fmt):
            for mutation in ARRAY_MUTATIONS:
                expected = EXPECTED.get(mutation.__name__)
                if key == "timeouts" and mutation.__name__ == "_delete":
                    expected = "ok"  # timeouts is optional in D4RL files
                if mutation.__name__ == "_nonfinite" and key in ("terminals", "timeouts",
                                                                "terminations", "truncations",
                                                                "episode_starts"):
                    expected = None  # NaN flags are True; a NaN start is a bad offset
                if mutation.__name__ == "_zero_width" and key not in ("observations", "actions"):
                    expected = None
                cases.append((f"{fmt}:{key}:{mutation.__name__}", fmt,
                              lambda f, rng, m=mutation, k=key, fmt=fmt: m(f, fmt, k, rng),
                              expected))
    for formats, mutation, expected in FILE_MUTATIONS:
        for fmt in formats:
            cases.append((f"{fmt}:{mutation.__name__}", fmt,
                          lambda f, rng, m=mutation, fmt=fmt: m(f, fmt, rng), expected))
    return cases


STRUCTURAL = structural_cases()


def test_structural_corruptions_load_or_raise_dataset_error(bases, worker, tmp_path):
    failures = []
    outcomes: Counter = Counter()
    for i, (name, fmt, mutate, expected) in enumerate(STRUCTURAL):
        path = tmp_path / f"structural-{i}.hdf5"
        path.write_bytes(bases[fmt].read_bytes())
        with h5py.File(path, "r+") as f:
            mutate(f, np.random.default_rng([SEED, zlib.crc32(name.encode())]))
        answer = worker.load(path)
        outcomes[answer["kind"]] += 1
        why = failure(path, answer)
        if why is None and expected == "ok" and answer["kind"] != "ok":
            why = f"expected to load, got: {answer['message']}"
        elif why is None and expected not in (None, "ok"):
            if answer["kind"] != "DatasetError" or not re.search(expected, answer["message"]):
                why = f"expected DatasetError matching {expected!r}, got {answer}"
        if why is not None:
            failures.append(f"{name}: {why}")
    assert not failures, "\n".join(failures)
    assert len(STRUCTURAL) >= 150 and outcomes["DatasetError"] > 100, outcomes


# ---- the CLI -------------------------------------------------------------------------------------
def test_cli_reports_damaged_files_in_one_line_with_exit_code_2(bases, worker, tmp_path, capsys):
    """`dtlab data info` on damaged files: exit 2, one "dtlab: error: <path>: ..." line."""
    paths = []
    for fmt, base in bases.items():
        data = base.read_bytes()
        for k, corrupt in enumerate(BYTE_CORRUPTIONS):
            if corrupt is append_junk:
                continue  # junk after the end is harmless
            for i in range(20):  # the first damaged copy that fails to load (decided by the worker)
                path = tmp_path / f"cli-{fmt}-{corrupt.__name__}-{i}.hdf5"
                path.write_bytes(corrupt(bytearray(data), np.random.default_rng([SEED, 7, k, i])))
                if worker.load(path)["kind"] == "DatasetError":
                    paths.append(path)
                    break
    assert len(paths) >= 8
    capsys.readouterr()
    for path in paths:
        assert main(["data", "info", str(path)]) == 2
        out, err = capsys.readouterr()
        assert out == ""
        assert err.startswith(f"dtlab: error: {path}: ") and err.count("\n") == 1, err


def test_unrecognized_layout_message_is_one_line_with_odd_key_names(tmp_path):
    path = tmp_path / "odd.hdf5"
    with h5py.File(path, "w") as f:
        f["obs\nfake line"] = np.zeros(3)
    with pytest.raises(DatasetError, match="unrecognized HDF5 layout") as err:
        load_episodes(path)
    assert "\n" not in str(err.value)
