"""The package's structure as enforced contracts: DESIGN.md's layering (pyproject.toml's
[tool.importlinter]), no import cycles, and a lean package root."""

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_layering_contract_holds():
    proc = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import "
                           "lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_the_contract_fails_when_a_lower_layer_imports_a_higher_one(tmp_path):
    """The check above can fail: the same contract run on a copy of src with one bad import."""
    import shutil

    shutil.copytree(ROOT / "src", tmp_path / "src")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    episodes = tmp_path / "src" / "dtlab" / "data" / "episodes.py"
    episodes.write_text(episodes.read_text() + "\nfrom dtlab import train  # noqa\n")
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'src'); from "
                           "importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache="
                           "True, no_logo=True))"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "src")})
    assert proc.returncode != 0
    assert "dtlab.data is not allowed to import dtlab.train" in proc.stdout


def test_no_import_cycles():
    graph = grimp.build_graph("dtlab")
    modules = sorted(graph.modules)
    cycles = []
    for module in modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.startswith("dtlab") and imported != "dtlab":
                chain = graph.find_shortest_chain(importer=imported, imported=module)
                if chain:
                    cycles.append(" -> ".join((module,) + tuple(chain)))
    assert not cycles, "\n".join(cycles[:10])


@pytest.mark.parametrize("module", ["dtlab", "dtlab.data", "dtlab.config"])
def test_lean_imports(module):
    code = (f"import {module}, sys; heavy = [m for m in ('torch', 'minari', 'gymnasium.envs.mujoco') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
