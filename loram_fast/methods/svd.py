"""SVD-family inits: PiSSA (principal components), MiLoRA (minor components), OLoRA (QR).

For W (out×in) with SVD ``W = U diag(S) Vh``, rank r, LoRA scaling s:
- PiSSA (peft ``pissa_init``):   ``A = diag(sqrt(S_r/s)) Vh_r``, ``B = U_r diag(sqrt(S_r/s))`` with the top r
  triplets, so ``s·B A = U_r S_r Vh_r`` (the best rank-r approximation) and ``W ← W − s·B A``.
  ``pissa`` computes the exact top-r triplets (as peft's full SVD does) with :func:`~loram_fast.ops.topsvd.top_svd`:
  subspace iteration until an a-posteriori residual test passes, falling back to the full SVD where iteration
  would be slow (``solver="svd"`` always runs the full SVD); ``pissa_niter_N`` our randomized SVD with N power
  iterations and oversampling (peft calls ``torch.svd_lowrank`` with q = r and no oversampling).
- MiLoRA (arXiv 2406.09044): the same split with the r *smallest* triplets; the residual keeps the principal part.
- OLoRA (peft ``olora_init``): ``W = Q R``; ``A = R[:r]``, ``B = Q[:, :r]`` (no division by s), ``W ← W − s·B A``.
  Only the first r columns matter: ``Q[:, :r]`` is the Q factor of ``W[:, :r]`` and ``R[:r] = Q[:, :r]ᵀ W``, so we
  factor an out×r panel and make one GEMM instead of a full QR (same Householder result, O(out·in·r)).

Every function takes a batch of same-shaped weights (b, out, in), any float dtype, and returns fp32 factors.
"""
from __future__ import annotations

import logging

import torch

from ..ops.matmul import matmul_f32
from ..ops.rsvd import randomized_svd, randomized_svd_sharded
from ..ops.threads import small_op
from ..ops.topsvd import bottom_svd, bottom_svd_route, top_svd, top_svd_sharded
from .common import LayerInit, product_residual

logger = logging.getLogger(__name__)

# fp32 bytes of one stacked batch: larger groups are processed in several batches
BATCH_BYTES = 512 << 20
# stack same-shaped CPU weights too (tests use it to exercise the batched path on CPU)
STACK_ON_CPU = False


def split_sqrt(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scaling: torch.Tensor):
    """PiSSA's split: ``A = diag(sqrt(S/s)) Vh``, ``B = U diag(sqrt(S/s))`` (batched; scaling shape (b,))."""
    root = (S / scaling[:, None]).sqrt()
    return root[..., :, None] * Vh, U * root[..., None, :]


def _check_finite(W: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"loram_fast.{name}: the weight holds NaN or Inf values")


def minor_svd(W: torch.Tensor, r: int, *, need: str = "both", memo: dict | None = None):
    """:func:`~loram_fast.ops.topsvd.bottom_svd` of one weight; ``memo`` (the call's cache, shared by its layers)
    remembers the shapes whose iteration gave up, and later weights of such a shape go to the fallback at once (no
    QR, no attempt): a model of like weights pays the failed attempt (up to ~10 % of a full SVD) once per shape,
    not once per weight. The result is exact either way."""
    key = ("bottom_svd gave up", tuple(W.shape), r, need)
    if memo is not None and key in memo:  # the fallback that shape's first weight took: Gram route or full SVD
        return bottom_svd(W, r, need=need, attempt=False, gram=memo[key])
    got, route = bottom_svd_route(W, r, need=need)
    if memo is not None and got.fallback and got.passes > 0:
        memo[key] = route == "gram"
        logger.debug("loram_fast: the minor-component iteration on a %s weight gave up; later weights of that shape "
                     "in this call go to the fallback at once", "×".join(map(str, W.shape)))
    return got


def svd_factors(W: torch.Tensor, r: int, scalings: torch.Tensor, *, which: str, niter: int | None,
                oversample: int = 8, solver: str = "iterative", backend=None, memo: dict | None = None):
    """(A, B) batched for PiSSA (``which="top"``) or MiLoRA (``"bottom"``) on W (b, out, in); ``memo``: see
    :func:`minor_svd`."""
    name = "pissa" if which == "top" else "milora"
    if niter is None and which == "top" and solver == "iterative":
        U, S, Vh, _, _ = top_svd(W, r, backend=backend)  # refuses NaN/Inf itself (on its sketch, no extra pass)
    elif niter is None and which == "bottom" and solver == "iterative":
        parts = [minor_svd(w, r, memo=memo) for w in W.reshape(-1, *W.shape[-2:])]
        U = torch.stack([p.U for p in parts]).reshape(*W.shape[:-2], W.shape[-2], r)
        S = torch.stack([p.S for p in parts]).reshape(*W.shape[:-2], r)
        Vh = torch.stack([p.Vh for p in parts]).reshape(*W.shape[:-2], r, W.shape[-1])
    elif niter is None:
        Wf = W.float()
        _check_finite(Wf, name)
        U, S, Vh = torch.linalg.svd(Wf, full_matrices=False)
        del Wf
        if which == "top":
            U, S, Vh = U[..., :, :r], S[..., :r], Vh[..., :r, :]
        else:
            U, S, Vh = U[..., :, -r:], S[..., -r:], Vh[..., -r:, :]
    else:
        U, S, Vh = randomized_svd(W, r, oversample=oversample, niter=niter, backend=backend)
    return split_sqrt(U, S, Vh, scalings)


def qr_factors(W: torch.Tensor, r: int, *, backend=None):
    """OLoRA's (A, B) = (R[:r], Q[:, :r]) of ``W = QR``, batched on W (b, out, in), from the out×r panel."""
    panel = W[..., :, :r].float()
    _check_finite(panel, "olora")
    with small_op(panel.device):
        Q, _ = torch.linalg.qr(panel)
    # R[:r] = Q_rᵀ W (its first r columns equal the panel's R, the rest the projection of W)
    A = matmul_f32(W.transpose(-1, -2), Q, backend=backend).transpose(-1, -2)
    if not bool(torch.isfinite(A).all()):
        raise ValueError("loram_fast.olora: the weight holds NaN or Inf values")
    return A, Q


def _batched(views: list[torch.Tensor], fn, scalings: list[float]):
    """Run ``fn(stacked, scalings)`` over memory-bounded batches of same-shaped weights. Stacking copies the
    weights, which pays on GPUs (one batched launch per step instead of many small ones) but not on the CPU,
    where BLAS already uses every core on one matrix: there the weights go one at a time, uncopied."""
    m, n = views[0].shape
    per = max(1, BATCH_BYTES // (4 * m * n)) if (STACK_ON_CPU or views[0].device.type != "cpu") else 1
    out = []
    for start in range(0, len(views), per):
        chunk = views[start:start + per]
        W = torch.stack(chunk) if len(chunk) > 1 else chunk[0].unsqueeze(0)
        s = torch.tensor(scalings[start:start + per], dtype=torch.float32, device=W.device)
        A, B = fn(W, s)
        out.extend(zip(A.unbind(0), B.unbind(0)))
    return out


def svd_init_batch(views, r, scalings, *, which="top", niter=None, oversample=8, solver="iterative", backend=None,
                   bases=None):
    """LayerInits for PiSSA/MiLoRA on same-shaped weights (one batched factorisation per memory batch); ``bases``:
    the call's cache (MiLoRA: :func:`minor_svd`'s memo)."""
    pairs = _batched(views, lambda W, s: svd_factors(W, r, s, which=which, niter=niter, oversample=oversample,
                                                      solver=solver, backend=backend, memo=bases), scalings)
    return [_with_residual(A, B, s) for (A, B), s in zip(pairs, scalings)]


def _with_residual(A, B, scaling) -> LayerInit:
    A, B = A.contiguous(), B.contiguous()
    return LayerInit(A=A, B=B, scaling=scaling, residual=product_residual(scaling, B, A))


def olora_init_batch(views, r, scalings, *, backend=None, bases=None):
    """LayerInits for OLoRA on same-shaped weights."""
    pairs = _batched(views, lambda W, s: qr_factors(W, r, backend=backend), scalings)
    return [_with_residual(A, B, s) for (A, B), s in zip(pairs, scalings)]


def svd_init_sharded(op, r: int, scaling: float, *, niter: int | None, oversample: int = 8,
                     solver: str = "iterative", backend=None, bases=None) -> LayerInit:
    """PiSSA of a weight split across ranks (``op``: a :class:`~loram_fast.ops.sharded.MatrixOperator`): the same
    subspace iteration (``pissa``) or randomized SVD (``pissa_niter_N``, the same Ω) on the sharded products, the
    split on every rank; A and B are gathered whole (O((out + in)·r) per rank), the weight never is."""
    if niter is None:
        U, S, Vh = top_svd_sharded(op, r)
    else:
        U, S, Vh = randomized_svd_sharded(op, r, oversample=oversample, niter=niter)
    root = (S / scaling).sqrt()
    A = op.gather((root[:, None] * Vh).mT, "n").mT
    B = op.gather(U * root, "m")
    return _with_residual(A, B, scaling)


def olora_init_sharded(op, r: int, scaling: float, *, backend=None, bases=None) -> LayerInit:
    """OLoRA of a weight split across ranks: the out×r panel ``W[:, :r]`` on every rank (one all-reduce of its
    size), its Householder QR there (the same Q as on one process), ``A = Qᵀ W`` from the sharded product."""
    m, n = op.shape
    panel = op.block((0, m), (0, r))
    _check_finite(panel, "olora")
    with small_op(panel.device):
        Q, _ = torch.linalg.qr(panel)
    A = op.gather(op.tmm(op.sharding.local_rows(Q) if op.sharded("m") else Q).mT, "n").mT
    if not bool(torch.isfinite(A).all()):
        raise ValueError("loram_fast.olora: the weight holds NaN or Inf values")
    return _with_residual(A, Q, scaling)


def mica_init(W: torch.Tensor, r: int, scaling: float, solver: str = "iterative", memo: dict | None = None) -> LayerInit:
    """MiCA (peft ``mica_init``, arXiv 2604.01694): ``B = U[:, -r:]``, the left singular vectors of the r smallest
    singular values of W, ``A = 0``, B frozen; W untouched (``B A = 0``). ``solver="iterative"``:
    :func:`~loram_fast.ops.topsvd.bottom_svd` (the same subspace, signs free); ``"svd"``: the full fp32 SVD, as
    peft."""
    if solver == "iterative":
        try:
            B = minor_svd(W, r, need="U", memo=memo).U.contiguous()
        except ValueError as exc:
            raise ValueError(str(exc).replace("bottom_svd", "mica")) from exc
    else:
        Wf = W.float()
        _check_finite(Wf, "mica")
        B = torch.linalg.svd(Wf, full_matrices=False).U[:, -r:].contiguous()
    return LayerInit(A=torch.zeros(r, W.shape[1], device=W.device), B=B, scaling=scaling, frozen=("lora_B",))


def check_sharded(solver: str = "iterative", **_) -> str | None:
    if solver == "svd":
        return "solver='svd' runs the full SVD of the whole weight"
    return None


def check_rank(shape: tuple[int, int], r: int, **_) -> str | None:
    m, n = shape
    if r > min(m, n):
        return f"rank r={r} exceeds min(out, in)={min(m, n)} of the {m}×{n} weight; use r <= {min(m, n)}"
    return None
