"""Ops layer: one module per op, each holding the op's plain-torch reference and the registration of every
backend that implements it (``dispatch`` picks one). Never imports peft, methods or anything above it.

| module | ops |
|---|---|
| ``bases`` | ``dst_basis`` |
| ``moments`` | ``weight_moments``, ``weights_moments`` (a list, one compiled call on CPU) |
| ``residual`` | ``lowrank_update_``, ``loram_residual_``, ``apply_residual`` |
| ``matmul`` | ``matmul_f32`` |
| ``norms`` | ``lowrank_row_norms`` (DoRA's magnitude after a residual init) |
| ``rounding`` | ``scale_rounded``, ``form_all`` (fp32 adapters rounded through a weight's dtype) |
| ``orth`` | ``cholesky_qr``, ``orthonormalize`` |
| ``rsvd`` | ``randomized_svd`` (fixed passes, or to a tolerance) |
| ``topsvd`` | ``top_svd`` (exact top-r triplets, full-SVD fallback) |
"""
from .bases import dst_basis, dst_basis_reference
from .dispatch import BACKENDS, backends, register, resolve
from .matmul import matmul_f32, matmul_f32_reference
from .norms import lowrank_row_norms
from .moments import Moments, variance, weight_moments, weight_moments_reference, weights_moments
from .orth import cholesky_qr
from .rounding import scale_rounded
from .rsvd import randomized_svd
from .topsvd import top_svd
from .residual import (BasisResidual, LowRankResidual, apply_residual, loram_residual_, loram_residual_reference_,
                       lowrank_update_, lowrank_update_reference_)

__all__ = [
    "BACKENDS", "backends", "register", "resolve",
    "dst_basis", "dst_basis_reference", "matmul_f32", "matmul_f32_reference",
    "lowrank_row_norms", "Moments", "variance", "weight_moments", "weight_moments_reference", "weights_moments",
    "cholesky_qr", "randomized_svd", "scale_rounded", "top_svd",
    "loram_residual_", "lowrank_update_", "lowrank_update_reference_", "loram_residual_reference_",
    "apply_residual", "BasisResidual", "LowRankResidual",
]
