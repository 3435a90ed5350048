"""Target discovery and validation: which peft LoRA layers an init touches, and whether it may touch them.

Nothing here writes. ``find_lora_layers`` lists the layers holding an adapter; ``validate`` checks one layer
against a method (layer kind, device, dtype, shape, merged adapters, DoRA with a middle matrix); ``shared_base_problem`` finds base
weights that something else also uses (another adapter of the layer, a tied embedding): a residual written
there would change that other user too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .ops.sharded import Sharding, local_tensor, sharding_of
from .registry import Method

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# quantized weights: recognised by the parameter class (bitsandbytes), the dtype, or a ``quant_state`` attribute
# (what peft's LoRA-GA looks for)
_QUANTIZED_PARAMS = ("Params4bit", "Int8Params")


# base-layer class -> whether its ``weight`` is the module's "weight" parameter (no class attribute of that name)
_PLAIN_WEIGHT: dict[type, bool] = {}


@dataclass
class LoraTarget:
    """One LoRA layer of the adapter: where its weight is and how to view it as out×in."""

    name: str
    layer: nn.Module  # peft LoraLayer
    kind: str  # "linear", "embedding" or "conv"
    r: int
    scaling: float
    fan_in_fan_out: bool
    sharding: Optional[Sharding] = None  # how a DTensor base weight is split across ranks (None: whole here)

    @property
    def base_layer(self) -> nn.Module:
        """The wrapped module (peft's ``get_base_layer``, looked up once: a loram_fast call never replaces it)."""
        base = self.__dict__.get("_base_layer")
        if base is None:
            base = self.__dict__["_base_layer"] = self.layer.get_base_layer()
        return base

    @property
    def weight(self) -> torch.Tensor:
        base = self.base_layer
        cls = type(base)
        plain = _PLAIN_WEIGHT.get(cls)
        if plain is None:  # no class attribute named weight (a property would come before the parameter)
            plain = _PLAIN_WEIGHT[cls] = not hasattr(cls, "weight")
        weight = base._parameters.get("weight") if plain else None  # asked several times per layer: past
        return base.weight if weight is None else weight  # nn.Module's __getattr__

    def local_weight(self) -> torch.Tensor:
        """The base weight's storage on this rank, as stored (a DTensor's local shard, written in place)."""
        return local_tensor(self.weight.data)

    def weight_view(self) -> torch.Tensor:
        """This rank's base weight as out×in (a transposed view for ``fan_in_fan_out`` / Conv1D layers; the local
        block of a sharded weight)."""
        W = self.local_weight()
        return W.T if self.fan_in_fan_out else W

    @property
    def shape(self) -> tuple[int, int]:
        W = self.weight
        out, inp = (W.shape[1], W.shape[0]) if self.fan_in_fan_out else (W.shape[0], W.shape[1])
        return int(out), int(inp)

    def describe(self) -> str:
        return f"module {self.name!r} ({type(self.base_layer).__name__} {self.shape[0]}×{self.shape[1]})"


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
    fan_in_fan_out = bool(getattr(layer, "fan_in_fan_out", False))
    name = name or type(layer).__name__
    base = layer.get_base_layer()
    try:
        sharding = sharding_of(base.weight, transposed=fan_in_fan_out)
    except NotImplementedError as exc:
        raise NotImplementedError(f"{exc} (module {name!r})") from None
    target = LoraTarget(
        name=name,
        layer=layer,
        kind=_layer_kind(layer, adapter),
        r=int(layer.r[adapter]),
        scaling=float(layer.scaling[adapter]),
        fan_in_fan_out=fan_in_fan_out,
        sharding=sharding,
    )
    target.__dict__["_base_layer"] = base  # looked up once (see LoraTarget.base_layer)
    return target


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


def walk_modules(model: nn.Module):
    """``model.named_modules(remove_duplicate=False)``: every path to every module, depth first, children in
    registration order; from one loop over a stack instead of one generator per level (a peft model has ~10
    modules per LoRA layer, and the walk runs once per call)."""
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        yield name, module
        children = module._modules
        if children:
            prefix = name + "." if name else ""
            for key in reversed(children):  # popped in registration order
                child = children[key]
                if child is not None:
                    stack.append((prefix + key, child))


def find_lora_layers(model: nn.Module, adapter: str, storages: Optional[dict[int, list[str]]] = None
                     ) -> list[LoraTarget]:
    """Every peft LoRA layer of ``model`` that has ``adapter``, in module order. ``storages``: a dict that
    receives :func:`parameters_by_storage` of the model, from the same walk over its modules.

    A module reached by several paths is a target once, under its first path (:func:`walk_modules`)."""
    LoraLayer = _lora_layer_cls()
    is_lora: dict[type, bool] = {}  # issubclass per module class, asked once
    targets = []
    seen: set[int] = set()
    for name, module in walk_modules(model):
        if storages is not None and module._parameters:
            _add_parameters(storages, module, name)
        cls = type(module)
        lora = is_lora.get(cls)
        if lora is None:
            lora = is_lora[cls] = issubclass(cls, LoraLayer)
        if lora and id(module) not in seen:
            seen.add(id(module))
            if adapter in module.r:
                targets.append(make_target(module, adapter, name))
    return targets


def validate(method: Method, target: LoraTarget, adapter: str, options: dict, *, in_init_model: bool = True,
             gather_full_weights: bool = False) -> None:
    """Raise a clear error when ``method`` cannot initialise ``target``; writes nothing."""
    if target.kind not in method.layer_kinds:
        raise NotImplementedError(f"loram_fast: method {method.name!r} does not support peft LoRA layers of kind "
                                  f"{target.kind!r} ({target.describe()}); supported: "
                                  f"{', '.join(method.layer_kinds)}. Leave this module out of target_modules.")
    W = target.weight
    if W.device.type == "meta":
        raise ValueError(f"loram_fast: the base weight of {target.describe()} is on the meta device (offloaded or not "
                         "yet loaded); load the weights onto a real device before initialising")
    if type(W).__name__ in _QUANTIZED_PARAMS or W.dtype not in _FLOAT_DTYPES or hasattr(W, "quant_state"):
        raise TypeError(f"loram_fast: the base weight of {target.describe()} has dtype {W.dtype} "
                        f"({type(W).__name__}); method {method.name!r} needs an fp32, fp16 or bf16 weight. Initialise "
                        "on the unquantized model and quantize the residual afterwards.")
    if W.dim() != 2:
        raise NotImplementedError(f"loram_fast: {target.describe()} has a {W.dim()}-D weight; method "
                                  f"{method.name!r} supports 2-D weights")
    dora = target.layer.use_dora.get(adapter, False)
    if dora and method.middle:
        raise NotImplementedError(f"loram_fast: {target.describe()} uses DoRA, which has no place for the r×r middle "
                                  f"matrix of method {method.name!r} (DoRA would ignore it); use use_dora=False")
    if target.sharding is not None:
        _validate_sharded(method, target, options, gather_full_weights)
    if in_init_model:
        if adapter in getattr(target.layer, "merged_adapters", []):
            raise ValueError(f"loram_fast: adapter {adapter!r} is merged into {target.describe()}; unmerge it first")
    if method.check is not None:
        problem = method.check(target.shape, target.r, **options)
        if problem:
            raise ValueError(f"loram_fast: {target.describe()}, method {method.name!r}: {problem}")


def _validate_sharded(method: Method, target: LoraTarget, options: dict, gather: bool) -> None:
    """What a weight split across ranks rules out (see README, "Sharded models")."""
    where = target.describe()
    if method.replaces_weight:
        raise NotImplementedError(f"loram_fast: method {method.name!r} cannot run on the base weight of {where}, which "
                                  f"is split across {target.sharding.world} ranks: it replaces the whole weight")
    why = "it needs the whole weight" if method.init_sharded is None else (
        method.check_sharded(**options) if method.check_sharded is not None else None)
    if why and not gather:
        raise NotImplementedError(f"loram_fast: method {method.name!r} cannot run on the base weight of {where}, which "
                                  f"is split across {target.sharding.world} ranks: {why}. Pass "
                                  "gather_full_weights=True to init_model to gather one whole weight at a time on "
                                  "every rank (all-gather of out×in entries per layer, one whole weight in memory)")


# peft's own inits that write into the base weight (peft LoraLayer.update_layer): a later init cannot undo them
PEFT_RESIDUAL_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def writes_peft_residual(init_lora_weights) -> bool:
    return isinstance(init_lora_weights, str) and any(
        init_lora_weights == name or init_lora_weights.startswith(name + "_") for name in PEFT_RESIDUAL_INITS)


def parameters_by_storage(model: nn.Module) -> dict[int, list[str]]:
    """Every parameter name of ``model`` (tied ones under each of their names), grouped by storage."""
    storages: dict[int, list[str]] = {}
    for name, module in walk_modules(model):
        _add_parameters(storages, module, name)
    return storages


def _add_parameters(storages: dict[int, list[str]], module: nn.Module, prefix: str) -> None:
    """``module``'s own parameters (as ``named_parameters(remove_duplicate=False)`` names them) by storage."""
    for key, p in module._parameters.items():
        if p is not None and p.device.type != "meta":
            storages.setdefault(local_tensor(p).untyped_storage().data_ptr(), []).append(
                f"{prefix}.{key}" if prefix else key)


def weight_users(target: LoraTarget, adapter: str, storages: dict[int, list[str]]) -> list[str]:
    """Who else uses ``target``'s base weight: the layer's other adapters, and every other name under which its
    storage is reachable (e.g. an embedding tied to ``lm_head``); ``storages`` from :func:`parameters_by_storage`."""
    users = [f"adapter {a!r}" for a in target.layer.r if a != adapter]
    W = target.weight
    group = storages.get(local_tensor(W).untyped_storage().data_ptr(), []) if W.device.type != "meta" else []
    if len(group) > 1:  # the weight's own name is one of them (when the layer is already in the model)
        own = f"{target.name}.base_layer.weight"
        users += [f"parameter {n!r}" for n in group if n != own]
    return users


def shared_base_error(method: str, target: LoraTarget, users: list[str], affected: int = 1) -> ValueError:
    return ValueError(f"loram_fast: method {method!r} writes a residual into the base weight of {target.describe()}, "
                      f"which {', '.join(users)} also use(s): their output would change too. Leave the module out "
                      "of target_modules, or pass allow_shared_base=True to init_model to accept it"
                      + (f" ({affected} module(s) affected)" if affected > 1 else ""))


def other_weight_users(model: nn.Module, targets: list[LoraTarget], adapter: str,
                       storages: Optional[dict[int, list[str]]] = None) -> dict[int, list[str]]:
    """For each target index whose base weight something else also uses: who (see :func:`weight_users`).
    ``storages``: :func:`parameters_by_storage` of the model, when the caller has it."""
    storages = parameters_by_storage(model) if storages is None else storages
    found = {i: weight_users(t, adapter, storages) for i, t in enumerate(targets)}
    return {i: users for i, users in found.items() if users}
