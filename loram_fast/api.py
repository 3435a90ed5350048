"""``init_model``: re-initialise every LoRA layer of a peft model with a registered method.

Data path of one call: check every option (once) → find the adapter's LoRA layers and validate each of them,
and refuse base weights that something else uses or that a foreign init already changed (nothing is written
before every layer passed) → estimate gradients (data-driven methods) → compute each layer's
:class:`~loram_fast.methods.common.LayerInit` (read-only; same-shaped weights batched where the method offers
it) → write them all in one :class:`~loram_fast.transaction.Transaction` (exact rollback on any exception) and
record the method in the peft config, so that save → reload gives the same model.
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from . import options as opt
from .compute import compute_and_write
from .ops.dispatch import BACKENDS
from .ops.threads import fair_share
from .registry import Method, format_init_string, get_method, parse_init_string
from .targets import (default_adapter, find_lora_layers, other_weight_users, shared_base_error, validate,
                      writes_peft_residual)
from .transaction import Transaction, residual_record

logger = logging.getLogger(__name__)

# init_model keywords that feed the gradient estimation of data-driven methods (see loram_fast.data)
DATA_OPTIONS = {
    "dataloader": opt.iterable(), "loss_fn": opt.callable_(), "train_step": opt.callable_(),
    "gradient_mode": opt.choice("full", "sketch"), "sketch_rank": opt.integer(1),
    "max_batches": opt.integer(1, optional=True), "run_model": opt.callable_(),
    "eva_cache_mib": opt.real_in(lambda v: v >= 0, "a number >= 0"),
}
# the data options each kind of data-driven method accepts
_DATA_OF_KIND = {"gradient": ("dataloader", "loss_fn", "train_step", "gradient_mode", "sketch_rank", "max_batches"),
                 "covariance": ("dataloader", "run_model", "max_batches"),
                 "eva": ("dataloader", "max_batches", "eva_cache_mib")}
CALL_OPTIONS = {
    "adapter_name": opt.adapter_name(), "progress": opt.boolean(), "rounded_residual": opt.boolean(),
    "allow_shared_base": opt.boolean(),
    "backend": lambda name, value: value if value is None else opt.choice(*BACKENDS)(name, value),
    "snapshot_device": lambda name, value: value if value is None else _device(name, value),
    "exact_rollback": opt.boolean(), "gather_full_weights": opt.boolean(),
}


def _device(name, value):
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"loram_fast: option {name}={value!r}: not a device ({exc})") from None


def _recorded_options(method: Method, options: dict, rounded_residual: bool) -> dict:
    """The options that change the result, for the init string recorded in the peft config."""
    options = dict(options)
    if rounded_residual and method.writes_residual(options):
        options["rounded_residual"] = True
    return options


def _peft_config(model: nn.Module, adapter: str):
    configs = getattr(model, "peft_config", None)
    return configs.get(adapter) if isinstance(configs, dict) else None


def _check_bases(model, spec: Method, targets, adapter, options, allow_shared_base: bool, storages=None) -> None:
    """Refuse base weights a residual must not be written into (see README, "Safety")."""
    if not spec.writes_residual(options) or allow_shared_base:
        return
    users = other_weight_users(model, targets, adapter, storages)
    if users:
        i, who = next(iter(users.items()))
        raise shared_base_error(spec.name, targets[i], who, affected=len(users))


def _check_previous_init(spec: Method, targets, adapter, config) -> None:
    """A base weight changed by an init we cannot undo (peft's pissa, olora, ...) is refused."""
    current = getattr(config, "init_lora_weights", None)
    if not writes_peft_residual(current):  # with the take-over, peft's names ran our code: records exist
        return
    for t in targets:
        if residual_record(t.layer, adapter) is None:
            raise ValueError(f"loram_fast: adapter {adapter!r} was initialised by peft's {current!r}, which wrote a "
                             f"residual into the base weight of {t.describe()} that loram_fast cannot undo; create "
                             f"the adapter with init_lora_weights=True and then call init_model, or use "
                             f"LoraConfig(init_lora_weights={spec.name!r}) directly")


def _gradient_estimator(model, spec: Method, targets, data: dict, progress: bool):
    """A callable giving each layer's gradient; the transaction calls it after earlier residuals are put back."""
    from .data import estimate_gradients

    if "gradient_mode" in data:
        data["mode"] = data.pop("gradient_mode")

    def gradients():
        start = time.perf_counter()
        grads = estimate_gradients(model, [t.weight for t in targets], [t.fan_in_fan_out for t in targets],
                                   [t.layer for t in targets], base_layers=[t.layer.get_base_layer() for t in targets],
                                   names=[t.name for t in targets], progress=progress,
                                   desc=f"loram_fast {spec.name}: gradients", **data)
        logger.info("loram_fast %s: estimated %d gradients in %.3f s", spec.name, len(grads),
                    time.perf_counter() - start)
        return [{"grad": g, "stored_rows": int(t.weight.shape[0])} for g, t in zip(grads, targets)]

    return gradients


def _covariance_estimator(model, spec: Method, targets, data: dict, progress: bool):
    """A callable giving each layer's input covariance (CorDA), run after earlier residuals are put back."""
    from .data import estimate_covariances

    def covariances():
        start = time.perf_counter()
        covs = estimate_covariances(model, [t.layer.get_base_layer() for t in targets], [t.layer for t in targets],
                                    names=[t.name for t in targets], progress=progress,
                                    desc=f"loram_fast {spec.name}: covariances", **data)
        logger.info("loram_fast %s: estimated %d covariances in %.3f s", spec.name, len(covs),
                    time.perf_counter() - start)
        return [{"covariance": c} for c in covs]

    return covariances


def _eva_estimator(model, spec: Method, targets, data: dict, progress: bool, options: dict, config, adapter: str):
    """A callable giving each layer's EVA statistics and rank (``data.estimate_eva``)."""
    from .data import estimate_eva

    if config is None:
        raise ValueError("loram_fast: eva sets adapter ranks in the peft config: pass a PeftModel")
    names = [t.name for t in targets]

    def statistics():
        start = time.perf_counter()
        stats, ranks = estimate_eva(
            model, [t.layer for t in targets], names, [t.r for t in targets], config_r=config.r,
            rho=options.get("rho", 2.0), tau=options.get("tau", 0.99),
            use_label_mask=options.get("use_label_mask", True), label_mask_value=options.get("label_mask_value", -100),
            progress=progress, desc=f"loram_fast {spec.name}: input PCA",
            **{("cache_mib" if k == "eva_cache_mib" else k): v for k, v in data.items()})
        logger.info("loram_fast %s: input statistics in %.3f s", spec.name, time.perf_counter() - start)
        return [{"eva": (*stats[n], ranks[n], t.layer.lora_alpha[adapter])} for n, t in zip(names, targets)]

    return statistics


def init_model(model: nn.Module, method: str = "loram", **kwargs) -> nn.Module:
    """Re-initialise every LoRA layer of ``adapter_name`` (default: the active adapter) with ``method``.

    ``model``: a PeftModel or any module holding peft LoRA layers. Methods that define a residual write
    ``W − scaling·B·A`` into the base weight, so the model's output is unchanged. Keywords:

    - ``adapter_name``: the adapter (default: the active one); ``backend``: force a kernel backend (``"triton"``,
      ``"cuda"``, ``"cpu-ext"``, ``"torch"``; per op, the best available where it lacks one); ``progress``: a tqdm
      bar (default True).
    - ``rounded_residual=True``: the residual from the adapters rounded to the weight's dtype (LoRA-GA's convention)
      instead of the unrounded fp32 factors (the references' default).
    - ``allow_shared_base=True``: write a residual even where another adapter of the layer or a tied parameter
      (e.g. an embedding tied to ``lm_head``) shares the base weight, changing their output too (refused otherwise).
    - ``snapshot_device``: where the copies of changed base weights wait until the call returns (exact rollback);
      default the weight's own device, ``"cpu"`` for GPU models short on memory. A first LoRAM init on the compiled
      kernels needs no copies: its residual writes come last and cannot fail once started (see
      ``Transaction.flush``; a Ctrl-C during them is answered after the call commits). ``exact_rollback=False`` keeps no
      copies (no extra memory; on CPU fresh memory for the copies often costs more than the init itself): a failed
      call then restores each base weight by adding its residual back, exact up to a rounding of the weight's dtype
      per undone write, and says so in the error log.
    - Weights split across ranks (DTensor: FSDP2's ``fully_shard``, ``distribute_tensor`` with ``Shard(0)`` /
      ``Shard(1)``): call on every rank; each rank writes its own shards, and no rank holds a whole weight (see the
      README, "Sharded models"). Methods that need the whole weight raise, unless ``gather_full_weights=True``
      (one weight at a time is all-gathered on every rank).
    - ``**options`` go to the method (see ``loram_fast.available_methods()`` and the README); every value is checked
      before anything is computed.
    - Data-driven methods (``lora_one``, ``lora_ga``): ``dataloader=`` (dict batches; loss ``model(**batch).loss``),
      optionally ``loss_fn=(model, batch) -> loss``, or ``train_step=callable``; ``gradient_mode="full"``
      (default) or ``"sketch"`` (never holds a full gradient; ``sketch_rank=`` sets its rank), ``max_batches=``.
      ``corda`` (input covariances, forward passes only): ``dataloader=`` (``model(**batch)``) or ``run_model=``
      (peft's ``preprocess_corda`` callback), ``max_batches=``. ``eva``: ``dataloader=`` (cycled until converged),
      ``max_batches=`` (a bound on the passes), ``eva_cache_mib=`` (layer inputs kept from the first cycle and
      replayed instead of forward passes; default 1024, 0: forward passes every cycle, as peft).

    A second call on the same adapter first puts back the residual the first one wrote. The method and the options
    that change the result are recorded in ``model.peft_config[adapter].init_lora_weights``
    (``"loram_fast:<name>[...]"``), so ``save_pretrained`` → ``PeftModel.from_pretrained(original base)`` rebuilds
    the same model (after ``import loram_fast``).

    Raises ``ValueError`` (unknown method, bad option value, bad shapes, NaN/Inf weights, shared or foreign-initialised
    base weights), ``TypeError`` (unsupported dtype, unknown option or wrong option type) or ``NotImplementedError``
    (unsupported layer kind), naming the module or option, before anything is written; any exception while writing
    (``KeyboardInterrupt`` included) restores the model bit for bit. Returns ``model``.

    >>> model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    >>> loram_fast.init_model(model, method="loram")
    """
    spec = get_method(method)
    parsed = parse_init_string(method)
    call = opt.validate({k: kwargs.pop(k) for k in list(kwargs) if k in CALL_OPTIONS}, CALL_OPTIONS, "init_model")
    data = {k: kwargs.pop(k) for k in list(kwargs) if k in DATA_OPTIONS}
    if data and not spec.needs_data:
        raise TypeError(f"loram_fast: method {spec.name!r} takes no data; got {', '.join(sorted(data))}")
    data = opt.validate(data, DATA_OPTIONS, "init_model")
    options = opt.validate({**parsed[1], **kwargs}, spec.options, f"method {spec.name!r}")
    if "eigens" in options:
        raise TypeError("loram_fast: eigens= is what the peft hook passes from peft's preprocess_corda; init_model "
                        "collects the covariances itself (dataloader= or run_model=)")
    if spec.expand is not None:
        options = spec.expand(options)
    rounded_residual = call.get("rounded_residual", False) or bool(options.pop("rounded_residual", False))
    progress = call.get("progress", True)
    backend = call.get("backend")

    adapter = call.get("adapter_name") or default_adapter(model)
    storages: dict = {}  # the model's parameters by storage, from the same walk (tied weights: _check_bases)
    targets = find_lora_layers(model, adapter, storages)
    if not targets:
        raise ValueError(f"loram_fast.init_model: no peft LoRA layer holds adapter {adapter!r}")
    logger.info("loram_fast %s: %d LoRA layers of adapter %r", spec.name, len(targets), adapter)
    gather = call.get("gather_full_weights", False)
    for t in targets:
        validate(spec, t, adapter, options, gather_full_weights=gather)
    config = _peft_config(model, adapter)
    _check_bases(model, spec, targets, adapter, options, call.get("allow_shared_base", False), storages)
    _check_previous_init(spec, targets, adapter, config)
    _load_backends()

    if spec.needs_data:
        wrong = sorted(set(data) - set(_DATA_OF_KIND[spec.data_kind]))
        if wrong:
            raise TypeError(f"loram_fast: method {spec.name!r} does not take {', '.join(wrong)}; its data options: "
                            f"{', '.join(_DATA_OF_KIND[spec.data_kind])}")
    if spec.data_kind == "eva" and spec.needs_data:
        gradients = _eva_estimator(model, spec, targets, data, progress, options, config, adapter)
    else:
        estimator = _covariance_estimator if spec.data_kind == "covariance" else _gradient_estimator
        gradients = estimator(model, spec, targets, data, progress) if spec.needs_data else None

    record = format_init_string(spec.name, _recorded_options(spec, options, rounded_residual))
    transaction = Transaction(adapter, config=config, record=record, rounded_residual=rounded_residual, model=model,
                              snapshot_device=call.get("snapshot_device"), backend=backend,
                              exact_rollback=call.get("exact_rollback", True),
                              shared_storages={ptr for ptr, names in storages.items() if len(names) > 1})
    with fair_share():
        compute_and_write(spec, targets, options, transaction, progress=progress, per_layer=gradients,
                          gather_full_weights=gather)
    return model


def _load_backends() -> None:
    """Load (and on first use build) the compiled backends before any progress bar starts."""
    from .ops.dispatch import backends

    backends()
