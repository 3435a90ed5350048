"""The one place that maps method names to their math.

A :class:`Method` says what ``init_model`` and the peft hook need to know: the per-layer init function,
whether it writes a residual into the base weight, which keyword options it accepts, a cheap shape
check run before anything is written, and which layer kinds it supports. A new method is one file in
``methods/`` plus one ``register(Method(...))`` call here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from .methods import loram as _loram


@dataclass(frozen=True)
class Method:
    name: str
    init: Callable  # (W out×in, r, scaling, *, backend, bases, **options) -> LayerInit
    residual: bool  # writes W − s·B·A into the base weight
    description: str
    options: frozenset = field(default_factory=frozenset)  # accepted keyword options
    check: Optional[Callable] = None  # (shape (out, in), r, **options) -> problem string or None
    layer_kinds: tuple = ("linear",)  # peft layer kinds supported: "linear", "embedding", "conv"
    needs_data: bool = False
    reference: str = ""  # where the published math comes from
    # optional batched form: (list of same-shaped W, r, list of scalings, **same kwargs) -> list of LayerInit
    init_batch: Optional[Callable] = None


_METHODS: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add a method to the registry (``replace=True`` to override an existing name)."""
    if method.name in _METHODS and not replace:
        raise ValueError(f"loram_fast.registry: method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def available_methods() -> list[str]:
    """Names accepted by ``init_model(method=...)`` and ``LoraConfig(init_lora_weights=...)``."""
    return sorted(_METHODS)


def is_registered(name) -> bool:
    return isinstance(name, str) and name in _METHODS


def get_method(name) -> Method:
    """The :class:`Method` for ``name``; ``ValueError`` naming it and the valid names otherwise."""
    if not is_registered(name):
        raise ValueError(f"loram_fast: unknown init method {name!r}; available methods: {', '.join(available_methods())}")
    return _METHODS[name]


def _loram_method(name: str, kind: str, description: str) -> Method:
    def init(W, r, scaling, *, backend=None, bases=None, allow_zero_adapter=False):
        return _loram.loram_init(W, r, scaling, kind=kind, allow_zero_adapter=allow_zero_adapter, bases=bases,
                                 backend=backend)

    return Method(name=name, init=init, residual=True, description=description,
                  options=frozenset({"allow_zero_adapter"}), check=_loram.check_loram,
                  reference="zhangzc21/LoRAM layer.py (loram_init, fast_dst_matrix); arXiv 2507.06558")


register(_loram_method("loram", "dst1", "LoRAM: DST-I bases scaled by the weight's magnitude, residual in W"))
register(_loram_method("loram_dct", "dct2", "LoRAM with orthonormal DCT-II bases (a loram_fast extension)"))
