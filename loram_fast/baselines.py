"""Baseline code paths the benchmarks and the demo compare against (not used by init_model).

- ``reference_loram_model``: the LoRAM reference applied layer by layer (``methods.loram.loram_reference``,
  a transcription of its ``loram_init`` minus the print).
- ``peft_init_model``: peft's own per-layer init (``pissa``, ``pissa_niter_N``, ``olora``) on an existing model.
"""
from __future__ import annotations

import torch

from .methods.loram import loram_reference


def _lora_layers(model, adapter: str):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and adapter in m.r]


@torch.no_grad()
def reference_loram_model(model, adapter: str = "default"):
    """Every LoRA layer re-initialised by the LoRAM reference math (materialises everything, fp32)."""
    for layer in _lora_layers(model, adapter):
        base = layer.get_base_layer()
        A, B, W_res = loram_reference(base.weight, layer.r[adapter], layer.scaling[adapter])
        layer.lora_A[adapter].weight.data = A.to(base.weight.dtype).to(layer.lora_A[adapter].weight.dtype)
        layer.lora_B[adapter].weight.data = B.to(base.weight.dtype).to(layer.lora_B[adapter].weight.dtype)
        base.weight.data = W_res
    return model


@torch.no_grad()
def peft_init_model(model, method: str, adapter: str = "default"):
    """peft's own ``pissa_init`` / ``olora_init`` on every LoRA layer (the code ``LoraConfig`` would run)."""
    if not (method.startswith("pissa") or method == "olora"):
        raise ValueError(f"loram_fast.baselines: peft has no per-layer init {method!r} here")
    for layer in _lora_layers(model, adapter):
        # peft's own function, also when loram_fast.peft_hook took these names over
        attr = "pissa_init" if method.startswith("pissa") else "olora_init"
        fn = getattr(type(layer), attr)
        fn = getattr(fn, "__wrapped_original__", fn)
        fn(layer, adapter, method) if attr == "pissa_init" else fn(layer, adapter)
    return model
