"""In-place residual updates of a weight, in the weight's own dtype.

- ``lowrank_update_(W, B, A, alpha)``: ``W ← W + alpha · B @ A`` for W m×n (fp32/fp16/bf16, any strides,
  e.g. the transposed view of a Conv1D weight), B m×r and A r×n. Each tile is computed in fp32 and
  rounded once to W's dtype; no m×n fp32 temporary of the whole weight is made.
- ``apply_residual(W, residual, sign)``: one of the two residual descriptions below, applied in place
  (``sign=-1`` writes it, ``+1`` adds it back): the one place that turns a method's residual into a write.
- ``loram_residual_(W, coef, r, kind)``: ``W ← W − coef · V_r @ U_r`` with ``V_r = dst_basis(m, r)`` and
  ``U_r = dst_basis(n, r).T``: the LoRAM residual with ``coef = scaling · β²``. Compiled backends
  generate the basis tiles in the kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import dispatch
from .bases import dst_basis

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


def loram_residual_(W: torch.Tensor, coef: float, r: int, kind: str = "dst1", *, backend=None,
                    bases: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """``W ← W − coef · dst_basis(m, r) @ dst_basis(n, r).T`` in place (W m×n). Returns W.

    ``bases = (dst_basis(m, r), dst_basis(n, r))``, when the caller has them, spares a backend that needs the
    bases as matrices rebuilding them (the torch reference); the Triton kernel generates its basis tiles itself."""
    if W.dim() != 2:
        raise ValueError(f"loram_fast.loram_residual_: W must be 2-D, got shape {tuple(W.shape)}")
    if W.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"loram_fast.loram_residual_: unsupported weight dtype {W.dtype}")
    if bases is not None:
        V, U = bases
        if V.shape != (W.shape[0], r) or U.shape != (W.shape[1], r):
            raise ValueError(f"loram_fast.loram_residual_: bases of shapes {tuple(V.shape)}, {tuple(U.shape)} "
                             f"do not match W {tuple(W.shape)} at r={r}")
    _, impl = dispatch.resolve("loram_residual_", W.device, backend)
    return impl(W, float(coef), int(r), kind, bases=bases)

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
