"""``dtlab benchmark``: the DT paper's protocol over datasets x algorithms x seeds, in four parts.

- ``datasets``: the datasets, loaded, with the env and the targets the DT is evaluated at
  (the paper's, a data-fitted one where those lie far beyond the data, or --eval-targets), and
  what ``runs/<dataset>/dataset.json`` records of each.
- ``plan``: the grid of cells (dataset x algorithm x seed), each a plain ``TrainConfig`` and the
  ``dtlab train`` command line that runs it; what a benchmark directory records
  (``benchmark.json``).
- ``runner``: each cell an independent ``dtlab train`` process (and ``dtlab calibrate`` after a
  decision-transformer cell with ``--calibrate``), ``--jobs`` at a time; Ctrl-C stops them with
  checkpoints and a rerun continues each with ``dtlab train --resume``.
- ``report``: the finished cells' evaluation records -> results.json, results.md, plots/.

Imports go downward only: runner -> report -> plan -> datasets (the runner rebuilds the report
after its cells; the report reads the records the plan names). Nothing is imported here, so
that the CLI's start stays light.
"""
