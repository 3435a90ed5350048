"""CorDA: loram_fast vs peft's own CorDA math on the seven projections of one Llama-shaped layer, one run.

    python bench/corda.py [--quick]

Both start from the same input covariances (collecting them is the same forward passes for both; not timed).
``peft``: ``collect_eigens_for_layer`` (damping, W·C', full SVD, V = (Vh inv(C'))ᵀ), the crop of
``crop_corda_eigens`` and ``LoraLayer.corda_init`` on a peft LoRA layer (split and residual). ``ours``:
``loram_fast.methods.corda.corda_init`` (ipm: top-r triplets of W·C' as an operator; kpm: the full SVD) and the
residual write, with one cache per call (layers that read the same input share the covariance and its damping,
as ``init_model`` arranges). Weights: hidden 1024, MLP 2816 (--quick: 512 / 1408), σ_k ∝ k^-0.5; inputs with a k^-1 spectrum
(C from 4096 tokens; one covariance per input size, so q/k/v/o share one, gate/up another: in a real model o reads
another input than q/k/v); r = 16, alpha = 32. Columns: interleaved median time over the seven layers, ``ratio`` = peft
time / ours, ``peak_mib`` = peak RSS increase of one call over all layers in a fresh subprocess (CPU), ``err_fp64``
= max over layers of ‖s·B A − T‖ / ‖T‖ with T the same CorDA product computed in fp64 (W·C' is ill-conditioned
here: σ_1/σ_16 ≈ 300, and inv(C') amplifies further, so fp32 results, peft's included, sit ~1e-3 from T),
``vs_peft`` = max over layers of ‖s·B A (ours) − s·B A (peft)‖ / ‖s·B A (peft)‖.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (heading, llama_projection_shapes, machine_info, measure_interleaved, peak_rss, publish,  # noqa: E402
                    reset_peak_rss, spectrum_matrix)

from loram_fast.methods.corda import corda_init  # noqa: E402
from loram_fast.ops.residual import apply_residual  # noqa: E402

R, ALPHA = 16, 32


def layer_inputs(hidden: int, mlp: int, seed: int = 0):
    """(W, C) per projection: W with a k^-0.5 spectrum, C the covariance of inputs with a k^-1 spectrum."""
    g = torch.Generator().manual_seed(seed)
    covs = {}
    out = []
    for m, n in llama_projection_shapes(hidden, mlp):
        W = spectrum_matrix(m, n, 0.5, g)
        W = W * (0.02 / W.square().mean().sqrt())
        if n not in covs:
            Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
            X = torch.randn(4096, n, generator=g) * torch.arange(1, n + 1).float().pow(-1.0) @ Q.T
            X = X / X.max().abs()
            covs[n] = X.T @ X / 4096
        out.append((W, covs[n]))
    return out


def peft_corda(W, C, mode):
    """peft's code: collect_eigens_for_layer, the crop, corda_init on a LoRA layer. Returns (new W, B, A)."""
    from peft import LoraConfig
    from peft.tuners.lora.corda import collect_eigens_for_layer
    from peft.tuners.lora.layer import Linear

    base = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    base.weight.data = W.clone()
    base.covariance_matrix = C
    eigens = collect_eigens_for_layer(base, None)
    cut = slice(None, R) if mode == "ipm" else slice(-R, None)
    eigens.S_WC, eigens.U_WC, eigens.V_WC = eigens.S_WC[cut].clone(), eigens.U_WC[:, cut].clone(), \
        eigens.V_WC[:, cut].clone()
    del base.covariance_matrix
    base.eigens = eigens
    layer = Linear(base, "default", config=LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights=False), r=R,
                   lora_alpha=ALPHA, init_lora_weights=False)
    layer.corda_init("default", "corda")
    return base.weight.data, layer.lora_B["default"].weight.data, layer.lora_A["default"].weight.data


def ours_corda(W, C, mode, cache):
    W = W.clone()
    init = corda_init(W, R, ALPHA / R, covariance=C, corda_method=mode, cache=cache)
    apply_residual(W, init.residual)
    return W, init.B, init.A


def _fp64_product(W, C, mode):
    """CorDA's s·B A = U_r S_r Vh_r inv(C') in fp64 (the damping factor as peft's loop picks it)."""
    from loram_fast.methods.corda import damped_covariance

    fixed, _ = damped_covariance(C)
    fixed = fixed.double()
    U, S, Vh = torch.linalg.svd(W.double() @ fixed, full_matrices=False)
    cut = slice(None, R) if mode == "ipm" else slice(-R, None)
    return (U[:, cut] * S[cut]) @ torch.linalg.solve(fixed, Vh[cut].T).T


def _providers(layers, mode):
    return {"peft": lambda: [peft_corda(W, C, mode) for W, C in layers],
            "ours": lambda: (lambda cache: [ours_corda(W, C, mode, cache) for W, C in layers])({})}


def _peak(fn) -> float:
    before = reset_peak_rss()
    fn()
    return (peak_rss() - before) / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--peak", nargs=2, metavar=("PROVIDER", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    hidden, mlp = (512, 1408) if args.quick else (1024, 2816)
    layers = layer_inputs(hidden, mlp)
    if args.peak:
        print(_peak(_providers(layers, args.peak[1])[args.peak[0]]))
        return
    info = machine_info("cpu")
    rows = []
    for mode in ("ipm", "kpm"):
        providers = _providers(layers, mode)
        times = measure_interleaved(providers, warmup=1, reps=3)
        results = {name: fn() for name, fn in providers.items()}
        scale = ALPHA / R
        truths = [_fp64_product(W, C, mode) for W, C in layers]
        err = max(float((b1 @ a1 - b0 @ a0).norm() / (b0 @ a0).norm())
                  for (_, b0, a0), (_, b1, a1) in zip(results["peft"], results["ours"]))
        err64 = {name: max(float(((scale * b.double() @ a.double()) - T).norm() / T.norm())
                           for (_, b, a), T in zip(res, truths)) for name, res in results.items()}
        for name in providers:
            peak = float(subprocess.run([sys.executable, __file__, "--peak", name, mode]
                                        + (["--quick"] if args.quick else []),
                                        check=True, capture_output=True, text=True).stdout.split()[-1])
            rows.append({"bench": "corda", "corda_method": mode, "provider": name,
                         "median_s": times[name]["median_s"],
                         "ratio": times["peft"]["median_s"] / times[name]["median_s"], "peak_mib": peak,
                         "err_fp64": err64[name], "vs_peft": 0.0 if name == "peft" else err, "hidden": hidden, "mlp": mlp, "r": R,
                         "scaling": scale, **info})
    header = heading("CorDA: 7 projections of one Llama-shaped layer", info,
                     f"hidden {hidden}, MLP {mlp}, r = {R}; see bench/corda.py for the providers and columns.\n\n",
                     peft=True)
    publish(rows, "corda_cpu", ["corda_method", "provider", "median_s", "ratio", "peak_mib", "err_fp64",
                                    "vs_peft"], header)


if __name__ == "__main__":
    main()
