"""In-place residual updates of a weight, in the weight's own dtype.

- ``lowrank_update_(W, B, A, alpha)``: ``W ← W + alpha · B @ A`` for W m×n (fp32/fp16/bf16, any strides,
  e.g. the transposed view of a Conv1D weight), B m×r and A r×n. Each tile is computed in fp32 and
  rounded once to W's dtype; no m×n fp32 temporary of the whole weight is made.
- ``apply_residual(W, residual, sign)``: one of the two residual descriptions below, applied in place
  (``sign=-1`` writes it, ``+1`` adds it back): the one place that turns a method's residual into a write.
- ``loram_residual_(W, coef, r, kind)``: ``W ← W − coef · V_r @ U_rᵀ`` with ``V_r = dst_basis(m, r)`` and
  ``U_r = dst_basis(n, r)``: the LoRAM residual with ``coef = scaling · β²``.

Backends of ``lowrank_update_``: ``torch`` (fp32 ``addmm`` over row chunks), ``cpu-ext`` (BLAS product of a row
chunk, then one fused vectorised pass that adds and rounds), ``cuda`` (tiled fp32 FMA kernel), ``triton``.

Backends of ``loram_residual_``: ``torch`` is the reference product of the two bases (O(r) work per entry);
``cpu-ext``, ``cuda`` and ``triton`` use the closed form of ``csrc/kernel_math.h`` (O(1) work per entry for any r,
one pass over W, no basis matrix): ``V_r U_rᵀ[i, j] = amp · K(i, j)``,
``K = (p_i q_j − q_i p_j) / (c_j − c_i)`` from per-row and per-column terms (:func:`closed_form_terms`), and the
Dirichlet kernels at exact integer phases where ``|c_j − c_i| < NEAR_TOL`` (:func:`closed_form_exact`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import dispatch
from .bases import KINDS, cospi_frac, dst_basis, sinpi_frac
from .layout import byte_span, row_major

# rows per chunk in the torch reference: keeps each fp32 temporary near 4 MiB
_CHUNK_ELEMS = 1 << 20


def _check(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> None:
    if W.dim() != 2 or B.dim() != 2 or A.dim() != 2:
        raise ValueError("loram_fast.lowrank_update_: W, B and A must be 2-D")
    m, n = W.shape
    if B.shape[0] != m or A.shape[1] != n or B.shape[1] != A.shape[0]:
        raise ValueError(f"loram_fast.lowrank_update_: shapes do not chain: W {tuple(W.shape)}, "
                         f"B {tuple(B.shape)}, A {tuple(A.shape)}")
    if W.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"loram_fast.lowrank_update_: unsupported weight dtype {W.dtype}")


@dispatch.register("lowrank_update_", "torch")
def lowrank_update_reference_(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, alpha: float) -> torch.Tensor:
    """Plain-torch reference: fp32 ``addmm`` over row chunks, rounded once per chunk."""
    m, n = W.shape
    B = B.to(device=W.device, dtype=torch.float32)
    A = A.to(device=W.device, dtype=torch.float32)
    step = max(1, _CHUNK_ELEMS // max(n, 1))
    for start in range(0, m, step):
        rows = W[start:start + step]
        acc = rows.float()  # a view (no copy) when W is fp32
        if acc.data_ptr() == rows.data_ptr():
            acc.addmm_(B[start:start + step], A, alpha=alpha)
        else:
            rows.copy_(torch.addmm(acc, B[start:start + step], A, alpha=alpha))
    return W


@dispatch.register("lowrank_update_", "cpu-ext", "cuda")
def lowrank_update_native_(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, alpha: float) -> torch.Tensor:
    torch.ops.loram_fast.lowrank_update_(W, B.to(W.device), A.to(W.device), float(alpha))
    return W


dispatch.register("lowrank_update_", "triton")(dispatch.lazy("loram_fast.triton_kernels.residual", "lowrank_update"))


def lowrank_update_(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, alpha: float, *, backend=None) -> torch.Tensor:
    """``W ← W + alpha · B @ A`` in place, fp32 math, W's dtype kept. Returns W."""
    _check(W, B, A)
    _, impl = dispatch.resolve("lowrank_update_", W.device, backend)
    return impl(W, B, A, float(alpha))


@dispatch.register("loram_residual_", "torch")
def loram_residual_reference_(W: torch.Tensor, coef: float, r: int, kind: str = "dst1",
                              bases: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Reference: build the two bases (or take ``bases = (V, U)``, m×r and n×r, already built), then
    :func:`lowrank_update_reference_`."""
    m, n = W.shape
    if bases is None:
        bases = (dst_basis(m, r, kind=kind, device=W.device, backend="torch"),
                 dst_basis(n, r, kind=kind, device=W.device, backend="torch"))
    V, U = bases
    return lowrank_update_reference_(W, V, U.T, -coef)


# |c_j − c_i| below which the closed form's entry comes from exact phases (kmath::kNearTol in csrc/kernel_math.h)
NEAR_TOL = 1e-4


def closed_form_terms(n: int, r: int, kind: str, device=None) -> torch.Tensor:
    """(3, n) fp64: the rows p, q, cos θ of ``kmath::closed_form_terms`` for every index of a length-n basis."""
    i = torch.arange(n, dtype=torch.int64, device=device)
    if kind == "dst1":
        a, h = i + 1, 2 * (n + 1)
        w = (2 * r + 1) * a
        return torch.stack([sinpi_frac(w, h) * cospi_frac(a, h), cospi_frac(w, h) * sinpi_frac(a, h), cospi_frac(a, n + 1)])
    a, h = 2 * i + 1, 4 * n
    w = (2 * r - 1) * a
    return torch.stack([sinpi_frac(w, h) * sinpi_frac(a, h), cospi_frac(w, h) * cospi_frac(a, h), cospi_frac(a, 2 * n)])


def closed_form_amp(m: int, n: int, kind: str) -> float:
    return 2.0 / math.sqrt((m + 1) * (n + 1)) if kind == "dst1" else 2.0 / math.sqrt(m * n)


def _dirichlet(phase: torch.Tensor, half: int, R: int) -> torch.Tensor:
    """D_R(π P / H) = Σ_{k=1..R} cos(k π P / H) at exact phases (fp64)."""
    if R <= 0:
        return torch.zeros(phase.shape, dtype=torch.float64, device=phase.device)
    p = torch.remainder(phase, 2 * half)
    zero = p == 0
    ps = torch.where(zero, torch.ones_like(p), p)
    val = sinpi_frac(R * ps, 2 * half) * cospi_frac((R + 1) * ps, 2 * half) / sinpi_frac(ps, 2 * half)
    return torch.where(zero, torch.full_like(val, float(R)), val)


def closed_form_exact(i: torch.Tensor, j: torch.Tensor, m: int, n: int, r: int, kind: str) -> torch.Tensor:
    """K(i, j) (fp64) from the Dirichlet kernels at exact integer phases: ``kmath::closed_form_exact``."""
    if kind == "dst1":
        half, a, b = (m + 1) * (n + 1), (i + 1) * (n + 1), (j + 1) * (m + 1)
        return 0.5 * (_dirichlet(a - b, half, r) - _dirichlet(a + b, half, r))
    half, a, b = 2 * m * n, (2 * i + 1) * n, (2 * j + 1) * m
    return 0.5 + 0.5 * (_dirichlet(a - b, half, r - 1) + _dirichlet(a + b, half, r - 1))


def closed_form_irregular(row_c: torch.Tensor, col_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (i, j) with ``|col_c[j] − row_c[i]| < NEAR_TOL`` (a few per row: cos θ decreases with the
    index, so each row's set is one short run, found by binary search)."""
    asc = -col_c  # ascending
    lo = torch.searchsorted(asc, -row_c - 2 * NEAR_TOL)
    hi = torch.searchsorted(asc, -row_c + 2 * NEAR_TOL, right=True)
    width = int((hi - lo).max()) if hi.numel() else 0
    if width <= 0:
        empty = torch.empty(0, dtype=torch.int64, device=row_c.device)
        return empty, empty
    i = torch.arange(row_c.numel(), device=row_c.device)[:, None].expand(-1, width)
    j = lo[:, None] + torch.arange(width, device=row_c.device)[None, :]
    inside = j < hi[:, None]
    j = j.clamp_max(col_c.numel() - 1)
    near = inside & ((col_c[j] - row_c[i]).abs() < NEAR_TOL)
    return i[near], j[near]


def loram_residual_triton_(W: torch.Tensor, coef: float, r: int, kind: str = "dst1", bases=None) -> torch.Tensor:
    """Closed form in the Triton kernel for the regular entries; the few irregular ones from exact phases here,
    rounded once like the rest."""
    from loram_fast.triton_kernels.residual import loram_residual

    W = row_major(W)  # V Uᵀ transposed: the same formula with m and n swapped
    m, n = W.shape
    rows = closed_form_terms(m, r, kind, W.device)
    cols = closed_form_terms(n, r, kind, W.device)
    scale = -coef * closed_form_amp(m, n, kind)
    loram_residual(W, rows.reshape(-1), cols.reshape(-1), scale, NEAR_TOL)
    half = (m + 1) // 2  # the kernel's rows; row m−1−i takes row i's K, mirrored
    i, j = closed_form_irregular(rows[2, :half], cols[2])
    if i.numel():
        k = float(scale) * closed_form_exact(i, j, m, n, r, kind).float()
        W[i, j] = (W[i, j].float() + k).to(W.dtype)
        keep = (m - 1 - i) != i
        mi, mj, mk = m - 1 - i[keep], n - 1 - j[keep], k[keep]
        W[mi, mj] = (W[mi, mj].float() + mk).to(W.dtype)
    return W


dispatch.register("loram_residual_", "triton")(loram_residual_triton_)


@dispatch.register("loram_residual_", "cpu-ext", "cuda")
def loram_residual_native_(W: torch.Tensor, coef: float, r: int, kind: str = "dst1", bases=None) -> torch.Tensor:
    """The closed form in csrc/ (``bases`` unused: no basis matrix is needed)."""
    torch.ops.loram_fast.loram_residual_(W, float(coef), int(r), KINDS.index(kind))
    return W


@dispatch.register("loram_residual_batch_", "cpu-ext", "cuda")
def loram_residual_batch_native_(Ws: list[torch.Tensor], coefs: list[float], r: int, kind: str = "dst1") -> None:
    """The closed form in csrc/ for several weights of one shape: each row of K formed once for all of them."""
    torch.ops.loram_fast.loram_residual_batch_(Ws, [float(c) for c in coefs], int(r), KINDS.index(kind))


@dispatch.on_native_load
def _fake() -> None:
    torch.library.register_fake("loram_fast::lowrank_update_")(lambda W, B, A, alpha: None)
    torch.library.register_fake("loram_fast::loram_residual_")(lambda W, coef, r, kind: None)
    torch.library.register_fake("loram_fast::loram_residual_batch_")(lambda weights, coefs, r, kind: None)


def loram_residual_(W: torch.Tensor, coef: float, r: int, kind: str = "dst1", *, backend=None,
                    bases: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """``W ← W − coef · dst_basis(m, r) @ dst_basis(n, r).T`` in place (W m×n). Returns W.

    ``bases = (dst_basis(m, r), dst_basis(n, r))``, when the caller has them, spares the torch reference rebuilding
    them; the other backends use the closed form and need no basis."""
    _check_loram_residual(W, r, kind, bases)
    _, impl = dispatch.resolve("loram_residual_", W.device, backend)
    return impl(W, float(coef), int(r), kind, bases=bases)


def _check_loram_residual(W: torch.Tensor, r: int, kind: str, bases=None) -> None:
    if W.dim() != 2:
        raise ValueError(f"loram_fast.loram_residual_: W must be 2-D, got shape {tuple(W.shape)}")
    if W.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"loram_fast.loram_residual_: unsupported weight dtype {W.dtype}")
    if kind not in KINDS:
        raise ValueError(f"loram_fast.loram_residual_: unknown kind {kind!r}; valid: {KINDS}")
    if not isinstance(r, int) or not 1 <= r <= min(W.shape):
        raise ValueError(f"loram_fast.loram_residual_: need an integer 1 <= r <= min(m, n), got r={r!r} for W "
                         f"{tuple(W.shape)}")
    if bases is not None:
        V, U = bases
        if V.shape != (W.shape[0], r) or U.shape != (W.shape[1], r):
            raise ValueError(f"loram_fast.loram_residual_: bases of shapes {tuple(V.shape)}, {tuple(U.shape)} "
                             f"do not match W {tuple(W.shape)} at r={r}")


@dataclass
class LowRankResidual:
    """``W ← W − coef · left @ right`` (left out×k, right k×in, fp32)."""

    coef: float
    left: torch.Tensor
    right: torch.Tensor


@dataclass
class BasisResidual:
    """``W ← W − coef · V_r @ U_rᵀ`` with ``V_r = dst_basis(out, r, kind)``, ``U_r = dst_basis(in, r, kind)``
    (LoRAM's residual, ``coef = s·β²``). ``bases = (V_r, U_r)`` when the method built them already."""

    coef: float
    r: int
    kind: str
    bases: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def without_bases(self) -> "BasisResidual":
        return BasisResidual(self.coef, self.r, self.kind)


Residual = Union[LowRankResidual, BasisResidual]


def apply_residual(W: torch.Tensor, residual: Residual, sign: float = -1.0, *, backend=None) -> torch.Tensor:
    """``W ← W + sign · (the residual's product)`` in place on W (out×in, any strides), W's dtype kept:
    ``sign=-1`` writes the residual, ``+1`` adds it back."""
    with torch.no_grad():
        if isinstance(residual, BasisResidual):
            return loram_residual_(W, -sign * residual.coef, residual.r, residual.kind, backend=backend,
                                   bases=residual.bases)
        return lowrank_update_(W, residual.left, residual.right, sign * residual.coef, backend=backend)


def write_cannot_fail(W: torch.Tensor, residual: Residual, *, backend=None) -> bool:
    """True when :func:`apply_residual` of ``residual`` on W passes every check now and then runs on a kernel that,
    once it stores its first entry, cannot stop before the last one (LoRAM's closed form on ``cpu-ext`` or
    ``cuda``). Raises the write's own error for a bad W or residual."""
    if not isinstance(residual, BasisResidual):
        return False
    _check_loram_residual(W, residual.r, residual.kind, residual.bases)
    if not math.isfinite(residual.coef):
        return False
    name, _ = dispatch.resolve("loram_residual_", W.device, backend)
    return name in dispatch.WRITES_CANNOT_FAIL


def apply_residuals(writes: list[tuple[torch.Tensor, Residual]], sign: float = -1.0, *, backend=None,
                    done: Optional[list] = None) -> None:
    """:func:`apply_residual` of every ``(W, residual)`` in order, with the same result, bit for bit. LoRAM residuals
    of weights of one shape, rank and kind (same dtype, device and strides) go to the compiled kernel together, where
    it has a batched form: each row of the closed form is then computed once for all of them (``bench/floor.py``).
    Weights that appear in two groups, or that share memory, are written one call each, in order. ``done``: the
    writes completed so far are appended to it as they complete."""
    done = [] if done is None else done
    groups: dict = {}
    for W, residual in writes:
        key = ((residual.r, residual.kind, tuple(W.shape), W.stride(), W.dtype, W.device)
               if isinstance(residual, BasisResidual) else None)
        groups.setdefault(key if key is not None else ("single", len(groups)), []).append((W, residual))
    owners: dict = {}
    for key, items in groups.items():
        for W, _ in items:
            owners.setdefault(W.data_ptr(), set()).add(key)
    spans = sorted({(byte_span(W), W.data_ptr()) for W, _ in writes if W.numel()})
    shared = any(b[0][0] < a[0][1] and b[1] != a[1] for a, b in zip(spans, spans[1:]))
    if shared or any(len(keys) > 1 for keys in owners.values()):
        groups = {("single", i): [item] for i, item in enumerate(writes)}  # one call each, in order
    with torch.no_grad():
        for key, items in groups.items():
            W0, first = items[0]
            name = (dispatch.resolve("loram_residual_", W0.device, backend)[0]
                    if key[0] != "single" and len(items) > 1 else None)
            if name in dispatch.WRITES_CANNOT_FAIL:
                for W, residual in items:
                    _check_loram_residual(W, residual.r, residual.kind, residual.bases)
                _, impl = dispatch.resolve("loram_residual_batch_", W0.device, name)
                impl([W for W, _ in items], [-sign * res.coef for _, res in items], first.r, first.kind)
                done.extend(items)
            else:
                for W, residual in items:
                    apply_residual(W, residual, sign, backend=backend)
                    done.append((W, residual))
