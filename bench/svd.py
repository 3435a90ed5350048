"""Rank-r factorisation on model weight shapes: torch.linalg.svd vs torch.svd_lowrank vs loram_fast.randomized_svd.

    python bench/svd.py [--quick] [--device cpu|cuda]

Reports median time (for bf16 input, torch's SVDs include the ``.float()`` conversion they need, as peft's code
path pays it; ours reads bf16 as stored), the ratio to torch.linalg.svd on the same shape and dtype (>1: faster),
and the error
relative to the optimal rank-r error ‖A − U S Vh‖_F / ‖A − A_r‖_F (1 = optimal). Test matrices have a decaying
spectrum (σ_k = k^-0.5, like trained LLM weights' slowly decaying spectra) and the model's shapes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import heading, RESULTS, machine_info, measure, plot, publish  # noqa: E402

from loram_fast import randomized_svd  # noqa: E402

GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
CPU_SHAPES = [(1024, 1024), (2752, 1024), (1024, 2752)]
QUICK_SHAPES = [(1024, 1024), (1024, 2752)]


def test_matrix(m, n, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, device=device))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, device=device))
    S = torch.arange(1, k + 1, device=device, dtype=torch.float32) ** -0.5
    return (U * S) @ V.T, S


def tail_error(A, S_true, U, S, Vh, r):
    opt = S_true[r:].double().square().sum().sqrt()
    got = (A.double() - (U.double() * S.double()) @ Vh.double()).norm()
    return float(got / opt)


def run(shapes, ranks, dtypes, device, reps):
    rows = []
    info = machine_info(device)
    for m, n in shapes:
        A32, S_true = test_matrix(m, n, device)
        for dtype in dtypes:
            A = A32.to(dtype)
            # torch's SVDs need fp32: the conversion is timed with them, as peft's code path pays it per call
            drivers = ["gesvd", "gesvdj", "gesvda"] if device == "cuda" else [None]
            base_time = None
            for drv in drivers:
                t = measure(lambda: torch.linalg.svd(A.float(), full_matrices=False, driver=drv), device=device, reps=reps)
                name = "torch.linalg.svd" + (f"[{drv}]" if drv else "")
                base_time = t["median_s"] if base_time is None else min(base_time, t["median_s"])
                rows.append({"bench": "svd", "provider": name, "shape": f"{m}x{n}", "rank": "full",
                             "dtype": str(dtype).replace("torch.", ""), "device": device, **t, "ratio": 1.0,
                             "rel_err": 1.0, **info})
            for r in ranks:
                if r >= min(m, n):
                    continue
                cands = {
                    "torch.svd_lowrank(q=r) [peft]": lambda: torch.svd_lowrank(A.float(), q=r, niter=2),
                    "torch.svd_lowrank(q=r+8)": lambda: torch.svd_lowrank(A.float(), q=r + 8, niter=2),
                    "loram_fast.randomized_svd": lambda: randomized_svd(A, r, oversample=8, niter=2),
                }
                for name, fn in cands.items():
                    t = measure(fn, device=device, reps=reps)
                    out = fn()
                    if name.startswith("torch.svd_lowrank"):
                        U, S, V = out
                        U, S, Vh = U[:, :r], S[:r], V[:, :r].T
                    else:
                        U, S, Vh = out
                    rows.append({"bench": "svd", "provider": name, "shape": f"{m}x{n}", "rank": r,
                                 "dtype": str(dtype).replace("torch.", ""), "device": device, **t,
                                 "ratio": base_time / t["median_s"], "rel_err": tail_error(A32, S_true, U, S, Vh, r),
                                 "extra": "niter=2", **info})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small CPU run (about a minute)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.device == "cuda":
        shapes, ranks, reps = GPU_SHAPES, [8, 64, 256], 10
    elif args.quick:
        shapes, ranks, reps = QUICK_SHAPES, [16, 64], 3
    else:
        shapes, ranks, reps = CPU_SHAPES, [8, 16, 64, 256], 3
    rows = run(shapes, ranks, [torch.float32, torch.bfloat16], args.device, reps)
    info = machine_info(args.device)
    header = heading("SVD microbenchmark", info,
                     "ratio = torch.linalg.svd time / provider time on the same shape and dtype (higher is faster); "
                     "rel_err = ‖A − U S Vh‖_F / optimal rank-r error (1 is optimal).")
    publish([r for r in rows if r["rank"] != "full"] + [r for r in rows if r["rank"] == "full"], "svd",
            ["provider", "shape", "rank", "dtype", "median_s", "ratio", "rel_err"], header)
    fp32 = [r for r in rows if r["dtype"] == "float32"]
    cases = [{**r, "case": f"{r['shape']} r={r['rank']}"} for r in fp32 if r["rank"] != "full"]
    # the full SVD does not depend on r: draw it at every rank of its shape
    cases += [{**full, "case": c["case"]} for c in cases for full in fp32
              if full["rank"] == "full" and full["shape"] == c["shape"] and c["provider"].startswith("loram_fast")]
    order = list(dict.fromkeys(c["case"] for c in cases))
    cases.sort(key=lambda r: order.index(r["case"]))
    plot(cases, RESULTS / "svd.png", x="case", group="provider", title=f"rank-r factorisation, fp32, {info['device_name']}")


if __name__ == "__main__":
    main()
