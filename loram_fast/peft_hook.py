"""The one seam into peft: registered method names as ``LoraConfig(init_lora_weights=...)``.

peft's ``LoraLayer.update_layer`` handles its own init strings ("pissa", "olora", "loftq", ...) and hands
any other truthy value to ``LoraLayer.reset_lora_parameters``, which raises "Unknown initialization" for
strings it does not know. We wrap that one method: a string registered in ``loram_fast`` (a name, or the
``loram_fast:<name>[...]`` form that ``init_model`` records) goes to :func:`init_layer`; everything else goes to
peft's original, untouched. Installing twice is a
no-op. This also makes ``PeftModel.from_pretrained`` of an adapter whose config says ``"loram"`` re-create
the residual on the original base (peft runs the init, then loads the trained A and B over it).
"""
from __future__ import annotations

import contextvars
import functools
import logging

from .registry import get_method, parse_init_string

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
    from .peft_variant import install_delta_weight

    install_delta_weight()
    _track_injected_model()
    if installed():
        return
    original = LoraLayer.reset_lora_parameters

    @functools.wraps(original)
    def reset_lora_parameters(self, adapter_name, init_lora_weights, *args, **kwargs):
        parsed = parse_init_string(init_lora_weights)
        if parsed is None:
            return original(self, adapter_name, init_lora_weights, *args, **kwargs)
        name, options, recorded = parsed
        spec = get_method(name)
        if spec.needs_data:
            if spec.writes_residual(options) or name == "lora_ga":
                raise ValueError(f"loram_fast: adapter {adapter_name!r} was initialised by {name!r}, whose residual in "
                                 "the base weight came from training data and cannot be rebuilt here. Save it as a "
                                 "plain LoRA instead (save_pretrained(..., path_initial_model_for_weight_conversion="
                                 "...), see README 'Save, reload, convert'), or save the base model with its residual")
            if not recorded:
                # no data in a LoraConfig: peft's default init, as peft does for its own "lora_ga" without data
                _warn_once(name, adapter_name)
            # a recorded lora_one adapter (W untouched) needs only its modules: the saved A and B are loaded next
            return original(self, adapter_name, True, *args, **kwargs)
        if self.get_base_layer().weight.device.type == "meta":
            # low_cpu_mem_usage: peft creates the layers without weights; nothing to initialise from
            logger.debug("loram_fast: skipping %s init of a layer on the meta device", name)
            return None
        return init_layer(self, adapter_name, name, **options)

    setattr(reset_lora_parameters, _MARK, True)
    reset_lora_parameters.__wrapped_original__ = original
    LoraLayer.reset_lora_parameters = reset_lora_parameters
    logger.debug("loram_fast: peft hook installed")


_WARNED: set = set()
# the model peft is injecting adapters into (set around BaseTuner.inject_adapter): lets the hook see weights that
# the layer's base weight shares with other parameters (tied embeddings)
_INJECTING: contextvars.ContextVar = contextvars.ContextVar("loram_fast_injecting", default=None)


def _track_injected_model() -> None:
    from peft.tuners.tuners_utils import BaseTuner

    if getattr(BaseTuner.inject_adapter, _MARK, False):
        return
    original = BaseTuner.inject_adapter

    @functools.wraps(original)
    def inject_adapter(self, model, *args, **kwargs):
        token = _INJECTING.set({"model": model, "storages": None})
        try:
            return original(self, model, *args, **kwargs)
        finally:
            _INJECTING.reset(token)

    setattr(inject_adapter, _MARK, True)
    inject_adapter.__wrapped_original__ = original
    BaseTuner.inject_adapter = inject_adapter


def _tied_users(layer) -> list[str]:
    """Other parameters of the model being injected that share ``layer``'s base weight storage."""
    state = _INJECTING.get()
    W = layer.get_base_layer().weight
    if state is None or W.device.type == "meta":
        return []
    if state["storages"] is None:
        storages: dict = {}
        for name, p in state["model"].named_parameters(remove_duplicate=False):
            if p.device.type != "meta":
                storages.setdefault(p.untyped_storage().data_ptr(), []).append((name, p))
        state["storages"] = storages
    group = state["storages"].get(W.untyped_storage().data_ptr(), [])
    # the weight under its own name is one entry; any second name (the same tensor tied elsewhere, or another
    # tensor on its storage) is another user
    return [name for name, _ in group] if len(group) > 1 else []


def _warn_once(name: str, adapter_name: str) -> None:
    """One warning per method and adapter, not one per layer."""
    if (name, adapter_name) in _WARNED:
        return
    _WARNED.add((name, adapter_name))
    logger.warning("loram_fast: %r needs data; LoraConfig gives none, so adapter %r gets peft's default init. Use "
                   "loram_fast.init_model(model, %r, dataloader=...) to initialise it.", name, adapter_name, name)


def init_layer(layer, adapter_name: str, method: str, **options) -> None:
    """Initialise one peft LoRA layer in place (what the hook calls from peft's ``update_layer``): validated,
    computed and written in one transaction, like ``init_model`` for a single layer."""
    from . import options as opt
    from .compute import compute_and_write
    from .targets import make_target, validate
    from .transaction import Transaction

    spec = get_method(method)
    rounded = bool(options.pop("rounded_residual", False))
    options = opt.validate(options, spec.options, f"method {spec.name!r}")
    target = make_target(layer, adapter_name)
    validate(spec, target, adapter_name, options, in_init_model=False)
    others = [f"adapter {a!r}" for a in layer.r if a != adapter_name]
    if spec.writes_residual(options):
        tied = _tied_users(layer)
        others += [f"the tied parameters {', '.join(map(repr, tied))}"] if tied else []
    if others and spec.writes_residual(options):
        raise ValueError(f"loram_fast: method {spec.name!r} writes a residual into the base weight of "
                         f"{target.describe()}, which {', '.join(others)} also use(s): their "
                         "output would change. Use a separate copy of the base model, leave the module out of "
                         "target_modules, or init_model(..., allow_shared_base=True) to accept it")
    compute_and_write(spec, [target], options, Transaction(adapter_name, rounded_residual=rounded), progress=False)


def _take_over(LoraLayer) -> None:
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

    from peft.tuners.tuners_utils import BaseTuner

    for owner, attr in ((LoraLayer, "reset_lora_parameters"), (LoraLayer, "pissa_init"), (LoraLayer, "olora_init"),
                        (BaseTuner, "inject_adapter")):
        fn = getattr(owner, attr)
        if getattr(fn, _MARK, False):
            setattr(owner, attr, fn.__wrapped_original__)
    from .peft_variant import uninstall_delta_weight

    uninstall_delta_weight()
