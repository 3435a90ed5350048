"""The one seam into peft: registered method names as ``LoraConfig(init_lora_weights=...)``.

peft's ``LoraLayer.update_layer`` handles its own init strings ("pissa", "olora", "loftq", ...) and hands
any other truthy value to ``LoraLayer.reset_lora_parameters``, which raises "Unknown initialization" for
strings it does not know. We wrap that one method: a string registered in ``loram_fast`` goes to
``loram_fast.api.init_layer``; everything else goes to peft's original, untouched. Installing twice is a
no-op. This also makes ``PeftModel.from_pretrained`` of an adapter whose config says ``"loram"`` re-create
the residual on the original base (peft runs the init, then loads the trained A and B over it).
"""
from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)

_MARK = "_loram_fast_hook"


def installed() -> bool:
    from peft.tuners.lora import LoraLayer

    return getattr(LoraLayer.reset_lora_parameters, _MARK, False)


def install(take_over_peft_inits: bool = False) -> None:
    """Patch ``peft.tuners.lora.LoraLayer.reset_lora_parameters`` (idempotent).

    ``take_over_peft_inits=True`` also routes peft's own ``"pissa"``, ``"pissa_niter_N"`` and ``"olora"`` through
    loram_fast (same results; batched exact SVD, our randomized SVD with oversampling, panel QR). Off by
    default: peft's own methods stay peft's. Quantized (bitsandbytes) weights still go to peft's code."""
    from peft.tuners.lora import LoraLayer

    if take_over_peft_inits:
        _take_over(LoraLayer)
    if installed():
        return
    original = LoraLayer.reset_lora_parameters

    @functools.wraps(original)
    def reset_lora_parameters(self, adapter_name, init_lora_weights, *args, **kwargs):
        from .registry import get_method, is_registered

        if is_registered(init_lora_weights):
            from .api import init_layer

            if get_method(init_lora_weights).needs_data:
                # no data here (e.g. PeftModel.from_pretrained, whose saved weights overwrite the init anyway):
                # peft's default init, as peft does for its own "lora_ga"
                logger.warning("loram_fast: %r needs data; LoraConfig gives none, so the layer gets peft's default "
                               "init. Use loram_fast.init_model(model, %r, dataloader=...) to initialise it.",
                               init_lora_weights, init_lora_weights)
                return original(self, adapter_name, True, *args, **kwargs)

            weight = self.get_base_layer().weight
            if weight.device.type == "meta":
                # low_cpu_mem_usage: peft creates the layers without weights; nothing to initialise from
                logger.debug("loram_fast: skipping %s init of a layer on the meta device", init_lora_weights)
                return None
            return init_layer(self, adapter_name, init_lora_weights)
        return original(self, adapter_name, init_lora_weights, *args, **kwargs)

    setattr(reset_lora_parameters, _MARK, True)
    reset_lora_parameters.__wrapped_original__ = original
    LoraLayer.reset_lora_parameters = reset_lora_parameters
    logger.debug("loram_fast: peft hook installed")


def _take_over(LoraLayer) -> None:
    from .api import init_layer

    def route(attr: str, method_of):
        original = getattr(LoraLayer, attr)
        if getattr(original, _MARK, False):
            return

        @functools.wraps(original)
        def wrapper(self, adapter_name, *args, **kwargs):
            weight = self.get_base_layer().weight
            if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16) or weight.device.type == "meta":
                return original(self, adapter_name, *args, **kwargs)
            return init_layer(self, adapter_name, method_of(*args))

        setattr(wrapper, _MARK, True)
        wrapper.__wrapped_original__ = original
        setattr(LoraLayer, attr, wrapper)

    import torch

    route("pissa_init", lambda init_lora_weights: init_lora_weights)
    route("olora_init", lambda: "olora")


def uninstall() -> None:
    """Restore peft's original methods."""
    from peft.tuners.lora import LoraLayer

    for attr in ("reset_lora_parameters", "pissa_init", "olora_init"):
        fn = getattr(LoraLayer, attr)
        if getattr(fn, _MARK, False):
            setattr(LoraLayer, attr, fn.__wrapped_original__)


def ensure_adapter_modules(layer, adapter_name: str, extra: dict) -> None:
    """Make sure ``layer`` holds the extra adapter modules named in ``extra`` (e.g. ``lora_N``) for
    ``adapter_name``. Three-matrix methods provide the modules through their peft LoRA variant."""
    if "lora_N" in extra:
        from .peft_variant import ensure_middle

        ensure_middle(layer, adapter_name)
    missing = [name for name in extra if adapter_name not in getattr(layer, name, {})]
    if missing:
        raise NotImplementedError(f"loram_fast: the LoRA layer has no {', '.join(missing)} for adapter "
                                  f"{adapter_name!r}; create the adapter with the method's init_lora_weights")
