"""LoRAM ("The Primacy of Magnitude in Low-Rank Adaptation"): deterministic trigonometric bases scaled by
the weight's magnitude, product subtracted from the base weight.

For W (out×in), rank r, LoRA scaling s:
    U = dst_basis(in, r)            (in×r, orthonormal columns)   → Uhr = Uᵀ  (r×in)
    V = dst_basis(out, r)           (out×r, orthonormal columns)
    variance_ratio = var(W) / var(V Uᵀ)         (unbiased, all entries)
    rho  = log(r) / log(min(out, in))
    beta = (rho · variance_ratio) ** (1/4)
    A = beta · Uᵀ,  B = beta · V,  W ← W − s · B A

Fast exact path: ``‖V Uᵀ‖_F² = r`` and ``sum(V Uᵀ) = (1ᵀV)(Uᵀ1)`` (column sums in closed form), so
``var(V Uᵀ) = (r − sum²/(mn)) / (mn − 1)`` without the m×n product; ``var(W)`` comes from one fp64 pass,
and the residual is one in-place fused update. ``kind="dct2"`` (method ``loram_dct``) swaps in the
orthonormal DCT-II basis: a loram_fast extension, not in the LoRAM paper or code.
"""
from __future__ import annotations

import math

import torch

from ..ops import memory
from ..ops.bases import basis_column_sums, dst_basis
from ..ops.moments import weight_moments, weights_moments
from ..ops.rounding import ScaledRounded, scale_rounded
from .common import BasisResidual, LayerInit


def loram_beta(var_w: float, basis_sum: float, m: int, n: int, r: int) -> float:
    """beta = (rho · var(W) / var(V Uᵀ)) ** 1/4 from the closed-form variance of the basis product."""
    count = m * n
    var_vu = (r - basis_sum * basis_sum / count) / (count - 1)
    rho = math.log(r, min(m, n))
    return (rho * (var_w / var_vu)) ** 0.25


def check_loram(shape: tuple[int, int], r: int, *, allow_zero_adapter: bool = False) -> str | None:
    """Why LoRAM cannot initialise a weight of this shape at rank r (None when it can)."""
    m, n = shape
    if r > min(m, n):
        return (f"rank r={r} exceeds min(out, in)={min(m, n)} of the {m}×{n} weight: the basis has only "
                f"{min(m, n)} orthonormal vectors; use r <= {min(m, n)}")
    if min(m, n) < 2:
        return f"the {m}×{n} weight has min(out, in) = 1, so rho = log(r)/log(1) is undefined"
    if r == 1 and not allow_zero_adapter:
        return ("r=1 gives rho = log(1)/log(min(out, in)) = 0, so beta = 0 and both adapters are zero "
                "(a dead adapter that never receives a gradient); use r >= 2, or pass "
                "allow_zero_adapter=True to reproduce the reference behaviour")
    return None


def loram_init(W: torch.Tensor, r: int, scaling: float, *, kind: str = "dst1", allow_zero_adapter: bool = False,
               bases: dict | None = None, backend=None) -> LayerInit:
    """LoRAM adapters for one weight W (out×in, any float dtype; read, never copied to fp32).

    Returns A (r×in) and B (out×r) in fp32 and the residual ``W −= s·β²·V Uᵀ`` as a :class:`BasisResidual`.
    ``bases`` is an optional cache ``{(n, r, kind, device): basis}`` shared across layers of one call."""
    problem = check_loram(tuple(W.shape), r, allow_zero_adapter=allow_zero_adapter)
    if problem:
        raise ValueError(f"loram_fast.loram: {problem}")
    return loram_factors(W, r, scaling, kind=kind, allow_zero_adapter=allow_zero_adapter, bases=bases,
                         backend=backend)


def loram_factors(W: torch.Tensor, r: int, scaling: float, *, kind: str = "dst1", allow_zero_adapter: bool = False,
                  bases: dict | None = None, backend=None, round_to: torch.dtype | None = None,
                  deferred: bool = False) -> LayerInit:
    """:func:`loram_init` for a shape and rank already checked with :func:`check_loram` (what ``init_model``
    does for every layer before computing any). ``round_to``, ``deferred``: see :func:`loram_from_moments`."""
    return loram_from_moments(weight_moments(W, backend=backend), tuple(W.shape), W.device, r, scaling, kind=kind,
                              allow_zero_adapter=allow_zero_adapter, bases=bases, backend=backend, round_to=round_to,
                              deferred=deferred)


def loram_factors_batch(Ws: list[torch.Tensor], r: int, scalings: list[float], *, kind: str = "dst1",
                        allow_zero_adapter: bool = False, bases: dict | None = None, backend=None,
                        round_to: torch.dtype | None = None, deferred: bool = False) -> list[LayerInit]:
    """:func:`loram_factors` of weights of one shape, dtype and device (checked with :func:`check_loram`): their
    moments in one call (:func:`~loram_fast.ops.moments.weights_moments`), the same results as one call each. A
    ``ValueError`` for one weight carries its position in ``Ws`` as ``batch_index``."""
    out = []
    for k, (W, mom, scaling) in enumerate(zip(Ws, weights_moments(Ws, backend=backend), scalings)):
        try:
            out.append(loram_from_moments(mom, tuple(W.shape), W.device, r, scaling, kind=kind,
                                          allow_zero_adapter=allow_zero_adapter, bases=bases, backend=backend,
                                          round_to=round_to, deferred=deferred))
        except ValueError as exc:
            exc.batch_index = k
            raise
    return out


def loram_factors_sharded(op, r: int, scaling: float, *, kind: str = "dst1", allow_zero_adapter: bool = False,
                          bases: dict | None = None, backend=None, round_to: torch.dtype | None = None) -> LayerInit:
    """:func:`loram_factors` of a weight split across ranks (``op``: a
    :class:`~loram_fast.ops.sharded.MatrixOperator`): the only data that depend on W are its count, sum and sum of
    squares, all-reduced (three fp64 numbers); A, B and the residual's coefficient follow on every rank."""
    return loram_from_moments(op.moments(), op.shape, op.device, r, scaling, kind=kind,
                              allow_zero_adapter=allow_zero_adapter, bases=bases, backend=backend, round_to=round_to)


def loram_from_moments(mom, shape: tuple[int, int], device, r: int, scaling: float, *, kind: str = "dst1",
                       allow_zero_adapter: bool = False, bases: dict | None = None, backend=None,
                       round_to: torch.dtype | None = None, deferred: bool = False) -> LayerInit:
    """A, B and the residual from the moments ``mom`` (count, sum, sum of squares) of the out×in weight.
    ``round_to`` (the weight's dtype, bf16 or fp16): A and B come rounded through it, still fp32, in the pass that
    forms them (``scale_rounded``), as the references store them; the writer then stores them as they are.
    ``deferred``: A and B as :class:`ScaledRounded` (β·Uᵀ and β·V, not formed yet), for the writer to form in the
    adapters' own memory."""
    m, n = shape
    if not (math.isfinite(mom.sum) and math.isfinite(mom.sumsq)):
        raise ValueError("loram_fast.loram: the weight holds NaN or Inf values")
    var_w = mom.variance()
    if var_w == 0.0 and not allow_zero_adapter:
        raise ValueError("loram_fast.loram: the weight is constant (variance 0), so beta = 0 and both adapters "
                         "would be zero (a dead adapter); pass allow_zero_adapter=True to accept that")

    def cached(key, make):
        """``make()`` once per call: ``bases`` is the call's cache, shared by its layers."""
        if bases is None:
            return make()
        if key not in bases:
            bases[key] = make()
        return bases[key]

    def basis(size: int) -> torch.Tensor:
        return cached((size, r, kind, device), lambda: dst_basis(size, r, kind=kind, device=device, backend=backend))

    V = basis(m)  # out×r
    # Uᵀ (r×in) written as rows, contiguous (a strided read of U is slow); U (in×r) is its transpose, a view
    Ut = cached((n, r, kind, device, "T"), lambda: dst_basis(n, r, kind=kind, device=device, backend=backend,
                                                             transposed=True))
    U = Ut.T
    basis_sum = cached((m, n, r, kind, "sum"),  # sum of V Uᵀ
                       lambda: float((basis_column_sums(m, r, kind) * basis_column_sums(n, r, kind)).sum()))
    beta = loram_beta(var_w, basis_sum, m, n, r)
    # the bases are fp32: A and B are rounded through a bf16 / fp16 weight's dtype, formed as fp32 for any other
    rounded = round_to in (torch.bfloat16, torch.float16)
    residual = BasisResidual(scaling * beta * beta, r, kind, bases=(V, U))
    if deferred and round_to in (None, torch.float32, torch.bfloat16, torch.float16):
        through = round_to if rounded else torch.float32
        return LayerInit(A=ScaledRounded(Ut, beta, through), B=ScaledRounded(V, beta, through), scaling=scaling,
                         residual=residual, owned=True, as_is=True)
    if rounded:
        A = scale_rounded(Ut, beta, round_to, backend=backend)
        B = scale_rounded(V, beta, round_to, backend=backend)
    else:  # one fresh tensor each, with huge pages where the system has them (ops/memory.py)
        A = torch.mul(Ut, beta, out=memory.empty((r, n), dtype=Ut.dtype, device=Ut.device))
        B = torch.mul(V, beta, out=memory.empty(tuple(V.shape), dtype=V.dtype, device=V.device))
    return LayerInit(A=A, B=B, scaling=scaling, residual=residual, owned=True, as_is=rounded)


def reference_dst_matrix(p: int, q: int, device=None) -> torch.Tensor:
    """Transcription of the LoRAM reference ``fast_dst_matrix(p, q)`` (fp32 angles): p×q slice of the DST-I
    matrix of size max(p, q)."""
    transpose = p < q
    m, n = (q, p) if transpose else (p, q)
    k = torch.arange(n, device=device, dtype=torch.float32).unsqueeze(1)
    i = torch.arange(m, device=device, dtype=torch.float32).unsqueeze(0)
    basis = torch.sin((i + 1) * (k + 1) * torch.pi / (m + 1))
    scale = torch.sqrt(torch.tensor(2 / (m + 1), device=device, dtype=torch.float32))
    out = (scale * basis).T
    return out.T if transpose else out


def loram_reference(W: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Transcription of the LoRAM reference ``LoraLayer.loram_init`` (minus its print): materialises
    everything in fp32. Returns (A, B, W_res) with A, B in fp32 (the reference stores them cast to W's dtype)
    and W_res in W's dtype. The test oracle and the benchmark baseline."""
    dtype = W.dtype
    Wf = W.to(torch.float32)
    Uhr = reference_dst_matrix(r, Wf.shape[1], W.device)
    Vr = reference_dst_matrix(Wf.shape[0], r, W.device)
    variance_ratio = (torch.var(Wf) / torch.var(Vr @ Uhr)).item()
    rho = math.log(r, min(*Wf.shape))
    beta = math.pow(rho * variance_ratio, 1 / 4)
    A = (Uhr * beta).contiguous()
    B = (Vr * beta).contiguous()
    _ = torch.std(B @ A) / torch.std(Vr @ Uhr)  # the reference computes this for its debug print
    W_res = (Wf - scaling * B @ A).to(dtype)
    return A, B, W_res
