"""``dtlab quickstart`` end to end at a tiny budget: its outputs, the refusal to overwrite a run
without ``overwrite``, and with it, the refusal to delete a run that is still training."""

import json

import pytest

from dtlab import checkpoint
from dtlab.errors import ConfigError
from dtlab.rundir import one_writer
from dtlab.quickstart import quickstart


def test_quickstart_writes_its_run_and_overwrites_only_a_finished_one(tmp_path, capsys):
    out = tmp_path / "qs"
    results = quickstart(out, steps=20, episodes=1, progress=False)
    # Its last line says what to run next, on this run and on the user's own data.
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"next: dtlab calibrate {out / 'run'} ")
    assert checkpoint.load(out / "run")[1].step == 20
    assert (out / "achieved_vs_target.png").stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert [r["target"] for r in saved["results"]] == [r["target"] for r in results["results"]]
    assert len(saved["results"]) == 4 and all(len(r["returns"]) == 1 for r in saved["results"])
    with pytest.raises(ConfigError, match="already holds a quickstart run; pass --overwrite"):
        quickstart(out, steps=20, episodes=1, progress=False)
    with one_writer(out / "run"):  # as a quickstart still training there holds it
        with pytest.raises(ConfigError, match=r"another process \(pid \d+, training\) holds this run"):
            quickstart(out, steps=30, episodes=1, progress=False, overwrite=True)
    assert checkpoint.load(out / "run")[1].step == 20  # untouched
    quickstart(out, steps=30, episodes=1, progress=False, overwrite=True)
    assert checkpoint.load(out / "run")[1].step == 30
