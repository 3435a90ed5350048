"""LoftQ: loram_fast vs peft's ``loftq_init`` on the seven projections of one Llama-shaped layer, one run.

    python bench/loftq.py [--quick]

peft 0.21's ``loftq_init`` moves every weight to a CUDA (or XPU) device; on a machine without one it cannot run, so
the peft provider here is peft's own source with its device string replaced by "cpu" (bitsandbytes' CPU
implementation quantises; its generic dequantiser, as in tests/test_loftq.py). On a GPU run the providers are the
real ones on the GPU.

Weights: hidden 1024, MLP 2816 (--quick: 512 / 1408), σ_k ∝ k^-0.5 spectra with random singular vectors, scaled
to 0.02 RMS; r = 16. Providers: ``peft`` (full SVD per alternation), ``ours exact`` (top-r triplets; the
quantisation residual has a flat spectrum, so this falls back to the full SVD after two passes: the same work as
peft), ``ours rsvd`` (``solver="randomized"``, niter 4). Columns: interleaved median time over the seven weights,
``ratio`` = peft time / provider time, ``peak_mib`` = peak RSS increase of one call over all weights, outputs
included, each in a fresh subprocess (CPU), or peak allocated memory (GPU), ``err`` = ‖W − Q − B A‖_F / ‖W‖_F over all weights (LoftQ's objective; ``q_err`` = ‖W − Q‖ / ‖W‖ of
the plain quantisation, for scale).
"""
from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (heading, llama_projection_shapes, machine_info, measure_interleaved, peak_rss, publish,  # noqa: E402
                    reset_peak_rss, spectrum_matrix)

from loram_fast.methods.loftq import loftq_factors  # noqa: E402


def peft_loftq_on(device: str):
    """peft's ``loftq_init``; on CPU its source with the device string replaced (module docstring)."""
    import peft.utils.loftq_utils as loftq_utils

    if device != "cpu":
        return loftq_utils.loftq_init
    import bitsandbytes.functional
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    def generic_dequantize(A, state):
        return _dequantize_4bit_compute(A.reshape(-1), state.absmax, _get_4bit_code("nf4", A.device),
                                        state.blocksize, state.shape, state.dtype)

    src = textwrap.dedent(inspect.getsource(loftq_utils.loftq_init))
    namespace = dict(vars(loftq_utils))
    exec(compile(src.replace('"xpu" if is_xpu_available() else "cuda"', '"cpu"'), loftq_utils.__file__, "exec"),
         namespace)
    bitsandbytes.functional.dequantize_4bit = generic_dequantize
    return namespace["loftq_init"]


def llama_weights(hidden: int, mlp: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for m, n in llama_projection_shapes(hidden, mlp):
        W = spectrum_matrix(m, n, 0.5, g)
        out.append((W * (0.02 / W.square().mean().sqrt())).to(device))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak", nargs=3, metavar=("PROVIDER", "BITS", "ITERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    hidden, mlp = (512, 1408) if args.quick else (1024, 2816)
    r, reps = 16, 3
    weights = llama_weights(hidden, mlp, args.device)
    peft_loftq = peft_loftq_on(args.device)
    if args.peak:  # the subprocess of one peak measurement
        name, bits, iters = args.peak[0], int(args.peak[1]), int(args.peak[2])
        print(_peak(_providers(peft_loftq, weights, r, bits, iters)[name], args.device))
        return
    info = machine_info(args.device)
    rows = []
    for bits, iters in ((4, 1), (4, 5), (8, 1)):
        providers = _providers(peft_loftq, weights, r, bits, iters)
        times = measure_interleaved(providers, device=args.device, warmup=1, reps=reps)
        base = times["peft"]["median_s"]
        for name, fn in providers.items():
            peak = _peak(fn, args.device) if args.device != "cpu" else float(subprocess.run(
                [sys.executable, __file__, "--peak", name, str(bits), str(iters)] + (["--quick"] if args.quick else []),
                check=True, capture_output=True, text=True).stdout.split()[-1])
            results = fn()
            num = sum(float((W.float() - Q.float() - B.float() @ A.float()).square().sum())
                      for W, (Q, A, B) in zip(weights, results))
            q_num = sum(float((W.float() - Q.float()).square().sum()) for W, (Q, _, _) in zip(weights, results))
            den = sum(float(W.float().square().sum()) for W in weights)
            rows.append({"bench": "loftq", "bits": bits, "loftq_iter": iters, "provider": name,
                         "median_s": times[name]["median_s"], "ratio": base / times[name]["median_s"],
                         "peak_mib": peak, "err": (num / den) ** 0.5, "q_err": (q_num / den) ** 0.5,
                         "hidden": hidden, "mlp": mlp, "r": r, **info})
    header = heading("LoftQ: 7 projections of one Llama-shaped layer", info,
                     f"hidden {hidden}, MLP {mlp}, r = {r}; see bench/loftq.py for the providers and columns.\n\n",
                     peft=True)
    publish(rows, f"loftq_{args.device}", ["bits", "loftq_iter", "provider", "median_s", "ratio", "peak_mib", "err",
                                           "q_err"], header)


def _providers(peft_loftq, weights, r, bits, iters) -> dict:
    return {
        "peft": lambda: [peft_loftq(W, bits, r, iters) for W in weights],
        "ours exact": lambda: [_ours(W, r, bits, iters, "exact") for W in weights],
        "ours rsvd": lambda: [_ours(W, r, bits, iters, "randomized") for W in weights],
    }


def _ours(W, r, bits, iters, solver):
    Q, A, B = loftq_factors(W, r, bits=bits, iters=iters, solver=solver, niter=4)
    return Q, A, B


def _peak(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = reset_peak_rss()
    fn()
    return (peak_rss() - before) / 2**20


if __name__ == "__main__":
    main()
