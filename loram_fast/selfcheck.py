"""Verify a machine's GPU paths in one command:

    python -m loram_fast.selfcheck --device cuda

builds the C++ extension with its CUDA kernels (``loram_fast.build --cuda``), runs the kernel tests on every
backend (``tests/test_ext.py``, ``tests/test_triton_kernels.py``, ``tests/test_ops.py``, ``tests/test_topsvd.py``)
and the quick kernel, init, floor and exact-PiSSA benchmarks (tables under ``bench/results/``). Without a CUDA device it says so in one line and exits 0.
Run from a source checkout (the tests and benchmarks are not installed).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_ext.py", "tests/test_triton_kernels.py", "tests/test_ops.py", "tests/test_topsvd.py"]
BENCHES = [["bench/kernels.py", "--quick", "--device", "cuda"], ["bench/init.py", "--quick", "--device", "cuda"],
           ["bench/floor.py", "--quick", "--device", "cuda"], ["bench/pissa_exact.py", "--quick", "--device", "cuda"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda"])
    p.add_argument("--arch", default=None, help="CUDA architectures for the build, e.g. 9.0 (default: this GPU's)")
    p.add_argument("--no-bench", action="store_true", help="skip the benchmarks")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.stdout.write("loram_fast.selfcheck: no CUDA device here; nothing to verify (the CPU paths are covered "
                         "by `python -m pytest tests -q`)\n")
        return 0
    if not (ROOT / "tests").is_dir():
        sys.stderr.write("loram_fast.selfcheck: run it from a source checkout (tests/ and bench/ are not installed)\n")
        return 2
    env = dict(os.environ, LORAM_FAST_CUDA="1", LORAM_FAST_REQUIRE="cpu-ext,cuda,triton")
    env.pop("TRITON_INTERPRET", None)
    steps = [[sys.executable, "-m", "loram_fast.build", "--cuda"] + (["--arch", args.arch] if args.arch else []),
             [sys.executable, "-m", "pytest", "-q", *TESTS]]
    if not args.no_bench:
        steps += [[sys.executable, *bench] for bench in BENCHES]
    failed = 0
    for cmd in steps:
        sys.stdout.write(f"loram_fast.selfcheck: {' '.join(cmd[1:])}\n")
        sys.stdout.flush()
        failed |= subprocess.call(cmd, cwd=ROOT, env=env) != 0
    sys.stdout.write(f"loram_fast.selfcheck: {'FAILED' if failed else 'all passed'} on {torch.cuda.get_device_name()}\n")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
