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
import dataclasses
import logging

import torch

from ._patch import is_patched, patch, unpatch
from .ops.threads import fair_share
from .registry import get_method, parse_init_string
from .targets import parameters_by_storage

logger = logging.getLogger(__name__)

def installed() -> bool:
    from peft.tuners.lora import LoraLayer

    return is_patched(LoraLayer, "reset_lora_parameters")


def install(take_over_peft_inits: bool = False) -> None:
    """Patch ``peft.tuners.lora.LoraLayer.reset_lora_parameters`` (idempotent).

    ``take_over_peft_inits=True`` also routes peft's own ``"pissa"``, ``"pissa_niter_N"``, ``"olora"``, ``"mica"``,
    ``"orthogonal"``, ``"loftq"`` and ``"corda"`` through loram_fast (same results; exact PiSSA without a full SVD, our randomized
    SVD with oversampling, panel QR; MiCA and orthogonal as peft computes them; LoftQ on any device with
    bitsandbytes' quantisers, no bitsandbytes needed; CorDA from the eigens of peft's ``preprocess_corda``; in one
    transaction), and peft's ``initialize_lora_eva_weights`` through ``init_model(model, "eva")`` (its exported
    names are patched: call it as ``peft.initialize_lora_eva_weights`` or import it after installing). Off by
    default: peft's own methods stay peft's. Quantized (bitsandbytes) weights still go to peft's code."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTuner

    from .peft_variant import install_delta_weight

    if take_over_peft_inits:
        _take_over(LoraLayer)
    install_delta_weight()
    patch(BaseTuner, "inject_adapter", _make_inject_adapter)
    patch(LoraLayer, "reset_lora_parameters", _make_reset_lora_parameters)
    logger.debug("loram_fast: peft hook installed")


def _make_reset_lora_parameters(original):
    def reset_lora_parameters(self, adapter_name, init_lora_weights, *args, **kwargs):
        parsed = parse_init_string(init_lora_weights)
        if parsed is None:
            return original(self, adapter_name, init_lora_weights, *args, **kwargs)
        name, options, recorded = parsed
        spec = get_method(name)
        if spec.needs_data:
            if spec.writes_residual(options):
                raise ValueError(f"loram_fast: adapter {adapter_name!r} was initialised by {name!r}, whose residual in "
                                 "the base weight came from training data and cannot be rebuilt here. Onto the original "
                                 "base: save it converted to plain LoRA (save_pretrained(..., "
                                 "path_initial_model_for_weight_conversion=...)). Onto a base that already holds the "
                                 "residual: PeftModel.from_pretrained(base, path, config=loram_fast.peft_hook."
                                 "residual_base_config(path)). See README 'Save, reload, convert'")
            if not recorded:
                # no data in a LoraConfig: peft's default init, as peft does for its own "lora_ga" without data
                _warn_once(name, adapter_name)
            # a recorded lora_one adapter (W untouched) needs only its modules: the saved A and B are loaded next
            return original(self, adapter_name, True, *args, **kwargs)
        if self.get_base_layer().weight.device.type == "meta":
            # low_cpu_mem_usage: peft creates the layers without weights; nothing to initialise from
            logger.debug("loram_fast: skipping %s init of a layer on the meta device", name)
            return None
        state = _INJECTING.get()
        try:
            if state is not None and name in BATCHED_IN_INJECTION and _batchable(self, adapter_name):
                # checked now (errors name this layer, as from update_layer), computed and written with the
                # injection's other layers when peft's inject_adapter has created them all (_init_batched)
                state["batched"].append((self, adapter_name, *_checked(self, adapter_name, name, options)))
                return None
            return init_layer(self, adapter_name, name, **options)
        except BaseException:
            _zero_b(self, adapter_name)
            raise

    return reset_lora_parameters


def _zero_b(layer, adapter_name: str) -> None:
    """B = 0 for an adapter whose init failed (the model's weights are as before it): peft's update_layer just created
    the adapter with the random B of its module's constructor, and peft's own init, which zeroes B, was ours to
    replace. The layer then adds nothing to its base, as after peft's default init, in the model that peft has
    already changed in place."""
    with torch.no_grad():
        if adapter_name in getattr(layer, "lora_B", {}):
            layer.lora_B[adapter_name].weight.zero_()
        if adapter_name in getattr(layer, "lora_embedding_B", {}):
            layer.lora_embedding_B[adapter_name].zero_()


# (method, adapter) pairs warned about during the current injection: one warning per adapter of one model
_WARNED: set = set()
# the model peft is injecting adapters into (set around BaseTuner.inject_adapter), with its parameters grouped by
# storage on first use: lets the hook see weights that a layer's base weight shares (tied embeddings)
_INJECTING: contextvars.ContextVar = contextvars.ContextVar("loram_fast_injecting", default=None)


# methods the hook initialises all at once at the end of an injection, like ``init_model``: the LoRAM family draws
# no random numbers (so the order of the inits changes nothing), reads only its own weight, and writes its residuals
# batched by weight shape (``bench/floor.py``) with kernels that keep no weight copy; a failure rolls back every
# layer, the base weights bit for bit. Other methods stay one layer at a time: their residual writes keep a copy of
# each weight for the rollback, which for a whole injection at once would be a copy of every targeted weight.
BATCHED_IN_INJECTION = ("loram", "loram_dct")
# methods whose layer-by-layer inits within one injection share the methods' cache, as one init_model call's layers
# do: small, bounded entries (LoRAM's bases, one per size; MiLoRA's and MiCA's memo of the shapes whose iteration
# gave up, so later weights of such a shape skip the attempt). Not CorDA, whose cache holds each layer's covariance
# inverse (kept for the whole injection, one per layer)
CACHED_IN_INJECTION = ("loram", "loram_dct", "milora", "mica")


def _make_inject_adapter(original):
    def inject_adapter(self, model, *args, **kwargs):
        state = {"model": model, "storages": None, "batched": [], "cache": {}}
        token = _INJECTING.set(state)
        _WARNED.clear()
        try:
            result = original(self, model, *args, **kwargs)
        finally:
            _INJECTING.reset(token)
        if state["batched"]:  # (not reached when peft raised: nothing of ours was written then)
            _init_batched(model, state["batched"])
        return result

    return inject_adapter


def _batchable(layer, adapter_name: str) -> bool:
    """Whether the layer's init may wait for the end of the injection: no LoRA variant (DoRA reads the initialised
    weight and adapters right after the init, in update_layer); a plain tensor weight (not a DTensor, not
    partitioned by DeepSpeed ZeRO-3, whose whole weight exists only while gathered); and a compiled residual kernel
    that keeps no copy of the weight (on the torch or Triton backends every write keeps one until the transaction
    ends: batched, a copy of every targeted weight at once)."""
    from peft.utils.integrations import check_deepspeed_zero3_enabled

    from .ops import dispatch
    from .ops.sharded import local_tensor

    weight = layer.get_base_layer().weight
    return (adapter_name not in getattr(layer, "lora_variant", {}) and not layer.use_dora.get(adapter_name, False)
            and local_tensor(weight) is weight and not hasattr(weight, "ds_id")
            and not check_deepspeed_zero3_enabled()
            and dispatch.resolve("loram_residual_", weight.device, None)[0] in dispatch.WRITES_CANNOT_FAIL)


def _init_batched(model, batched: list) -> None:
    """Initialise the layers the hook held back during an injection, in one transaction per (adapter, method,
    options), in module order: what ``init_model`` does, restricted to those layers. A layer peft created but did
    not keep in the model is left alone; a layer listed twice gets its last request."""
    from .compute import compute_and_write
    from .transaction import Transaction

    found = {id(module): (i, name) for i, (name, module) in enumerate(model.named_modules())}
    last = {(id(item[0]), item[1]): item for item in batched}  # one request per (layer, adapter): the last
    groups: dict = {}
    for layer, adapter, spec, options, rounded, checked in sorted(last.values(), key=lambda item: found.get(
            id(item[0]), (-1, ""))[0]):
        if id(layer) not in found:
            logger.debug("loram_fast: a layer peft created during the injection is not in the model; not initialised")
            continue
        key = (adapter, spec.name, rounded, repr(sorted(options.items())))
        target = dataclasses.replace(checked, name=found[id(layer)][1])  # the target the checks made, named
        groups.setdefault(key, (adapter, spec, options, rounded, []))[4].append(target)
    storages = parameters_by_storage(model)
    shared = {ptr for ptr, group in storages.items() if len(group) > 1}
    for adapter, spec, options, rounded, targets in groups.values():
        try:
            with fair_share():
                compute_and_write(spec, targets, options, Transaction(adapter, rounded_residual=rounded,
                                                                      shared_storages=shared), progress=False)
        except BaseException:
            # the transaction left every base weight as it was; peft has already put these layers into the model
            # (in place, also into the model the caller passed to get_peft_model)
            for t in targets:
                _zero_b(t.layer, adapter)
            raise


def _storages() -> dict:
    """The parameters of the model being injected, grouped by storage (empty outside an injection)."""
    state = _INJECTING.get()
    if state is None:
        return {}
    if state["storages"] is None:
        state["storages"] = parameters_by_storage(state["model"])
    return state["storages"]


def residual_base_config(path: str, **kwargs):
    """The adapter's saved ``LoraConfig`` with ``init_lora_weights=True``: for loading an adapter whose residual came
    from data (``lora_ga``) onto a base model that already holds that residual (you saved the base after the init),
    where nothing is to be rebuilt. ``kwargs`` go to ``LoraConfig.from_pretrained``."""
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(path, **kwargs)
    config.init_lora_weights = True
    return config


def _warn_once(name: str, adapter_name: str) -> None:
    """One warning per method and adapter of the model being injected, not one per layer."""
    if (name, adapter_name) in _WARNED:
        return
    _WARNED.add((name, adapter_name))
    logger.warning("loram_fast: %r needs data; LoraConfig gives none, so adapter %r gets peft's default init. Use "
                   "loram_fast.init_model(model, %r, dataloader=...) to initialise it.", name, adapter_name, name)


def init_layer(layer, adapter_name: str, method: str, **options) -> None:
    """Initialise one peft LoRA layer in place (what the hook calls from peft's ``update_layer``): validated,
    computed and written in one transaction, like ``init_model`` for a single layer."""
    from .compute import compute_and_write
    from .transaction import Transaction

    with _gathered(layer):  # under DeepSpeed ZeRO-3 the whole weight exists only inside this block
        spec, options, rounded, target = _checked(layer, adapter_name, method, options)
        # the adapter parameters peft's update_layer just created are fresh: only a storage the model already held
        # under two names can be shared
        shared = {ptr for ptr, names in _storages().items() if len(names) > 1}
        state = _INJECTING.get()
        cache = state["cache"] if state is not None and spec.name in CACHED_IN_INJECTION else None
        with fair_share():
            compute_and_write(spec, [target], options, Transaction(adapter_name, rounded_residual=rounded,
                                                                   shared_storages=shared), progress=False,
                              bases=cache)


def _checked(layer, adapter_name: str, method: str, options: dict):
    """Everything the hook checks before an init: the options, the layer (:func:`~loram_fast.targets.validate`) and,
    for a method that writes a residual, that nothing else uses the base weight. ``(spec, options, rounded, target)``.
    """
    from . import options as opt
    from .targets import make_target, shared_base_error, validate, weight_users

    spec = get_method(method)
    options = dict(options)
    rounded = bool(options.pop("rounded_residual", False))
    options = opt.validate(options, spec.options, f"method {spec.name!r}")
    if spec.expand is not None:
        options = spec.expand(options)
    target = make_target(layer, adapter_name)
    validate(spec, target, adapter_name, options, in_init_model=False)
    if spec.writes_residual(options):
        users = weight_users(target, adapter_name, _storages())
        if users:
            raise shared_base_error(spec.name, target, users)
    return spec, options, rounded, target


def _gathered(layer):
    """peft's ``gather_params_ctx`` around the base weight, as peft's own inits use it (DeepSpeed ZeRO-3 gathers the
    partitioned weight for the block and writes rank 0's changes back; a no-op elsewhere)."""
    from peft.utils.integrations import gather_params_ctx

    return gather_params_ctx(layer.get_base_layer().weight)


def _take_over(LoraLayer) -> None:
    def route(attr: str, method_of):
        def make(original):
            def wrapper(self, adapter_name, *args, **kwargs):
                weight = self.get_base_layer().weight
                if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16) or weight.device.type == "meta":
                    return original(self, adapter_name, *args, **kwargs)
                method = method_of(self, *args)  # a name, or (name, options)
                name, options = method if isinstance(method, tuple) else (method, {})
                return init_layer(self, adapter_name, name, **options)

            return wrapper

        patch(LoraLayer, attr, make)

    route("pissa_init", lambda layer, init_lora_weights: init_lora_weights)
    route("olora_init", lambda layer: "olora")
    route("mica_init", lambda layer: "mica")
    route("orthogonal_init", lambda layer: "orthogonal")
    # peft's embedding and conv layers call loftq_init without the config (and fail there); ours names the layer kind
    route("loftq_init", lambda layer, config=None: ("loftq", {} if config is None else {
        "loftq_config": dict(config.loftq_config)}))
    _take_over_eva()
    # CorDA: the eigens that peft's preprocess_corda stored on the base layer (consumed, as peft deletes them)
    route("corda_init", lambda layer, init_lora_weights: ("corda", {"eigens": _take_eigens(layer)}))


_EVA_HOMES = ("peft", "peft.tuners", "peft.tuners.lora", "peft.tuners.lora.eva")


def _take_over_eva() -> None:
    """peft's ``initialize_lora_eva_weights`` (its data step for ``init_lora_weights="eva"``) runs
    ``init_model(model, "eva", ...)`` with the adapter's EvaConfig, when called with peft's default input functions
    and no precomputed state dict (anything else stays peft's). Patched where peft exports it."""
    import importlib
    import inspect

    def make(original):
        signature = inspect.signature(original)

        def initialize_lora_eva_weights(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            custom = [name for name in ("forward_fn", "prepare_model_inputs_fn", "prepare_layer_inputs_fn")
                      if a[name] is not signature.parameters[name].default]
            model, adapter = a["model"], a["adapter_name"]
            config = getattr(model, "peft_config", {}).get(adapter)
            if custom or a["eva_state_dict"] is not None or a["dataloader"] is None or config is None or \
                    getattr(config, "init_lora_weights", None) != "eva":
                return original(*args, **kwargs)
            from .api import init_model

            eva = config.eva_config
            return init_model(model, "eva", dataloader=a["dataloader"], adapter_name=adapter,
                              progress=bool(a["show_progress_bar"]), **({} if eva is None else {"eva_config": eva}))

        return initialize_lora_eva_weights

    for home in _EVA_HOMES:
        patch(importlib.import_module(home), "initialize_lora_eva_weights", make)


def _take_eigens(layer):
    base = layer.get_base_layer()
    eigens = getattr(base, "eigens", None)
    if eigens is None:
        raise ValueError("loram_fast: corda: the base layer has no `eigens`; run peft's preprocess_corda first, or "
                         "use loram_fast.init_model(model, 'corda', dataloader=...)")
    del base.eigens
    return eigens


def uninstall() -> None:
    """Restore peft's original methods."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTuner

    from .peft_variant import uninstall_delta_weight

    import importlib

    for home in _EVA_HOMES:
        unpatch(importlib.import_module(home), "initialize_lora_eva_weights")
    for owner, attr in ((LoraLayer, "reset_lora_parameters"), (LoraLayer, "pissa_init"), (LoraLayer, "olora_init"),
                        (LoraLayer, "mica_init"), (LoraLayer, "orthogonal_init"),
                        (LoraLayer, "loftq_init"), (LoraLayer, "corda_init"), (BaseTuner, "inject_adapter")):
        unpatch(owner, attr)
    uninstall_delta_weight()
