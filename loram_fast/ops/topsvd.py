"""Exact top-r singular triplets without a full SVD: block subspace iteration with Rayleigh–Ritz, run until an
a-posteriori test passes, with an exact fallback where iterating would not pay.

For A (..., m, n), rank r, block q = min(max(2r, r + 16), min(m, n)):

    Y = A Ω  (Ω Gaussian n×q, seeded)
    repeat:  Q = orth(Y);  Z = Aᵀ Q = Q₂ R₂;  R₂ᵀ = U_r S V_rᵀ (q×q SVD)
             U = Q U_r,  V = Q₂ V_r,  Y = A Q₂,  A V = Y V_r
             done when every ‖A v_i − σ_i u_i‖ ≤ tol · σ_1  (i < r; Aᵀ u_i = σ_i v_i holds by construction)

Each pass costs two products with A (4·m·n·q flops); the error falls by about (σ_{q+1}/σ_r)² per pass, a rate
the Ritz values give after the first half pass. When the passes made plus those still needed exceed the time of a
full SVD (``_passes_budget``), or a pass stops improving the residual (the fp32 floor), the iteration gives up:
on a flat spectrum (a Gaussian matrix) after one or two passes, a few percent of the SVD's time. The fallback is
then, on the CPU, the eigenvectors of the fp64 Gram matrix (:func:`_gram_fallback`: ~0.75× the time of the full
fp32 SVD, and closer to the exact triplets), else (a GPU, or values at fp32 noise) ``torch.linalg.svd``. A matrix
with min(m, n) <= 4q goes to the full SVD at once.

``tol`` is relative to σ_1: by default 1e-6 · max(1, √(max(m, n)/2048)), just above what fp32 products reach
(about the residual a full fp32 SVD leaves). Singular values then agree with the full SVD to ~1e-6 relative or
better (Rayleigh–Ritz), and the rank-r product ``U S Vh`` to about tol · σ_1 / gap.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .matmul import fp32_if_small
from .sharded import MatrixOperator
from .threads import small_op




def default_tol(m: int, n: int) -> float:
    return 1e-6 * max(1.0, math.sqrt(max(m, n) / 2048))


class TopSVD(NamedTuple):
    U: torch.Tensor   # (..., m, r) fp32
    S: torch.Tensor   # (..., r) fp32
    Vh: torch.Tensor  # (..., r, n) fp32
    passes: int       # products-with-A pairs made (0: the full SVD ran)
    fallback: bool    # True when the iteration did not give the result (small weight, or it gave up)


def _full(A: torch.Tensor, r: int, passes: int, gram: bool = False) -> TopSVD:
    """The top r of ``torch.linalg.svd``; ``gram``: first try :func:`_gram_fallback` on each matrix (the fallback
    after the iteration gave up: on the CPU ~0.75× the SVD's time, closer to the exact triplets)."""
    Af = A.float()
    if not bool(torch.isfinite(Af).all()):
        raise ValueError("loram_fast.top_svd: the input holds NaN or Inf values")
    if gram and Af.device.type in GRAM_DEVICES:
        parts = []
        for M in Af.reshape(-1, *Af.shape[-2:]):
            parts.append(_gram_fallback(M, r, "top"))
            if parts[-1] is None:
                break
        if parts[-1] is not None:
            U, S, Vh = (torch.stack(p).reshape(*Af.shape[:-2], *p[0].shape) for p in zip(*parts))
            return TopSVD(U, S, Vh, passes, True)
    U, S, Vh = torch.linalg.svd(Af, full_matrices=False)
    return TopSVD(U[..., :, :r], S[..., :r], Vh[..., :r, :], passes, True)


def _passes_budget(m: int, n: int, q: int) -> int:
    """Passes (4·m·n·q flops each) that cost about as much time as a full SVD (~ 4·m·n·k + 8·k³ flops,
    k = min(m, n)): a pass's skinny products and small QRs run at a lower flop rate than LAPACK's blocked SVD (about
    2.5× lower on a 2-core CPU, measured), so the flop ratio is divided by 2.5. Beyond this, iterating does not pay."""
    k = min(m, n)
    return max(3, int((4 * m * n * k + 8 * k ** 3) / (4 * m * n * q) / 2.5))


def top_svd(A: torch.Tensor, r: int, *, tol: float | None = None, generator: torch.Generator | None = None,
            backend=None) -> TopSVD:
    """Top-r singular triplets of A (..., m, n), fp32, to the a-posteriori tolerance ``tol`` (see module docstring).
    ``A`` may be a one-process :class:`~loram_fast.ops.sharded.MatrixOperator` (e.g. ``W C`` never formed); the
    full-SVD fallback then forms it (``op.whole()``).

    >>> U, S, Vh, passes, fallback = top_svd(W, 16)   # W 2048×2048 → U 2048×16, S 16, Vh 16×2048
    """
    if isinstance(A, MatrixOperator):
        if A.sharding is not None:
            raise ValueError("loram_fast.top_svd: a sharded operator goes to top_svd_sharded")
        op, dense = A, A.whole
    elif not isinstance(A, torch.Tensor) or A.dim() < 2:
        raise ValueError(f"loram_fast.top_svd: expected a tensor of shape (..., m, n), got "
                         f"{tuple(getattr(A, 'shape', ()))}")
    else:
        op, dense = fp32_if_small(A), lambda: A
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"loram_fast.top_svd: rank must be a positive integer, got {r!r}")
    m, n = op.shape[-2:]
    tol = default_tol(m, n) if tol is None else tol
    if not (isinstance(tol, float) and 0 < tol < 1):
        raise ValueError(f"loram_fast.top_svd: tol must be a float in (0, 1), got {tol!r}")
    k = min(m, n)
    q = min(max(2 * r, r + 16), k)
    if r > k:
        raise ValueError(f"loram_fast.top_svd: rank r={r} exceeds min(m, n)={k}")
    if k <= 4 * q:
        return _full(dense(), r, 0)
    U, S, Vh, passes, converged = subspace_iteration(op, r, q, tol, _passes_budget(m, n, q),
                                                     give_up=True, generator=generator, backend=backend)
    if converged:
        return TopSVD(U, S, Vh, passes, False)
    return _full(dense(), r, passes, gram=True)


def subspace_iteration(A, r: int, q: int, tol: float, max_passes: int, *, give_up: bool = False,
                       generator: torch.Generator | None = None, backend=None, owner: str = "top_svd",
                       each: bool = False):
    """The loop of the module docstring with block q: ``(U, S, Vh, passes, converged)``, fp32. Stops when the
    residual test passes, after ``max_passes``, or (``give_up``) when the Ritz rate predicts more than
    ``max_passes`` passes or a pass stops improving; ``U, S, Vh`` are then the last estimate (None if none).
    ``each``: every residual is measured against its own σ_i instead of σ_1 (``bottom_svd``: on ``R⁻¹`` the values
    span the whole range of W's smallest ones).
    ``A``: a matrix, or a :class:`~loram_fast.ops.sharded.MatrixOperator` (a sharded weight: U then holds this
    rank's rows where the rows are sharded, Vh its columns where the columns are)."""
    op = A if isinstance(A, MatrixOperator) else MatrixOperator(A, A.shape[-2:], backend=backend)
    Y = op.sketch(q, generator, owner)
    last, best = math.inf, (None, None, None)
    passes = 0
    for passes in range(1, max_passes + 1):
        Q = op.orth(Y, "m")
        Z = op.tmm(Q).mT  # Aᵀ Q, n×q
        Q2, R2 = op.qr(Z, "n")
        with small_op(op.device):
            Ur, S, Vrh = torch.linalg.svd(R2.mT)
        # the error shrinks by rate = (σ_q/σ_r)² per pass (Ritz estimates). First pass: with the residual still of
        # order σ_1, a spectrum too flat to reach tol within the budget gives up now, before the pass's second product
        rate = float(((S[..., q - 1] / S[..., r - 1]) ** 2).clamp(max=1.0).max()) if q > r else 1.0
        if give_up and passes == 1 and (rate >= 0.999 or math.log(1.0 / tol) / -math.log(max(rate, 1e-30)) > max_passes):
            break
        Y = op.mm(Q2)                                  # A Q₂: the next pass's sketch, and A V below
        Vr = Vrh[..., :r, :].mT                        # q×r
        U = Q @ Ur[..., :, :r]
        AV = Y @ Vr
        res = op.col_norms(AV - U * S[..., None, :r], "m")  # (..., r)
        best = (U, S[..., :r], (Q2 @ Vr).mT)
        worst = float((res / (tol * (S[..., :r] if each else S[..., :1]))).max())
        if worst <= 1.0:
            return (*best, passes, True)
        # passes still needed to bring the residual down to tol·σ_1
        needed = math.inf if rate >= 0.999 else math.log(worst) / -math.log(max(rate, 1e-30))
        if give_up and (passes + needed > max_passes or (passes > 2 and worst > 0.9 * last)):
            break
        last = worst
    return (*best, passes, False)


# longest unsharded side whose fp64 Gram matrix the sharded top-r SVD of a small weight forms (128 MiB, one eigh)
GRAM_MAX = 4096


def _gram_svd(op: MatrixOperator, r: int, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r triplets from the fp64 Gram matrix over ``side`` (the unsharded one): AᵀA (side n) or AAᵀ (side m)."""
    gram = op.gram(side)  # the same on every rank: all raise together
    if not bool(torch.isfinite(gram).all()):
        raise ValueError("loram_fast.top_svd: the input holds NaN or Inf values")
    evals, evecs = torch.linalg.eigh(gram)
    top = evecs[:, -r:].flip(-1)  # descending
    sigma = evals[-r:].flip(-1).clamp_min(0).sqrt()
    inv = torch.where(sigma > 0, 1.0 / sigma.clamp_min(1e-300), torch.zeros_like(sigma))
    if side == "n":  # V = top; U = A V / σ (m-side)
        return (op.mm(top.float()).double() * inv).float(), sigma.float(), top.mT.float().contiguous()
    # U = top; Vᵀ = Uᵀ A / σ (n-side)
    return top.float().contiguous(), sigma.float(), (op.tmm(top.float()).double() * inv[:, None]).float()


def top_svd_sharded(op: MatrixOperator, r: int, *, tol: float | None = None,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`top_svd` of a sharded weight: the same iteration and residual test, never the full SVD (which would
    need the whole weight). A matrix with min(m, n) <= 4q is solved directly: from the eigenvectors of its fp64 Gram
    matrix over the unsharded side when that side has at most ``GRAM_MAX`` entries (one all-reduce of its size;
    fp64 makes it as exact as the full fp32 SVD), else by the randomized SVD with a block of all k columns (exact up
    to fp32 rounding, i.e. about 1e-7·σ_1/gap in the subspace).
    Raises ``ValueError`` on every rank when the iteration cannot reach ``tol`` (a flat spectrum)."""
    m, n = op.shape
    k = min(m, n)
    tol = default_tol(m, n) if tol is None else tol
    q = min(max(2 * r, r + 16), k)
    if k <= 4 * q:  # small weight: no iteration
        whole_side = "n" if op.sharding.dim == 0 else "m"
        if op.shape[0 if whole_side == "m" else 1] <= GRAM_MAX:
            return _gram_svd(op, r, whole_side)
        # a block of all k columns spans the whole range: Rayleigh–Ritz on it is exact up to rounding
        U, S, Vh, _, _ = subspace_iteration(op, r, k, tol, 2, generator=generator)
        return U, S, Vh
    U, S, Vh, passes, converged = subspace_iteration(op, r, q, tol, 4 * _passes_budget(m, n, q), give_up=True,
                                                     generator=generator)
    if not converged:
        raise ValueError(f"the exact top-{r} SVD of this sharded {m}×{n} weight did not converge in {passes} "
                         "pass(es) (flat spectrum: only a full SVD of the whole matrix would give it); use a randomized "
                         "solver (pissa_niter_<N> for PiSSA, solver='rsvd' for the gradient inits), or "
                         "init_model(..., gather_full_weights=True)")
    return U, S, Vh


class _InverseTriangular(MatrixOperator):
    """``R⁻¹`` for an upper-triangular R (k×k, fp32) through triangular solves: ``R⁻¹ X`` and ``Yᵀ R⁻¹``."""

    def __init__(self, R: torch.Tensor):
        super().__init__(R, R.shape, None, None)

    def mm(self, X: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve_triangular(self.local, X, upper=True)

    nonfinite = "the weight is singular to fp32 precision"

    def tmm(self, Y: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve_triangular(self.local.mT, Y, upper=False).mT


class BottomSVD(NamedTuple):
    U: torch.Tensor   # (m, r) fp32, or None when not asked for
    S: torch.Tensor   # (r,) fp32, descending (as the last r of a full SVD)
    Vh: torch.Tensor  # (r, n) fp32, or None when not asked for
    passes: int
    fallback: bool    # True when the iteration did not give the result


def bottom_svd(W: torch.Tensor, r: int, *, tol: float | None = None, need: str = "both",
               generator: torch.Generator | None = None, attempt: bool = True, gram: bool = True) -> BottomSVD:
    """The r smallest singular triplets of W (m×n; the last r of ``torch.linalg.svd(W, full_matrices=False)``),
    without a full SVD of W.

    W (or Wᵀ, whichever is taller) = Q R with R k×k (k = min(m, n)); the smallest singular values of W are those of
    R, and the largest of ``R⁻¹``, whose top-r triplets come from :func:`subspace_iteration` with two triangular
    solves per pass (shift-and-invert at shift 0) and the module's a-posteriori test on ``R⁻¹``. Q stays in its
    Householder form (``torch.geqrf``) and is applied to the r vectors that need it (``torch.ormqr``). A flat bottom
    spectrum, which iteration would not resolve within the cost of a full SVD, gives up after a pass or two and goes
    to :func:`_by_gram` on R (CPU: the eigenvectors of R's fp64 Gram matrix, ~0.75× the time of a full fp32
    SVD and closer to the exact triplets); where that declines (the bottom values at fp32's noise, or a GPU) to a
    full SVD, of R when W is far from square (≥ 11/6 : 1, where LAPACK itself would factor W by QR first), of W
    otherwise. ``need``: "U", "Vh" or "both". ``attempt=False``: no iteration, the fallback at once (the Gram route
    on W, or on R from a QR when W is far from square), for weights like one that just gave up; ``gram=False``: the
    full SVD as the fallback (for weights like one where the Gram route declined).
    """
    return bottom_svd_route(W, r, tol=tol, need=need, generator=generator, attempt=attempt, gram=gram)[0]


def bottom_svd_route(W: torch.Tensor, r: int, *, tol: float | None = None, need: str = "both",
                     generator: torch.Generator | None = None, attempt: bool = True, gram: bool = True
                     ) -> tuple[BottomSVD, str]:
    """:func:`bottom_svd`, and the route that gave the result: ``"iteration"``, ``"gram"`` (the fp64 Gram route)
    or ``"svd"`` (the full SVD)."""
    if need not in ("U", "Vh", "both"):
        raise ValueError(f"loram_fast.bottom_svd: need must be 'U', 'Vh' or 'both', got {need!r}")
    m, n = W.shape
    k = min(m, n)
    if not isinstance(r, int) or not 1 <= r <= k:
        raise ValueError(f"loram_fast.bottom_svd: rank must be an integer in [1, {k}], got {r!r}")
    Wf = W.float()
    if not bool(torch.isfinite(Wf).all()):
        raise ValueError("loram_fast.bottom_svd: the input holds NaN or Inf values")
    q = min(max(2 * r, r + 16), k)
    if k <= 4 * q:  # small: the full SVD at once (as top_svd)
        return _bottom_of_full_svd(Wf, r, need, 0), "svd"
    # the taller orientation (a square W: the one whose needed side comes without Q)
    transposed = m < n or (m == n and need == "U")
    # where the Gram route declines: a near-square W's own SVD (R's costs as much); far from square, R's
    svd_of_w = not _far_from_square(m, n)
    if not attempt:
        # no free test predicts a decline here (a weight at fp32 noise then pays the Gram route and the SVD: rare,
        # and minor_svd sends later weights of a shape where the route declined to the SVD at once)
        got = _gram_fallback(Wf, r, "bottom") if gram else None
        if got is None:
            return _bottom_of_full_svd(Wf, r, need, 0), "svd"
        U, S, Vh = got
        return BottomSVD(U if need != "Vh" else None, S, Vh if need != "U" else None, 0, True), "gram"
    tall = Wf.mT if transposed else Wf  # = Q R
    # tall = W: U_W = Q U_R, V_W = V_R;  tall = Wᵀ: U_W = V_R, V_W = Q U_R
    need_q = need in ("both", "Vh") if transposed else need in ("both", "U")
    reflectors, tau = torch.geqrf(tall)  # Q as Householder reflectors below R's diagonal: applied, never formed
    R = reflectors[:k].triu()
    tol = default_tol(m, n) if tol is None else tol
    passes, converged, got = 0, False, None
    if attempt and bool((R.diagonal().abs() > 0).all()):
        Vi, Si, Uih, passes, converged = subspace_iteration(_InverseTriangular(R), r, q, tol,
                                                            _bottom_budget(m, n, k, q), give_up=True,
                                                            generator=generator, owner="bottom_svd")
    if converged:
        # R⁻¹ = V_R Σ⁻¹ U_Rᵀ: its top triplets are R's bottom ones, the smallest first; reverse to descending
        S = (1.0 / Si).flip(-1)
        U_R, V_R = Uih.mT.flip(-1), Vi.flip(-1)
        # the test above is relative to R⁻¹'s largest value; accept only what also meets a full SVD's backward
        # error in W's own terms: every ‖R v_i − σ_i u_i‖ ≤ 8·eps·σ_1 (σ_1 from a few power steps on R)
        converged = bool(torch.linalg.vector_norm(R @ V_R - U_R * S, dim=0).max()
                         <= 8 * torch.finfo(torch.float32).eps * _largest_singular_value(R, generator))
    if not converged:
        # σ_min(R) ≤ min |R_ii| and σ_1(R) ≥ max |R_ii|: a pivot at fp32 noise means the Gram route would decline
        pivots = R.diagonal().abs()
        usable = gram and float(pivots.min()) > GRAM_FLOOR * float(pivots.max())
        got = _by_gram(R, r) if usable else None
        if got is not None:
            U_R, S, V_R = got
        elif svd_of_w:
            return _bottom_of_full_svd(Wf, r, need, passes), "svd"
        else:
            U_R_all, S_all, Vh_R_all = torch.linalg.svd(R, full_matrices=False)
            U_R, S, V_R = U_R_all[:, -r:], S_all[-r:], Vh_R_all[-r:].mT
    QU = _apply_q(reflectors, tau, U_R) if need_q else None
    if transposed:
        U = V_R.contiguous() if need != "Vh" else None
        Vh = QU.mT.contiguous() if need != "U" else None
    else:
        U = QU if need != "Vh" else None
        Vh = V_R.mT.contiguous() if need != "U" else None
    route = "iteration" if converged else "gram" if got is not None else "svd"
    return BottomSVD(U, S.contiguous(), Vh, passes, not converged), route


# devices where the fp64 Gram route replaces the full SVD as the fallback (measured on a 2-core CPU: 0.72–0.79× the
# time of torch.linalg.svd for 512² to 2048²; on GPUs fp64 throughput varies by card and it has not been measured)
GRAM_DEVICES = ("cpu",)
# the longest shorter side of a matrix the route takes: its time against torch.linalg.svd grows with the size (2-core
# CPU, square: 0.72–0.79× to 2048, 0.84–0.88× at 4096, 1.02× at 6144); beyond, the full SVD
GRAM_MAX_SIDE = 4096
# singular values below this fraction of σ_1 are fp32 rounding in W: their vectors are arbitrary, and the Gram
# route leaves them to the full SVD (the reference's own choice)
GRAM_FLOOR = 1e-7


def _by_gram(M: torch.Tensor, r: int, which: str = "bottom", rows_per_block: int = 1 << 22):
    """The r largest (``which="top"``) or smallest (``"bottom"``) singular triplets of M (fp32, rows×cols) from the
    eigenvectors of its Gram matrix over the shorter side, in fp64: for X = M (tall) or Mᵀ (wide),
    G = XᵀX = V Σ² Vᵀ (``torch.linalg.eigh``), then X V = U Σ, so σ_i = ‖X v_i‖ and u_i = X v_i / σ_i. In fp64 the
    squared spectrum loses nothing fp32 keeps: eigenvalues carry errors of ~1e-16·σ_1², so σ_i to
    ~1e-16·(σ_1/σ_i)² relative and the vectors to ~1e-16·σ_1²/gap(σ²), closer to the exact triplets than a full
    fp32 SVD (~6e-8·σ_1/σ_i and ~6e-8·σ_1/gap(σ)) while σ_1/σ_i < 5e8. X goes to fp64 in blocks of
    ``rows_per_block`` entries, never whole.

    Returns ``(U, S, V)``: U rows×r, S (r,) descending (as a full SVD orders them), V cols×r, fp32; or None where
    the route does not apply (a device outside ``GRAM_DEVICES``, a shorter side beyond ``GRAM_MAX_SIDE``, or a
    returned σ ≤ ``GRAM_FLOOR``·σ_1)."""
    if M.device.type not in GRAM_DEVICES or min(M.shape) > GRAM_MAX_SIDE:
        return None
    wide = M.shape[0] < M.shape[1]
    X = M.mT if wide else M
    k = X.shape[1]
    step = max(1, rows_per_block // k)
    gram = torch.zeros(k, k, dtype=torch.float64, device=M.device)
    for i in range(0, X.shape[0], step):
        block = X[i:i + step].double()
        gram.addmm_(block.mT, block)
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    V = (evecs[:, -r:] if which == "top" else evecs[:, :r]).flip(-1).contiguous()  # in descending order of σ
    Y = torch.cat([X[i:i + step].double() @ V for i in range(0, X.shape[0], step)])
    S = torch.linalg.vector_norm(Y, dim=0)
    sigma_1 = float(evals[-1].clamp_min(0).sqrt())
    if not bool(torch.isfinite(S).all()) or float(S.min()) <= GRAM_FLOOR * sigma_1:
        return None
    # eigh orders by σ², the norms may swap a near-tie: keep the result descending by the σ returned
    S, order = S.sort(descending=True)
    U, V = (Y[:, order] / S).float(), V[:, order].float()
    S = S.float()
    if wide:  # X = Mᵀ: eigh gave M's left vectors, X V / σ its right ones
        return V, S, U
    return U, S, V


def _far_from_square(m: int, n: int) -> bool:
    """At least 11/6 times as tall or wide: where LAPACK's SVD factors by QR first, and where a QR (fp32) and the
    fp64 Gram matrix of R cost less than the fp64 Gram matrix of the whole weight."""
    return 6 * max(m, n) >= 11 * min(m, n)


def _gram_fallback(Wf: torch.Tensor, r: int, which: str):
    """:func:`_by_gram` of a whole 2-D fp32 weight, as (U, S, Vh): of W itself when near square; far from square,
    of R from the QR of the taller of W and Wᵀ (``torch.geqrf``), Q applied to the r vectors on its side
    (``torch.ormqr``). None where the route declines."""
    m, n = Wf.shape
    if not _far_from_square(m, n):
        got = _by_gram(Wf, r, which)
        return None if got is None else (got[0], got[1], got[2].mT.contiguous())
    if Wf.device.type not in GRAM_DEVICES or min(m, n) > GRAM_MAX_SIDE:  # declined before the QR
        return None
    transposed = m < n
    tall = Wf.mT if transposed else Wf
    k = tall.shape[1]
    reflectors, tau = torch.geqrf(tall)
    got = _by_gram(reflectors[:k].triu(), r, which)
    if got is None:
        return None
    U_R, S, V_R = got
    QU = _apply_q(reflectors, tau, U_R)
    return (V_R.contiguous(), S, QU.mT.contiguous()) if transposed else (QU, S, V_R.mT.contiguous())


def _apply_q(reflectors: torch.Tensor, tau: torch.Tensor, U_R: torch.Tensor) -> torch.Tensor:
    """Q [U_R; 0] for the Q of ``torch.geqrf`` (square, as tall as ``reflectors``), never formed."""
    rows, k = reflectors.shape[0], U_R.shape[0]
    padded = torch.cat([U_R, U_R.new_zeros(rows - k, U_R.shape[1])]) if rows > k else U_R
    return torch.ormqr(reflectors, tau, padded.contiguous())


def _bottom_of_full_svd(Wf: torch.Tensor, r: int, need: str, passes: int) -> BottomSVD:
    """The last r triplets of ``torch.linalg.svd(Wf)`` (the sides ``need`` asks for), as a fallback result."""
    U_all, S_all, Vh_all = torch.linalg.svd(Wf, full_matrices=False)
    return BottomSVD(U_all[:, -r:] if need != "Vh" else None, S_all[-r:], Vh_all[-r:] if need != "U" else None,
                     passes, True)


def _largest_singular_value(R: torch.Tensor, generator, steps: int = 6) -> float:
    """σ_1 of R from a few power steps (a lower bound, within a few percent)."""
    g = generator if generator is not None else torch.Generator(device=R.device).manual_seed(1)
    x = torch.randn(R.shape[1], 1, generator=g, device=R.device)
    for _ in range(steps):
        x = R.mT @ (R @ x)
        x /= x.norm()
    return float((R @ x).norm())


def _bottom_budget(m: int, n: int, k: int, q: int) -> int:
    """Passes (two k×k triangular solves with q columns: 2·k²·q flops) that cost about a full SVD of R (~ 12·k³
    flops): triangular solves run at a few times lower flop rate than LAPACK's SVD, hence the factor 4."""
    return max(3, int(12 * k ** 3 / (2 * k * k * q) / 4))

