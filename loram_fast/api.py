"""``init_model``: re-initialise every LoRA layer of a peft model with a registered method.

Data path of one call: find the adapter's LoRA layers → validate all of them (nothing is written before
every layer passed) → compute each layer's adapters (read-only; same-shaped weights batched where the
method offers it) → write adapters and residuals, undoing the layers already written if a later one
fails (residual updates are inverted by adding ``s·B·A`` back; the old adapters are kept, they are small).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .methods.common import LayerInit
from .registry import Method, get_method

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_QUANTIZED_PARAMS = ("Params4bit", "Int8Params")


@dataclass
class LoraTarget:
    """One LoRA layer of the adapter: where its weight is and how to view it as out×in."""

    name: str
    layer: nn.Module  # peft LoraLayer
    kind: str  # "linear", "embedding" or "conv"
    r: int
    scaling: float
    fan_in_fan_out: bool

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.get_base_layer().weight

    def weight_view(self) -> torch.Tensor:
        """The base weight as out×in (a transposed view for ``fan_in_fan_out`` / Conv1D layers)."""
        W = self.weight.data
        return W.T if self.fan_in_fan_out else W

    @property
    def shape(self) -> tuple[int, int]:
        W = self.weight
        out, inp = (W.shape[1], W.shape[0]) if self.fan_in_fan_out else (W.shape[0], W.shape[1])
        return int(out), int(inp)

    def describe(self) -> str:
        return f"module {self.name!r} ({type(self.layer.get_base_layer()).__name__} {self.shape[0]}×{self.shape[1]})"


def _lora_layer_cls():
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def _layer_kind(layer, adapter: str) -> str:
    if adapter in getattr(layer, "lora_embedding_A", {}):
        return "embedding"
    mod = layer.lora_A[adapter]
    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    return type(mod).__name__


def make_target(layer, adapter: str, name: str = "") -> LoraTarget:
    return LoraTarget(
        name=name or type(layer).__name__,
        layer=layer,
        kind=_layer_kind(layer, adapter),
        r=int(layer.r[adapter]),
        scaling=float(layer.scaling[adapter]),
        fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)),
    )


def default_adapter(model: nn.Module) -> str:
    """The active adapter of a PeftModel (or of the first LoRA layer found)."""
    active = getattr(model, "active_adapter", None)
    if isinstance(active, str):
        return active
    if isinstance(active, (list, tuple)) and active:
        return active[0]
    LoraLayer = _lora_layer_cls()
    for module in model.modules():
        if isinstance(module, LoraLayer) and module.active_adapters:
            return module.active_adapters[0]
    raise ValueError("loram_fast.init_model: the model holds no peft LoRA layers (wrap it with get_peft_model first)")


def find_lora_layers(model: nn.Module, adapter: str) -> list[LoraTarget]:
    """Every peft LoRA layer of ``model`` that has ``adapter``, in module order."""
    LoraLayer = _lora_layer_cls()
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.r:
            targets.append(make_target(module, adapter, name))
    return targets


def validate(method: Method, target: LoraTarget, adapter: str, options: dict, *, in_init_model: bool = True) -> None:
    """Raise a clear error when ``method`` cannot initialise ``target``; writes nothing."""
    where = target.describe()
    if target.kind not in method.layer_kinds:
        raise NotImplementedError(f"loram_fast: method {method.name!r} does not support peft LoRA layers of kind "
                                  f"{target.kind!r} ({where}); supported: {', '.join(method.layer_kinds)}. "
                                  "Leave this module out of target_modules.")
    W = target.weight
    if W.device.type == "meta":
        raise ValueError(f"loram_fast: the base weight of {where} is on the meta device (offloaded or not yet "
                         "loaded); load the weights onto a real device before initialising")
    if type(W).__name__ in _QUANTIZED_PARAMS or W.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"loram_fast: the base weight of {where} has dtype {W.dtype} ({type(W).__name__}); method "
                        f"{method.name!r} needs an fp32, fp16 or bf16 weight. Initialise on the unquantized model "
                        "and quantize the residual afterwards.")
    if W.dim() != 2:
        raise NotImplementedError(f"loram_fast: {where} has a {W.dim()}-D weight; method {method.name!r} "
                                  "supports 2-D weights")
    if in_init_model:
        if adapter in getattr(target.layer, "merged_adapters", []):
            raise ValueError(f"loram_fast: adapter {adapter!r} is merged into {where}; unmerge it first")
        if target.layer.use_dora.get(adapter, False):
            raise NotImplementedError(f"loram_fast.init_model: {where} uses DoRA; re-initialising a DoRA adapter "
                                      "in place is not supported (use LoraConfig(init_lora_weights=...) instead)")
    if method.check is not None:
        problem = method.check(target.shape, target.r, **options)
        if problem:
            raise ValueError(f"loram_fast: {where}, method {method.name!r}: {problem}")


def _check_options(method: Method, options: dict) -> None:
    unknown = sorted(set(options) - set(method.options))
    if unknown:
        valid = ", ".join(sorted(method.options)) or "none"
        raise TypeError(f"loram_fast: method {method.name!r} got unknown option(s) {', '.join(unknown)}; "
                        f"accepted options: {valid}")


def _compute(method: Method, targets: list[LoraTarget], options: dict, backend, progress,
             per_layer: Optional[list[dict]] = None) -> list[LayerInit]:
    """Adapters for every target, read-only. Errors name the module. Methods with a batched form get same-shaped
    weights together; the others run in module order (so seeded randomness matches a layer-by-layer reference)."""
    bases: dict = {}
    inits: list[Optional[LayerInit]] = [None] * len(targets)
    groups: dict = {}
    for i, t in enumerate(targets):
        W = t.weight
        key = (t.shape, W.dtype, W.device, t.r) if method.init_batch is not None else i
        groups.setdefault(key, []).append(i)
    for idx in groups.values():
        views = [targets[i].weight_view() for i in idx]
        if method.init_batch is not None and len(idx) > 1:
            try:
                results = method.init_batch(views, targets[idx[0]].r, [targets[i].scaling for i in idx],
                                            backend=backend, bases=bases, **options)
            except (ValueError, TypeError) as exc:
                names = ", ".join(repr(targets[i].name) for i in idx)
                raise type(exc)(f"modules {names} (batched): {exc}") from exc
            for i, res in zip(idx, results):
                inits[i] = res
            if progress is not None:
                progress.update(len(idx))
            continue
        for i, W in zip(idx, views):
            t = targets[i]
            try:
                extra = per_layer[i] if per_layer is not None else {}
                inits[i] = method.init(W, t.r, t.scaling, backend=backend, bases=bases, **options, **extra)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{t.describe()}: {exc}") from exc
            if progress is not None:
                progress.update(1)
    return inits


def _set_adapters(target: LoraTarget, adapter: str, mats: dict, *, round_to_base=True) -> None:
    """Assign adapter matrices ``{module name: tensor}`` (``lora_A``, ``lora_B``, extras such as ``lora_N``),
    rounded to the base weight's dtype (as the references store them) and held in the adapter parameters' own
    dtype (peft's autocast may keep them in fp32)."""
    with torch.no_grad():
        for name, value in mats.items():
            param = getattr(target.layer, name)[adapter].weight
            param.data.copy_(value.to(target.weight.dtype) if round_to_base else value)


def _snapshot(target: LoraTarget, adapter: str, init: LayerInit) -> dict:
    """The adapter matrices (and trainable flags) that writing ``init`` replaces: small, kept for rollback."""
    names = ["lora_A", "lora_B", *init.extra]
    layer = target.layer
    return {n: (getattr(layer, n)[adapter].weight.detach().clone(), getattr(layer, n)[adapter].weight.requires_grad)
            for n in names if adapter in getattr(layer, n, {})}


def _restore(target: LoraTarget, adapter: str, snap: dict) -> None:
    _set_adapters(target, adapter, {n: v for n, (v, _) in snap.items()}, round_to_base=False)
    for n, (_, flag) in snap.items():
        getattr(target.layer, n)[adapter].weight.requires_grad_(flag)


def _write_adapters(target: LoraTarget, adapter: str, init: LayerInit) -> None:
    if init.extra:
        from .peft_hook import ensure_adapter_modules

        ensure_adapter_modules(target.layer, adapter, init.extra)
    _set_adapters(target, adapter, {"lora_A": init.A, "lora_B": init.B, **init.extra})
    if init.frozen:
        from .peft_variant import freeze

        freeze(target.layer, adapter, init.frozen)


def _residual(target: LoraTarget, init: LayerInit, sign: float, *, rounded_residual: bool, backend) -> None:
    """``W += sign · s·B·A`` on the out×in view of the base weight (sign −1 writes, +1 undoes)."""
    rounded = target.weight.dtype if rounded_residual else None
    with torch.no_grad():
        init.apply_residual(target.weight_view(), sign, rounded_dtype=rounded, backend=backend)


def init_targets(method: Method, targets: list[LoraTarget], adapter: str, *, backend=None, progress=True,
                 rounded_residual: bool = False, options: Optional[dict] = None, in_init_model: bool = True,
                 per_layer: Optional[list[dict]] = None, validated: bool = False) -> None:
    """Validate, compute and write ``targets`` transactionally (see module docstring)."""
    options = dict(options or {})
    if not validated:
        _check_options(method, options)
        for t in targets:
            validate(method, t, adapter, options, in_init_model=in_init_model)
    bar = tqdm(total=2 * len(targets), desc=f"loram_fast {method.name}", disable=not progress or not targets,
               unit="step", leave=False)
    try:
        start = time.perf_counter()
        bar.set_postfix_str("compute")
        inits = _compute(method, targets, options, backend, bar, per_layer)
        logger.info("loram_fast %s: computed %d layers in %.3f s", method.name, len(targets),
                    time.perf_counter() - start)
        written: list[tuple[LoraTarget, LayerInit, dict]] = []
        bar.set_postfix_str("write")
        try:
            for t, init in zip(targets, inits):
                snap = _snapshot(t, adapter, init)
                _write_adapters(t, adapter, init)
                try:
                    _residual(t, init, -1.0, rounded_residual=rounded_residual, backend=backend)
                except BaseException:
                    _restore(t, adapter, snap)
                    raise
                written.append((t, init, snap))
                bar.update(1)
        except BaseException:
            logger.error("loram_fast %s: writing failed; restoring %d layer(s)", method.name, len(written))
            for t, init, snap in reversed(written):
                _residual(t, init, +1.0, rounded_residual=rounded_residual, backend=backend)
                _restore(t, adapter, snap)
            raise
        logger.info("loram_fast %s: initialised %d layers in %.3f s", method.name, len(targets),
                    time.perf_counter() - start)
    finally:
        bar.close()


def init_model(model: nn.Module, method: str = "loram", *, adapter_name: Optional[str] = None, backend: Optional[str] = None,
               progress: bool = True, rounded_residual: bool = False, **options) -> nn.Module:
    """Re-initialise every LoRA layer of ``adapter_name`` (default: the active adapter) with ``method``.

    ``model``: a PeftModel or any module holding peft LoRA layers. Methods that define a residual write
    ``W − scaling·B·A`` into the base weight, so the model's output is unchanged. ``backend`` forces a kernel
    backend (``"triton"``, ``"cuda"``, ``"cpu-ext"``, ``"torch"``; default: the best available).
    ``rounded_residual=True`` computes the residual from the adapters rounded to the weight's dtype (LoRA-GA's
    convention) instead of the unrounded fp32 factors (the references' default). ``**options`` go to the method
    (see ``loram_fast.available_methods()`` and the README). Returns ``model``.

    Data-driven methods (``lora_one``, ``lora_ga``) take ``dataloader=`` (dict batches; loss ``model(**batch).loss``),
    optionally ``loss_fn=(model, batch) -> loss``, or ``train_step=callable``; ``gradient_mode="full"`` (default) or
    ``"sketch"`` (never holds a full gradient; ``sketch_rank=`` sets its rank), ``max_batches=``.

    Raises ``ValueError`` (unknown method, bad shapes, NaN/Inf weights), ``TypeError`` (unsupported dtype or
    option) or ``NotImplementedError`` (unsupported layer kind), naming the module, before anything is written.

    >>> model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    >>> loram_fast.init_model(model, method="loram")
    """
    spec = get_method(method)
    data = {k: options.pop(k) for k in DATA_OPTIONS if k in options}
    if data and not spec.needs_data:
        raise TypeError(f"loram_fast: method {method!r} takes no data; got {', '.join(sorted(data))}")
    adapter = adapter_name or default_adapter(model)
    targets = find_lora_layers(model, adapter)
    if not targets:
        raise ValueError(f"loram_fast.init_model: no peft LoRA layer holds adapter {adapter!r}")
    logger.info("loram_fast %s: %d LoRA layers of adapter %r", method, len(targets), adapter)
    _check_options(spec, options)
    for t in targets:
        validate(spec, t, adapter, options)
    per_layer = None
    if spec.needs_data:
        from .data import estimate_gradients

        if "gradient_mode" in data:
            data["mode"] = data.pop("gradient_mode")
        start = time.perf_counter()
        grads = estimate_gradients(model, [t.weight for t in targets], [t.fan_in_fan_out for t in targets],
                                   [t.layer for t in targets], base_layers=[t.layer.get_base_layer() for t in targets],
                                   **data)
        logger.info("loram_fast %s: estimated %d gradients in %.3f s", method, len(grads), time.perf_counter() - start)
        per_layer = [{"grad": g} for g in grads]
    init_targets(spec, targets, adapter, backend=backend, progress=progress, rounded_residual=rounded_residual,
                 options=options, per_layer=per_layer, validated=True)
    return model


# init_model keywords that feed the gradient estimation of data-driven methods (see loram_fast.data)
DATA_OPTIONS = ("dataloader", "loss_fn", "train_step", "gradient_mode", "sketch_rank", "max_batches")


def init_layer(layer, adapter_name: str, method: str, **options) -> None:
    """Initialise one peft LoRA layer in place (what the peft hook calls from ``update_layer``)."""
    spec = get_method(method)
    init_targets(spec, [make_target(layer, adapter_name)], adapter_name, progress=False, options=options,
                 in_init_model=False)
