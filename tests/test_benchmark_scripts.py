"""The benchmark scripts that take a checkpoint run end to end on a tiny one (their figures are
in docs/benchmarks.md; a script that no longer runs would leave those figures unreproducible)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_eval_variants_quality_reports_every_rollout_option(tiny_checkpoint):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "eval_variants_quality.py"), str(tiny_checkpoint),
         "--episodes", "2", "--targets", "-300", "-100"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{\n"):])
    assert summary["targets"] == [-300.0, -100.0] and summary["episodes"] == 2
    for name in ("exact_fp32", "bf16", "kv_cache", "kv_cache_bf16"):
        assert len(summary[name]["mean"]) == 2 and summary[name]["env_steps_per_s"] > 0
    assert summary["exact_fp32"]["max_abs_episode_diff_vs_exact"] == 0.0
