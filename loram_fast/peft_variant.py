"""The r×r middle matrix of the three-matrix methods (NLoRA / SLoRA / IntTune) on stock peft LoRA layers.

peft's LoRA-variant seam (``LoraLayer.lora_variant[adapter]``, consulted by ``Linear.forward``, ``merge`` and
``unmerge``) carries it: :func:`add_middle` adds an ``nn.ModuleDict`` ``lora_N`` holding an
``nn.Linear(r, r, bias=False)`` per adapter, lists ``lora_N`` in the layer's ``adapter_layer_names`` (so peft
saves it — its key contains ``lora_`` — moves it, deletes it and sets its ``requires_grad`` with the adapter)
and installs :class:`MiddleMatrixVariant`, whose forward is ``result + s·B(N(A(dropout x)))`` and whose merge
adds ``s·B N A``. Weights that must not train (IntTune's A and B) are declared with peft's own
``frozen_peft_weight_names`` registry, which peft re-applies after every ``set_adapter``.
"""
from __future__ import annotations

import torch
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from ._patch import patch, unpatch
from .registry import parse_init_string


def middle_delta(module, adapter: str) -> torch.Tensor:
    """``s · B N A`` in the stored weight layout (transposed for fan_in_fan_out)."""
    A = module.lora_A[adapter].weight
    B = module.lora_B[adapter].weight
    N = module.lora_N[adapter].weight
    delta = module.scaling[adapter] * (B.float() @ N.float() @ A.float())
    return delta.T if getattr(module, "fan_in_fan_out", False) else delta


class MiddleMatrixVariant(LoraVariant):
    """Forward and merging of ``W + s·B N A`` (the init itself is done by loram_fast before this is used)."""

    def supports_lora_conversion(self) -> bool:
        return True  # get_delta_weight returns s·B N A (patched by install_delta_weight)

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        return None  # loram_fast has written A, B and N already

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + middle_delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += middle_delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - middle_delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        lora_N = module.lora_N[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        return result + lora_B(lora_N(lora_A(dropout(x)))) * module.scaling[active_adapter]


def add_middle(layer, adapter_name: str) -> None:
    """Give ``layer`` an r×r ``lora_N[adapter_name]`` and the middle-matrix variant (idempotent)."""
    if not isinstance(layer.lora_A[adapter_name], nn.Linear):
        raise NotImplementedError(f"loram_fast: the three-matrix methods support LoRA on linear layers; got "
                                  f"{type(layer.get_base_layer()).__name__}")
    if not hasattr(layer, "lora_N"):
        layer.lora_N = nn.ModuleDict()
    if "lora_N" not in layer.adapter_layer_names:
        layer.adapter_layer_names = tuple(layer.adapter_layer_names) + ("lora_N",)
    if adapter_name not in layer.lora_N:
        ref = layer.lora_A[adapter_name].weight
        r = ref.shape[0]
        layer.lora_N[adapter_name] = nn.Linear(r, r, bias=False, device=ref.device, dtype=ref.dtype)
        layer.lora_N[adapter_name].weight.requires_grad_(ref.requires_grad)
    layer.lora_variant[adapter_name] = MiddleMatrixVariant()


def remove_middle(layer, adapter_name: str) -> None:
    """Drop ``lora_N[adapter_name]`` and the middle-matrix variant (a re-init with a two-matrix method)."""
    if adapter_name in getattr(layer, "lora_N", {}):
        del layer.lora_N[adapter_name]
    if hasattr(layer, "lora_N") and not len(layer.lora_N):  # no three-matrix adapter left: as peft made the layer
        del layer.lora_N
        layer.adapter_layer_names = tuple(n for n in layer.adapter_layer_names if n != "lora_N")
    if isinstance(layer.lora_variant.get(adapter_name), MiddleMatrixVariant):
        del layer.lora_variant[adapter_name]


def set_frozen(layer, adapter_name: str, names) -> None:
    """Exactly ``names`` (e.g. lora_A, lora_B) of this adapter stay frozen, also across peft's ``set_adapter``
    (peft's own frozen-weight registry, where this peft has one)."""
    registry = dict(getattr(layer, "frozen_peft_weight_names", None) or {})
    if registry.get(adapter_name, ()) != tuple(names):
        if names:
            registry[adapter_name] = tuple(names)
        else:
            registry.pop(adapter_name, None)
        layer.frozen_peft_weight_names = registry  # peft copies on write too: never mutate the shared default
    for name in names:
        getattr(layer, name)[adapter_name].weight.requires_grad_(False)


# peft's add_weighted_adapter combinations built from get_delta_weight; the others concatenate or mix A and B
# directly and cannot carry N
_DELTA_COMBINATIONS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


def has_middle(layer, adapter: str) -> bool:
    return isinstance(getattr(layer, "lora_variant", {}).get(adapter), MiddleMatrixVariant)


def install_delta_weight() -> None:
    """Make peft's ``Linear.get_delta_weight`` return ``s·B N A`` for three-matrix adapters (what everything in peft
    that reasons about an adapter's delta calls: ``add_weighted_adapter`` with SVD combinations, ``convert_to_lora``,
    ...), and make ``add_weighted_adapter`` refuse the combinations that would silently drop N. Idempotent."""
    from peft.tuners.lora import LoraModel
    from peft.tuners.lora.layer import Linear

    def make_get_delta_weight(original):
        def get_delta_weight(self, adapter, *args, **kwargs):
            if has_middle(self, adapter):
                return middle_delta(self, adapter).to(self.lora_B[adapter].weight.dtype)
            return original(self, adapter, *args, **kwargs)

        return get_delta_weight

    def make_add_weighted_adapter(original):
        def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", *args, **kwargs):
            # peft turns any combination of a single adapter into "linear"
            effective = "linear" if len(adapters) == 1 else combination_type
            if effective not in _DELTA_COMBINATIONS and any(
                    has_middle(m, a) for m in self.model.modules() for a in adapters):
                raise NotImplementedError(f"loram_fast: combination_type={effective!r} (peft uses 'linear' for a "
                                          "single adapter) combines lora_A and lora_B directly and would drop the r×r "
                                          "middle matrix of a three-matrix adapter; combine two or more adapters with "
                                          f"one of {', '.join(_DELTA_COMBINATIONS)}")
            # peft builds the new adapter's config from the first source adapter's, init string included: the new
            # adapter is a plain LoRA whose factors peft computes, so it must not run the sources' init (no second
            # residual, no middle matrix)
            configs = [self.peft_config[a] for a in adapters if a in self.peft_config]
            saved = [c.init_lora_weights for c in configs]
            try:
                for c in configs:
                    if parse_init_string(c.init_lora_weights) is not None:
                        c.init_lora_weights = True
                return original(self, adapters, weights, adapter_name, combination_type, *args, **kwargs)
            finally:
                for c, value in zip(configs, saved):
                    c.init_lora_weights = value

        return add_weighted_adapter

    patch(Linear, "get_delta_weight", make_get_delta_weight)
    patch(LoraModel, "add_weighted_adapter", make_add_weighted_adapter)


def uninstall_delta_weight() -> None:
    from peft.tuners.lora import LoraModel
    from peft.tuners.lora.layer import Linear

    unpatch(Linear, "get_delta_weight")
    unpatch(LoraModel, "add_weighted_adapter")
