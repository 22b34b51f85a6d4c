"""bf16 autocast vs fp32 for the paper configuration's largest training matmul, 1 thread.

    python benchmarks/bf16_matmul.py                              # this CPU as it is
    ONEDNN_MAX_CPU_ISA=AVX512_CORE python benchmarks/bf16_matmul.py   # as an AVX-512 CPU without bf16
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bf16_matmul.py          # as an AVX2-only CPU

(3840 x 128) @ (128 x 512): batch 64 x 3K = 60 tokens, width 128 into the MLP's 512. The two
precisions alternate (5 rounds), the ratio is the median of the per-round ratios; the CPU flags,
torch's CPU capability and the oneDNN kernel that ran (ONEDNN_VERBOSE) are printed. fp32 runs
MKL's sgemm, which ONEDNN_MAX_CPU_ISA does not affect; bf16 runs oneDNN's matmul when the ISA has
a bf16 path (avx512_core_bf16: native; avx512_core: converting) and ATen's reference gemm
otherwise. dtlab.runtime's BF16_SLOWDOWN_* constants come from this script.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import torch

from dtlab.runtime import cpu_flags, native_bf16


def per_call(fn, calls: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def kernel() -> str:
    """The oneDNN primitive that runs the bf16 matmul (a child process with ONEDNN_VERBOSE=1)."""
    code = ("import torch; a = torch.randn(3840, 128); b = torch.randn(128, 512)\n"
            "with torch.autocast('cpu', dtype=torch.bfloat16): a @ b")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "ONEDNN_VERBOSE": "1"}).stdout
    for line in out.splitlines():
        if ",exec," in line and "matmul" in line:
            return line.split(",")[6]  # e.g. brg_matmul:avx512_core_bf16
    return "none from oneDNN (ATen's own bf16 gemm)"


def main() -> None:
    torch.set_num_threads(1)
    a, b = torch.randn(3840, 128), torch.randn(128, 512)

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return a @ b

    slow = per_call(bf16, 1) > 10 * per_call(lambda: a @ b, 3)
    fp, bf = [], []
    for _ in range(5):
        fp.append(per_call(lambda: a @ b, 20))
        bf.append(per_call(bf16, 3 if slow else 20))
    ratios = [y / x for x, y in zip(fp, bf)]
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2")))
    print(f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(unset)')} flags {flags} "
          f"capability {torch.backends.cpu.get_cpu_capability()} native bf16 "
          f"{native_bf16(torch.device('cpu'))}")
    print(f"fp32 {statistics.median(fp) * 1e3:.2f} ms, bf16 autocast "
          f"{statistics.median(bf) * 1e3:.2f} ms: bf16/fp32 time {statistics.median(ratios):.2f}x "
          f"(rounds {min(ratios):.2f}-{max(ratios):.2f}); bf16 kernel: {kernel()}")


if __name__ == "__main__":
    main()
