"""Three-matrix inits (arXiv 2502.14482; NLoRA repository, its peft fork's ``nlora_init`` / ``slora_init`` and
``inttune.py``): an r×r matrix N between A and B, forward ``W x + s·B N A x``. No peft here.

For W (out×in), rank r:
- NLoRA (reference): ``A = W[:r, :]`` (r×in), ``B = W[:, :r]`` (out×r), ``N = W[:r, :r]``; the base weight is NOT
  offset, so at step 0 the model computes ``W + s·W[:, :r] W[:r, :r] W[:r, :]`` (the reference's behaviour).
  Our extensions, off by default: ``nystrom="pinv"`` uses the classical Nyström core ``N = pinv(W[:r, :r])``
  (W ≈ W[:, :r] pinv(W[:r, :r]) W[:r, :]; the reference has this line commented out), and ``residual=True``
  writes ``W − s·B N A`` so the output is unchanged at step 0.
- SLoRA: A and N Kaiming-uniform (a = √5, nn.Linear's default; torch's global RNG, drawn A then N), B = 0.
- IntTune: the NLoRA init with A and B frozen: only N (r² values per layer) trains.
"""
from __future__ import annotations

import math

import torch

from .common import LayerInit, product_residual

NYSTROM = ("copy", "pinv")


def check_rank(shape, r, **_):
    if r > min(shape):
        return (f"rank r={r} exceeds min(out, in)={min(shape)} of the {shape[0]}×{shape[1]} weight (the reference "
                f"slices W[:r, :r]); use r <= {min(shape)}")
    return None


def nlora_init(W: torch.Tensor, r: int, scaling: float, *, nystrom: str = "copy", residual: bool = False,
               frozen: tuple = ()) -> LayerInit:
    """NLoRA factors from the first r rows and columns of W (out×in)."""
    return nlora_from_blocks(W[:r, :].float(), W[:, :r].float(), scaling, nystrom=nystrom, residual=residual,
                             frozen=frozen)


def nlora_init_sharded(op, r: int, scaling: float, *, nystrom: str = "copy", residual: bool = False,
                       frozen: tuple = ()) -> LayerInit:
    """:func:`nlora_init` of a weight split across ranks (``op``: a
    :class:`~loram_fast.ops.sharded.MatrixOperator`): the first r rows and columns on every rank (one all-reduce of
    their size each)."""
    m, n = op.shape
    return nlora_from_blocks(op.block((0, r), (0, n)), op.block((0, m), (0, r)), scaling, nystrom=nystrom,
                             residual=residual, frozen=frozen)


def nlora_from_blocks(rows: torch.Tensor, cols: torch.Tensor, scaling: float, *, nystrom: str = "copy",
                      residual: bool = False, frozen: tuple = ()) -> LayerInit:
    """NLoRA from ``rows = W[:r, :]`` and ``cols = W[:, :r]`` (fp32)."""
    if nystrom not in NYSTROM:
        raise ValueError(f"loram_fast.nlora: unknown nystrom {nystrom!r}; valid: {NYSTROM}")
    if not bool(torch.isfinite(rows).all()) or not bool(torch.isfinite(cols).all()):
        raise ValueError("loram_fast.nlora: the weight's first r rows or columns hold NaN or Inf values")
    r = rows.shape[0]
    A = rows.clone()
    B = cols.clone()
    core = rows[:, :r]
    N = core.clone() if nystrom == "copy" else torch.linalg.pinv(core.double()).float()
    return LayerInit(A=A, B=B, scaling=scaling, middle=N, frozen=frozen,
                     residual=product_residual(scaling, B, A, N) if residual else None)


def slora_init(W: torch.Tensor, r: int, scaling: float) -> LayerInit:
    """SLoRA: Kaiming-uniform A (r×in) and N (r×r), zero B (out×r); no residual (B N A = 0)."""
    out_f, in_f = W.shape
    A = torch.empty(r, in_f)
    N = torch.empty(r, r)
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    torch.nn.init.kaiming_uniform_(N, a=math.sqrt(5))
    B = torch.zeros(out_f, r)
    return LayerInit(A=A.to(W.device), B=B.to(W.device), scaling=scaling, middle=N.to(W.device))
