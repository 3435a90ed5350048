"""What a method returns for one layer, and the residual write it implies (no peft here)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..ops.residual import lowrank_update_


@dataclass
class LayerInit:
    """Adapters for one layer with weight W (out×in): ``A`` r×in and ``B`` out×r in fp32.

    ``residual=True`` means the base weight becomes ``W − scaling · B @ A``. ``fused(W, sign)``, when set,
    performs ``W += sign · scaling · B @ A`` in place without reading B and A (e.g. LoRAM's basis kernel).
    ``extra`` holds further adapter matrices by module name (e.g. ``{"lora_N": N}`` r×r for the three-matrix
    methods); ``frozen`` names the adapter modules that must not train (e.g. IntTune freezes A and B).
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    residual: bool = True
    fused: Optional[Callable[[torch.Tensor, float], None]] = None
    extra: dict = field(default_factory=dict)
    frozen: tuple = ()

    def apply_residual(self, W: torch.Tensor, sign: float = -1.0, *, rounded_dtype=None, backend=None) -> None:
        """``W ← W + sign · scaling · B @ A`` in place (sign −1 writes the residual, +1 undoes it).

        ``rounded_dtype``: compute the product from A and B rounded to that dtype (LoRA-GA's convention,
        so that ``W_res + s·B·A`` is consistent with the stored adapters); default: unrounded fp32 factors,
        as the references do."""
        if not self.residual:
            return
        if rounded_dtype is None and self.fused is not None:
            self.fused(W, sign)
            return
        A, B, N = self.A, self.B, self.extra.get("lora_N")
        if rounded_dtype is not None:
            A, B = A.to(rounded_dtype).float(), B.to(rounded_dtype).float()
            N = None if N is None else N.to(rounded_dtype).float()
        if N is not None:  # three-matrix methods: the product is B N A
            B = B @ N
        lowrank_update_(W, B, A, sign * self.scaling, backend=backend)


def check_finite_moments(total: torch.Tensor, total_sq: torch.Tensor) -> bool:
    """True when a weight whose fp64 sum and sum of squares are these holds only finite values."""
    return bool(torch.isfinite(total)) and bool(torch.isfinite(total_sq))
