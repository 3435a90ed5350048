"""What a method returns for one layer: data, no closures, no peft.

A method computes, read-only, a :class:`LayerInit` per layer. The writer (``loram_fast/transaction.py``) stores the
adapters and applies the residual it describes; nothing else writes into a model.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

import torch

from ..ops.residual import BasisResidual, LowRankResidual, Residual
from ..ops.rounding import ScaledRounded

__all__ = ["LayerInit", "product_residual", "BasisResidual", "LowRankResidual", "Residual"]


@dataclass
class LayerInit:
    """Adapters for one layer with weight W (out×in), fp32: ``A`` r×in, ``B`` out×r, optionally an r×r ``middle``
    (three-matrix methods: forward ``W x + s·B N A x``). ``residual``: what to subtract from W so that the output is
    unchanged at step 0 (None: W untouched). ``frozen``: adapter modules that must not train (e.g. IntTune's
    ``("lora_A", "lora_B")``). ``owned``: the method guarantees that A, B (and middle) are fresh tensors nothing
    else holds (not views of W, not cached, not in the residual), so the writer may store them without a copy.
    ``new_weight``: a replacement of W (out×in), e.g. LoftQ's dequantised weight; the original is not recoverable
    from the model afterwards (exclusive with ``residual``). ``rank`` / ``lora_alpha``: the adapter is re-created at
    that rank and alpha (peft's ``update_layer``) before A, B are stored; rank 0 replaces the LoRA layer by its base
    layer. A and B may also be given as :class:`~loram_fast.ops.rounding.ScaledRounded` (LoRAM): products the
    writer forms straight into the adapter parameters' memory; :meth:`formed` gives them as tensors."""

    A: Union[torch.Tensor, ScaledRounded]
    B: Union[torch.Tensor, ScaledRounded]
    scaling: float
    middle: Optional[torch.Tensor] = None
    residual: Optional[Residual] = None
    frozen: tuple = ()
    owned: bool = False
    new_weight: Optional[torch.Tensor] = None
    rank: Optional[int] = None  # the adapter's new rank (EVA's redistribution); 0 removes the LoRA layer
    lora_alpha: Optional[float] = None  # with ``rank``: the adapter's lora_alpha at that rank
    # A, B are stored as they are, not first rounded through the base weight's dtype: EVA copies its fp32 components
    # unrounded, LoRAM rounds its own in the pass that forms them
    as_is: bool = False

    def formed(self, backend=None) -> "LayerInit":
        """This init with A and B as tensors (a :class:`ScaledRounded` formed into fresh memory, which the init
        then owns)."""
        if not isinstance(self.A, ScaledRounded) and not isinstance(self.B, ScaledRounded):
            return self
        A, B = (m.tensor(backend) if isinstance(m, ScaledRounded) else m for m in (self.A, self.B))
        return replace(self, A=A, B=B)

    def adapters(self) -> dict:
        """``{peft module name: matrix}`` to store."""
        mats = {"lora_A": self.A, "lora_B": self.B}
        if self.middle is not None:
            mats["lora_N"] = self.middle
        return mats


def product_residual(scaling: float, B: torch.Tensor, A: torch.Tensor, middle: Optional[torch.Tensor] = None,
                     rounded_to: Optional[torch.dtype] = None) -> LowRankResidual:
    """The residual ``s·B (N) A`` of given factors; ``rounded_to``: from the factors rounded to that dtype
    (LoRA-GA's convention: consistent with the adapters as stored)."""
    if rounded_to is not None:
        A, B = A.to(rounded_to).float(), B.to(rounded_to).float()
        middle = None if middle is None else middle.to(rounded_to).float()
    left = B if middle is None else B @ middle
    return LowRankResidual(scaling, left, A)
