"""Memory-bound kernels per backend: GB/s next to a same-run ``copy_`` baseline, and the LoRAM layer init's peak
extra memory.

    python bench/kernels.py [--quick] [--device cpu|cuda] [--only SUBSTRING]

Ops: ``weight_moments`` (reads W once), ``loram_residual_`` at r = 16 and 256 (reads and writes W once; closed
form, O(1) work per entry, on the compiled and Triton backends; the rank-r product on torch), ``lowrank_row_norms``
at r = 16 (DoRA's magnitude: reads W once), the whole LoRAM layer init (moments + residual: the floor is one read
plus one read/write of W), and the LoRAM reference code path. GB/s counts the bytes the op must move (its floor); ``copy_`` moves 2× the weight.
Peak extra memory: a subprocess per provider, max RSS (CPU) or max allocated (GPU) above the weight itself.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import heading, machine_info, measure, measure_interleaved, publish  # noqa: E402

from loram_fast.methods.loram import loram_init, loram_reference  # noqa: E402
from loram_fast.ops import apply_residual, backends, loram_residual_, weight_moments  # noqa: E402
from loram_fast.ops.norms import lowrank_row_norms  # noqa: E402


def _layer_init(W, backend):
    init = loram_init(W, 16, 2.0, backend=backend)
    apply_residual(W, init.residual, backend=backend)


def peak_extra_mib(provider, shape, dtype, device):
    """Peak memory above the weight while one LoRAM layer init runs, in a fresh process."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from common import peak_rss, reset_peak_rss
from kernels import _layer_init
from loram_fast.methods.loram import loram_reference
small = torch.randn(64, 48, device={device!r}, dtype=torch.{dtype})  # warm-up: libraries' one-time buffers
loram_reference(small, 16, 2.0) if {provider!r} == "reference" else _layer_init(small, {provider!r})
W = torch.randn({shape}, device={device!r}, dtype=torch.{dtype})  # no fp32 temporary before the baseline
if {device!r} == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
else:
    import gc; gc.collect(); base = reset_peak_rss()
if {provider!r} == "reference":
    loram_reference(W, 16, 2.0)
else:
    _layer_init(W, {provider!r})
if {device!r} == "cuda":
    peak = torch.cuda.max_memory_allocated()
else:
    peak = peak_rss()
print("PEAK", (peak - base) / 2**20)
"""
    # a fixed mmap threshold makes glibc return freed temporaries at once, so RSS tracks live memory (by default
    # the threshold grows after the first large free and later temporaries stay resident in the heap)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("PEAK")]
    return float(line[0].split()[1]) if line else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", default="", help="run only the ops whose name contains this (own report file)")
    args = p.parse_args(argv)
    dev = args.device
    shapes = [(4096, 4096), (11008, 4096)] if dev == "cuda" else ([(1024, 2752)] if args.quick else [(2048, 2048), (4096, 4096)])
    provs = [b for b in (["triton", "cuda", "torch"] if dev == "cuda" else ["torch", "cpu-ext"])
             if backends()[b] is True]
    info = machine_info(dev)
    rows = []
    for m, n in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            W = torch.randn(m, n, device=dev).to(dtype)
            B16, A16 = torch.randn(m, 16, device=dev) * 0.01, torch.randn(16, n, device=dev) * 0.01  # fp32 adapters
            nbytes = W.numel() * W.element_size()
            dst = torch.empty_like(W)
            t = measure(lambda: dst.copy_(W), device=dev, reps=10)
            common = {"bench": "kernels", "shape": f"{m}x{n}", "dtype": str(dtype).replace("torch.", ""),
                      "device": dev, **info}
            rows.append({**common, "provider": "copy_ (baseline)", **t, "extra": f"{2 * nbytes / t['median_s'] / 1e9:.1f} GB/s"})
            # the providers of one op are timed interleaved (see measure_interleaved): their ratios are the point.
            # (op, provider for a backend, passes over W, reps); the residual's coefficient is nonzero, since with 0
            # BLAS may skip the product
            # loram_residual_ at r = 16 and 256: the torch reference is the rank-r product (O(r) per entry), the
            # compiled and Triton backends the closed form (O(1) per entry)
            ops_ = [("weight_moments", lambda b: lambda: weight_moments(W, backend=b), 1, 10),
                    ("loram_residual_ r=16", lambda b: lambda: loram_residual_(W, 1e-3, 16, backend=b), 2, 10),
                    ("loram_residual_ r=256", lambda b: lambda: loram_residual_(W, 1e-3, 256, backend=b), 2, 5),
                    ("lowrank_row_norms r=16", lambda b: lambda: lowrank_row_norms(W, B16, A16, 2.0, backend=b), 1, 10),
                    ("LoRAM layer init", lambda b: lambda: _layer_init(W, b), 3, 5)]
            for op, make, passes, reps in [o for o in ops_ if args.only in o[0]]:
                timed = measure_interleaved({b: make(b) for b in provs}, device=dev, reps=reps)
                for b, t in timed.items():
                    extra = f"{passes * nbytes / t['median_s'] / 1e9:.1f} GB/s"
                    if op == "LoRAM layer init":
                        extra += f"; peak extra {peak_extra_mib(b, (m, n), str(dtype).split('.')[-1], dev):.0f} MiB"
                    rows.append({**common, "provider": f"{op} [{b}]", **t, "extra": extra})
            if args.only and args.only not in "LoRAM reference code path":
                continue
            t = measure(lambda: loram_reference(W, 16, 2.0), device=dev, reps=3)
            rows.append({**common, "provider": "LoRAM reference code path", **t,
                         "extra": f"peak extra {peak_extra_mib('reference', (m, n), str(dtype).split('.')[-1], dev):.0f} MiB"})
            ref_t = rows[-1]["median_s"]
            for r in rows:
                if r["shape"] == common["shape"] and r["dtype"] == common["dtype"] and "layer init" in r["provider"]:
                    r["ratio"] = ref_t / r["median_s"]
    header = heading("Memory-bound kernels", info,
                     "GB/s = the bytes the op must move / time; ratio = reference code path time / our layer init "
                     "time (higher is faster). Peak extra memory: above the weight, one process per measurement.")
    name = f"kernels_{dev}" + (f"_{args.only.replace(' ', '_')}" if args.only else "")
    publish(rows, name, ["provider", "shape", "dtype", "median_s", "ratio", "extra"], header)


if __name__ == "__main__":
    main()
