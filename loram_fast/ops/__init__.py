"""Ops layer: each op has a plain-torch reference and dispatches to the best backend (see ``dispatch``).
Never imports peft."""
from .bases import dst_basis, dst_basis_batched, dst_basis_reference, scaled_basis, scaled_basis_reference
from .dispatch import BACKENDS, backends, register, resolve
from .matmul import matmul_f32, matmul_f32_reference
from .moments import Moments, variance, weight_moments, weight_moments_reference
from .rsvd import cholesky_qr, randomized_svd
from .residual import (BasisResidual, LowRankResidual, apply_residual, loram_residual_, loram_residual_reference_,
                       lowrank_update_, lowrank_update_reference_)

__all__ = [
    "BACKENDS", "backends", "register", "resolve",
    "dst_basis", "dst_basis_batched", "dst_basis_reference", "scaled_basis", "scaled_basis_reference", "matmul_f32", "matmul_f32_reference",
    "Moments", "variance", "weight_moments", "weight_moments_reference",
    "cholesky_qr", "randomized_svd",
    "loram_residual_", "lowrank_update_", "lowrank_update_reference_", "loram_residual_reference_",
    "apply_residual", "BasisResidual", "LowRankResidual",
]
