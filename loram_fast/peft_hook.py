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


def install() -> None:
    """Patch ``peft.tuners.lora.LoraLayer.reset_lora_parameters`` (idempotent)."""
    from peft.tuners.lora import LoraLayer

    if installed():
        return
    original = LoraLayer.reset_lora_parameters

    @functools.wraps(original)
    def reset_lora_parameters(self, adapter_name, init_lora_weights, *args, **kwargs):
        from .registry import is_registered

        if is_registered(init_lora_weights):
            from .api import init_layer

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


def uninstall() -> None:
    """Restore peft's original ``reset_lora_parameters``."""
    from peft.tuners.lora import LoraLayer

    if installed():
        LoraLayer.reset_lora_parameters = LoraLayer.reset_lora_parameters.__wrapped_original__
