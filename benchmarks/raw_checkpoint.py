"""A checkpoint of a run trained with ``--ema-decay`` that holds its raw weights instead of their
average, so that ``dtlab calibrate`` and ``dtlab evaluate`` measure the raw weights the same way
(docs/results.md's "Stable scores" calibrates both).

    python benchmarks/raw_checkpoint.py RUN/step_00015000 bench/raw-run
    dtlab calibrate bench/raw-run --points 8 --episodes 5

An averaged run's checkpoint saves the average as its model and the raw weights in its trainer
state (``raw_weights``); the copy is the same config.json (env, data statistics, return scale)
with the raw weights as model.safetensors, written as ``OUT/<the step's name>`` and pointed to
by ``OUT/latest``. A checkpoint without raw weights (a run without ``--ema-decay``, whose model
is its raw weights already) or an OUT that exists is refused in one line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dtlab import checkpoint
from dtlab.errors import CheckpointError, DtlabError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stability import raw_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint directory, or a run (its latest checkpoint)")
    p.add_argument("out", help="the new run directory (must not exist)")
    args = p.parse_args(argv)
    try:
        print(write_raw(args.checkpoint, Path(args.out)))
    except DtlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def write_raw(source: str, out: Path) -> Path:
    """Write the raw-weight copy of checkpoint ``source`` under ``out``; return its path.
    DtlabError (CheckpointError) for a checkpoint without raw weights or an existing ``out``."""
    if out.exists():
        raise CheckpointError(f"{out}: exists; name a new directory")
    path = checkpoint.resolve(source)
    model, info = raw_model(path)
    return checkpoint.save(out, path.name, model, info)


if __name__ == "__main__":
    sys.exit(main())
