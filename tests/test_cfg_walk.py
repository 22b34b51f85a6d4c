"""benchmarks/cfg_walk.py (issue 20's measure of how far a config travels) on a hand-made
package whose walk is known."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cfg_walk.py"


def load():
    spec = importlib.util.spec_from_file_location("cfg_walk", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_walk_follows_config_objects_not_values(tmp_path):
    pkg = tmp_path / "dtlab"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text(
        "from dtlab.b import f\nfrom dtlab import c\n\n"
        "def train(cfg):\n    f(cfg)\n    c.g(cfg.optim)\n    c.value(cfg.data.env)\n\n"
        "def h(config):\n    pass\n")
    (pkg / "b.py").write_text("from dtlab.train import h\n\ndef f(x):\n    h(x)\n")
    (pkg / "c.py").write_text("def g(optim):\n    pass\n\ndef value(env):\n    pass\n")
    walk = load()
    order = walk.walk(tmp_path, "dtlab.train:train", "cfg")
    # train -> b -> train (h) -> b -> train -> c -> train; c.value gets a value, not followed.
    assert order == ["dtlab.train", "dtlab.b", "dtlab.train", "dtlab.b", "dtlab.train",
                     "dtlab.c", "dtlab.train"]
    assert walk.returns(order) == 4  # re-entering train three times and b once
