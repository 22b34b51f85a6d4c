"""--precision auto: bf16 only where the hardware computes it natively, recorded in the run and
kept on resume; an explicit bf16 on a CPU without it warns with the measured slowdown."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from dtlab import checkpoint, runtime
from dtlab.evaluate import EvalConfig
from dtlab.errors import ConfigError, DtlabWarning
from dtlab.evaluate import evaluate_checkpoint
from dtlab.train import train
from tests.test_train import config, pendulum_like

CPU = torch.device("cpu")
AVX2 = frozenset({"fpu", "sse2", "avx", "avx2", "fma"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}
AMX = AVX512 | {"amx_tile", "amx_bf16"}


def test_cpu_flags_read_x86_and_arm_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                   "processor\t: 1\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm bf16 i8mm\nCPU part\t: 0xd40\n")
    assert runtime.cpu_flags(x86) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert "bf16" in runtime.cpu_flags(arm)
    assert runtime.cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize("flags, expected", [(AVX2, "fp32"), (AVX512, "fp32"),
                                             (AVX512_BF16, "bf16"), (AMX, "bf16"),
                                             (frozenset({"fp", "asimd", "bf16"}), "bf16")])
def test_auto_picks_bf16_only_with_native_support(flags, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto never warns
        assert runtime.resolve_precision("auto", CPU, flags) == expected
        assert runtime.resolve_precision("fp32", CPU, flags) == "fp32"


@pytest.mark.parametrize("flags, slowdown", [(AVX2, "31x"), (AVX512, "2.3x")])
def test_explicit_bf16_without_native_support_warns_with_the_measured_slowdown(flags, slowdown):
    with pytest.warns(DtlabWarning, match=rf"no native bf16 .* measured {slowdown} slower") as rec:
        assert runtime.resolve_precision("bf16", CPU, flags) == "bf16"
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runtime.resolve_precision("bf16", CPU, AVX512_BF16) == "bf16"


def test_resolved_precision_is_required_where_the_model_runs():
    with pytest.raises(ConfigError, match="precision"):
        runtime.resolve_precision("fp16", CPU, AVX2)
    with pytest.raises(ConfigError, match="resolve auto first"):
        runtime.autocast(CPU, "auto")


def _native(monkeypatch, native: bool):
    monkeypatch.setattr(runtime, "native_bf16", lambda device, flags=None: native)


def _saved_precision(run):
    return json.loads((run / "train_config.json").read_text())["optim"]["precision"]


def test_auto_is_recorded_resolved_and_a_resume_keeps_it(tmp_path, monkeypatch):
    episodes = pendulum_like()
    _native(monkeypatch, True)
    train(config(tmp_path, "full", precision="bf16"), episodes)
    train(config(tmp_path, "split", steps=6), episodes)  # auto, on "native" hardware
    assert _saved_precision(tmp_path / "split") == "bf16"
    # Resumed where bf16 is not native: auto keeps the run's bf16 (with the slowdown warning),
    # instead of refusing the resume over a changed optim group, and continues bit for bit.
    _native(monkeypatch, False)
    with pytest.warns(DtlabWarning, match="no native bf16"):
        train(config(tmp_path, "split", resume=True), episodes)
    full = load_file(str(checkpoint.resolve(tmp_path / "full") / checkpoint.WEIGHTS_FILE))
    split = load_file(str(checkpoint.resolve(tmp_path / "split") / checkpoint.WEIGHTS_FILE))
    assert all(torch.equal(full[k], split[k]) for k in full)
    # A new run on that hardware: fp32.
    train(config(tmp_path, "plain", steps=2), episodes)
    assert _saved_precision(tmp_path / "plain") == "fp32"


def test_evaluate_resolves_auto_and_records_it(tiny_checkpoint, monkeypatch):
    for native, expected in ((False, "fp32"), (True, "bf16")):
        _native(monkeypatch, native)
        data = evaluate_checkpoint(EvalConfig(checkpoint=tiny_checkpoint, targets=(-300.0,),
                                              episodes=1, max_steps=5, device="cpu"))
        assert data["precision"] == expected
