"""Row norms of a weight plus a low-rank product: DoRA's magnitude vector after a residual init.

``lowrank_row_norms(W, B, A, alpha)`` = ``‖W[i, :] + alpha · (B @ A)[i, :]‖₂`` for every row i, W m×n (any float
dtype, any strides), B m×r, A r×n: what peft's ``DoraLinearLayer.get_weight_norm`` computes, with the sum formed in
the promoted dtype of ``W`` and ``B @ A`` as peft forms it, over row chunks (never an m×n temporary of the whole
weight). Backends: ``torch`` (this reference), ``cpu-ext`` (the product of a row chunk with BLAS, then one fused
pass per row), ``cuda`` (one block per row, the product over the rank per entry) and ``triton``: each forms an
entry with ``kmath::dora_entry`` of csrc/kernel_math.h (peft's roundings: the product and the scaled product to the
adapters' dtype, the sum to the promoted dtype) and sums the squares in fp32 or better.
"""
from __future__ import annotations

import torch

from . import dispatch

_CHUNK_ELEMS = 1 << 20


@dispatch.register("lowrank_row_norms", "torch")
def lowrank_row_norms_reference(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, alpha: float) -> torch.Tensor:
    m, n = W.shape
    product_dtype = torch.promote_types(B.dtype, A.dtype)
    out_dtype = torch.promote_types(W.dtype, product_dtype)
    out = torch.empty(m, dtype=out_dtype, device=W.device)
    step = max(1, _CHUNK_ELEMS // max(n, 1))
    for start in range(0, m, step):
        rows = W[start:start + step] + alpha * (B[start:start + step] @ A)
        out[start:start + step] = torch.linalg.norm(rows, dim=1).to(out_dtype)
    return out


# the dtypes of peft's two steps → the kernels' codes (kmath::kF32, kBF16, kF16)
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _codes(W, B, A):
    """(product dtype, promoted dtype) of peft's ``W + s·(B @ A)``, or None where the kernels do not apply."""
    product = torch.promote_types(B.dtype, A.dtype)
    promoted = torch.promote_types(W.dtype, product)
    return (product, promoted) if product in _CODES and promoted in _CODES else None


def _with_codes(kernel, W, B, A, alpha) -> torch.Tensor:
    """``kernel(W, B, A, alpha, product code, promoted code)`` in the promoted dtype; dtypes the kernels do not
    cover (e.g. fp64 adapters) take the reference's own arithmetic."""
    codes = _codes(W, B, A)
    if codes is None:
        return lowrank_row_norms_reference(W, B, A, alpha)
    return kernel(W, B, A, float(alpha), _CODES[codes[0]], _CODES[codes[1]]).to(codes[1])


@dispatch.register("lowrank_row_norms", "cpu-ext", "cuda")
def lowrank_row_norms_native(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, alpha: float) -> torch.Tensor:
    return _with_codes(torch.ops.loram_fast.lowrank_row_norms, W, B, A, alpha)


def lowrank_row_norms_triton(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, alpha: float) -> torch.Tensor:
    from loram_fast.triton_kernels.norms import lowrank_row_norms as kernel

    return _with_codes(kernel, W, B, A, alpha)


dispatch.register("lowrank_row_norms", "triton")(lowrank_row_norms_triton)


@dispatch.on_native_load
def _fake() -> None:
    torch.library.register_fake("loram_fast::lowrank_row_norms")(
        lambda W, B, A, alpha, product, promoted: W.new_empty(W.shape[0], dtype=torch.float32))


def lowrank_row_norms(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, alpha: float, *, backend=None) -> torch.Tensor:
    """``‖W + alpha·B A‖`` per row (length m), in the promoted dtype of W and B A (see module docstring)."""
    if W.dim() != 2 or B.dim() != 2 or A.dim() != 2 or B.shape[0] != W.shape[0] or A.shape[1] != W.shape[1] \
            or B.shape[1] != A.shape[0]:
        raise ValueError(f"loram_fast.lowrank_row_norms: shapes do not chain: W {tuple(W.shape)}, B {tuple(B.shape)}, "
                         f"A {tuple(A.shape)}")
    _, impl = dispatch.resolve("lowrank_row_norms", W.device, backend)
    return impl(W, B, A, float(alpha))
