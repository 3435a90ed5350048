"""Intruder-dimension reduction (peft's ``reduce_intruder_dimension``, arXiv 2410.21228) without three full SVDs per
layer.

peft, per LoRA layer with base weight W and delta ΔW = s·B A (stored orientation):
    U_base = svd(W).U;  U_m, S_m, V_m = svd(W + ΔW)
    cos_k = max_j |u_m,kᵀ u_base,j| for the top_k k;  intruders: cos_k < threshold_epsilon
    ΔW' = ΔW + (λ − 1)·B_int A_int  with  B_int = U_m[:, I]·√S_m[I],  A_int = √S_m[I]·V_m[I]
    B_new, A_new: top-r SVD of ΔW'/s split as √S

Here: svd(W) stays a full SVD (the max runs over every base direction); only the top_k triplets of W + ΔW are
computed (``top_svd``: exact to its residual test, full-SVD fallback); and ΔW'/s = [B, (λ−1)/s·B_int]·[A; A_int]
has rank ≤ r + |I|, so its SVD comes from two thin QRs and one small SVD. Deliberate differences: ΔW'/s is formed
from the factors, not as (W + ΔW) − W in W's dtype (for bf16 weights peft's difference carries the rounding noise
of W + ΔW); GPT-2 ``Conv1D`` (``fan_in_fan_out``) layers work in the out×in orientation (peft runs the SVDs on
the stored in×out layout and stores in×r factors into an out×r ``lora_B``); embeddings raise
``NotImplementedError``; messages go to ``logging`` unless ``logging_sink`` is given.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from .ops.topsvd import top_svd
from .targets import find_lora_layers

logger = logging.getLogger(__name__)


def _lowrank_svd(left: torch.Tensor, right: torch.Tensor):
    """SVD of ``left @ right`` (m×k, k×n, k small) from thin QRs: (U m×k, S k, Vh k×n), fp32."""
    Ql, Rl = torch.linalg.qr(left)
    Qr, Rr = torch.linalg.qr(right.T)
    Uc, S, Vhc = torch.linalg.svd(Rl @ Rr.T)
    return Ql @ Uc, S, Vhc @ Qr.T


@torch.no_grad()
def reduce_intruder_dimension(peft_model, old_adapter_name: str = "default", new_adapter_name: str = "intruder_reduced",
                              top_k: int = 10, threshold_epsilon: float = 0.5, mitigation_lambda: float = 0.75,
                              logging_sink: Optional[Callable[[str], None]] = None):
    """peft's ``reduce_intruder_dimension`` (same parameters and defaults, except ``logging_sink``: None logs through
    ``logging``): adds ``new_adapter_name`` holding the mitigated adapter of ``old_adapter_name`` and activates it.
    Returns the model."""
    sink = logging_sink or (lambda msg: logger.info("%s", msg))
    if getattr(peft_model, "peft_type", None) != "LORA":  # peft's PeftType is a str enum
        raise ValueError("loram_fast.reduce_intruder_dimension: the model is not a peft LoRA model")
    targets = find_lora_layers(peft_model, old_adapter_name)
    if not targets:
        raise ValueError(f"loram_fast.reduce_intruder_dimension: no LoRA layer holds adapter {old_adapter_name!r}")
    for t in targets:
        if old_adapter_name not in t.layer.lora_A:
            raise NotImplementedError(f"loram_fast.reduce_intruder_dimension: {t.name} is an embedding LoRA layer; "
                                      "only linear layers are supported")
        if t.sharding is not None:
            raise NotImplementedError(f"loram_fast.reduce_intruder_dimension: the base weight of {t.name} is split "
                                      "across ranks (DTensor); run it on the unsharded model")
        if getattr(t.layer, "lora_N", None) is not None and old_adapter_name in t.layer.lora_N:
            raise NotImplementedError(f"loram_fast.reduce_intruder_dimension: {t.name} has an r×r middle matrix; "
                                      "only two-matrix adapters are supported")
    if not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"loram_fast.reduce_intruder_dimension: top_k must be a positive integer, got {top_k!r}")
    peft_model.add_adapter(new_adapter_name, peft_model.peft_config[old_adapter_name])
    for t in targets:
        layer, s = t.layer, t.scaling
        A = layer.lora_A[old_adapter_name].weight
        B = layer.lora_B[old_adapter_name].weight
        W = t.weight_view()  # out×in
        dtype = W.dtype
        Af, Bf = A.float(), B.float()
        merged = W.float() + s * (Bf @ Af)
        U_base = torch.linalg.svd(W.float(), full_matrices=False).U
        k = min(top_k, min(merged.shape))
        U_m, S_m, Vh_m, _, _ = top_svd(merged, k)
        del merged
        cos = (U_m.T @ U_base).abs().max(dim=1).values
        idx = torch.where(cos[:k] < threshold_epsilon)[0]
        new_A = layer.lora_A[new_adapter_name].weight
        new_B = layer.lora_B[new_adapter_name].weight
        if idx.numel() == 0:
            sink(f"{t.name}: No intruders")
            new_A.data = A.detach().clone()
            new_B.data = B.detach().clone()
            continue
        sink(f"{t.name}: Intruders: {idx.numel()}")
        root = S_m[idx].sqrt()
        B_int = U_m[:, idx] * root
        A_int = root[:, None] * Vh_m[idx]
        left = torch.cat([Bf, ((mitigation_lambda - 1.0) / s) * B_int], dim=1)
        right = torch.cat([Af, A_int], dim=0)
        U, S, Vh = _lowrank_svd(left, right)
        r = t.r
        root = S[:r].sqrt()
        new_B.data = (U[:, :r] * root).to(dtype).to(new_B.dtype)
        new_A.data = (root[:, None] * Vh[:r]).to(dtype).to(new_A.dtype)
    sink(f"Enabling new adapter {new_adapter_name}")
    peft_model.set_adapter(new_adapter_name)
    return peft_model
