"""The one place that maps method names to their math.

A :class:`Method` says what ``init_model`` and the peft hook need to know: the per-layer init function,
whether it writes a residual into the base weight, which keyword options it accepts, a cheap shape
check run before anything is written, and which layer kinds it supports. A new method is one file in
``methods/`` plus one ``register(Method(...))`` call here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from .methods import gradient as _gradient
from .methods import loram as _loram
from .methods import nlora as _nlora
from .methods import svd as _svd


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
# parametrised names, e.g. "pissa_niter_4": (regex, display name, factory(match) -> Method)
_PATTERNS: list[tuple[re.Pattern, str, Callable]] = []


def register(method: Method, *, replace: bool = False) -> Method:
    """Add a method to the registry (``replace=True`` to override an existing name)."""
    if method.name in _METHODS and not replace:
        raise ValueError(f"loram_fast.registry: method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def register_pattern(regex: str, display: str, factory: Callable) -> None:
    """Register a family of names matching ``regex`` (``factory(match) -> Method``), listed as ``display``."""
    _PATTERNS.append((re.compile(regex), display, factory))


def available_methods() -> list[str]:
    """Names accepted by ``init_model(method=...)`` and ``LoraConfig(init_lora_weights=...)``
    (``<N>`` stands for a non-negative integer)."""
    return sorted(list(_METHODS) + [display for _, display, _ in _PATTERNS])


def _lookup(name) -> Optional[Method]:
    if not isinstance(name, str):
        return None
    if name in _METHODS:
        return _METHODS[name]
    for regex, _, factory in _PATTERNS:
        match = regex.fullmatch(name)
        if match:
            return factory(match)
    return None


def is_registered(name) -> bool:
    return _lookup(name) is not None


def get_method(name) -> Method:
    """The :class:`Method` for ``name``; ``ValueError`` naming it and the valid names otherwise."""
    method = _lookup(name)
    if method is None:
        raise ValueError(f"loram_fast: unknown init method {name!r}; available methods: {', '.join(available_methods())}")
    return method


def _loram_method(name: str, kind: str, description: str) -> Method:
    def init(W, r, scaling, *, backend=None, bases=None, allow_zero_adapter=False):
        return _loram.loram_init(W, r, scaling, kind=kind, allow_zero_adapter=allow_zero_adapter, bases=bases,
                                 backend=backend)

    return Method(name=name, init=init, residual=True, description=description,
                  options=frozenset({"allow_zero_adapter"}), check=_loram.check_loram,
                  reference="zhangzc21/LoRAM layer.py (loram_init, fast_dst_matrix); arXiv 2507.06558")


register(_loram_method("loram", "dst1", "LoRAM: DST-I bases scaled by the weight's magnitude, residual in W"))
register(_loram_method("loram_dct", "dct2", "LoRAM with orthonormal DCT-II bases (a loram_fast extension)"))


def _svd_method(name: str, which: str, niter: Optional[int], description: str, reference: str) -> Method:
    def init_batch(views, r, scalings, *, backend=None, bases=None, **options):
        return _svd.svd_init_batch(views, r, scalings, which=which, niter=niter, backend=backend, **options)

    def init(W, r, scaling, *, backend=None, bases=None, **options):
        return init_batch([W], r, [scaling], backend=backend, **options)[0]

    options = frozenset({"oversample"}) if niter is not None else frozenset()
    return Method(name=name, init=init, init_batch=init_batch, residual=True, description=description,
                  options=options, check=_svd.check_rank, reference=reference)


def _olora_method() -> Method:
    def init_batch(views, r, scalings, *, backend=None, bases=None):
        return _svd.olora_init_batch(views, r, scalings, backend=backend)

    def init(W, r, scaling, *, backend=None, bases=None):
        return init_batch([W], r, [scaling], backend=backend)[0]

    return Method(name="olora", init=init, init_batch=init_batch, residual=True,
                  description="OLoRA: A = R[:r], B = Q[:, :r] of W = QR (from an out×r panel), residual in W",
                  check=_svd.check_rank, reference="peft LoraLayer.olora_init; arXiv 2406.01775")


register(_svd_method("pissa", "top", None, "PiSSA: top-r singular triplets (exact SVD), sqrt(S/s) split, residual in W",
                     "peft LoraLayer.pissa_init; arXiv 2404.02948"))
register(_svd_method("milora", "bottom", None,
                     "MiLoRA: the r smallest singular triplets (exact SVD), sqrt(S/s) split, residual in W",
                     "arXiv 2406.09044 (reproduction: svd_init.py, mode='min')"))
register(_olora_method())
register_pattern(r"pissa_niter_(\d+)", "pissa_niter_<N>", lambda m: _svd_method(
    m.group(0), "top", int(m.group(1)),
    "PiSSA on loram_fast.randomized_svd with N power iterations and oversampling", "peft LoraLayer.pissa_init"))


def _lora_ga_options(lora_ga_config=None, **options):
    """Accept peft's ``LoraGAConfig`` as well as the keyword options."""
    if lora_ga_config is not None:
        for key in ("direction", "scale", "stable_gamma"):
            options.setdefault(key, getattr(lora_ga_config, key))
    return options


register(Method(
    name="lora_one",
    init=lambda W, r, scaling, *, backend=None, bases=None, **o: _gradient.lora_one_init(W, r, scaling, backend=backend,
                                                                                           **o),
    residual=False, needs_data=True,
    description="LoRA-One: SVD of the negative one-step full gradient, sqrt(S)/sqrt(sigma1*gamma) split; W untouched",
    options=frozenset({"scale", "gamma", "solver", "niter"}), check=_gradient.check_rank,
    reference="YuanheZ/LoRA-One run_exp.py (direction LoRA-One); arXiv 2502.01235"))
register(Method(
    name="lora_ga",
    init=lambda W, r, scaling, *, backend=None, bases=None, **o: _gradient.lora_ga_init(
        W, r, scaling, backend=backend, **_lora_ga_options(**o)),
    residual=True, needs_data=True,
    description="LoRA-GA (peft's): top-2r gradient SVD split between A and B, scaled; residual in W",
    options=frozenset({"direction", "scale", "stable_gamma", "solver", "lora_ga_config"}),
    check=lambda shape, r, **o: _gradient.check_lora_ga_rank(shape, r),
    reference="peft LoraLayer.lora_ga_init + loraga.py; arXiv 2407.05000"))


_NLORA_REF = "TracyGuo2001/NLoRA peft fork (nlora_init, slora_init, inttune.py); arXiv 2502.14482"


def _nlora_method(name: str, frozen: tuple, description: str) -> Method:
    return Method(name=name, residual=False, description=description, options=frozenset({"nystrom", "residual"}),
                  check=_nlora.check_rank, reference=_NLORA_REF,
                  init=lambda W, r, scaling, *, backend=None, bases=None, **o: _nlora.nlora_init(W, r, scaling,
                                                                                                 frozen=frozen, **o))


register(_nlora_method("nlora", (), "NLoRA: A = W[:r,:], B = W[:,:r], r×r N = W[:r,:r] between them; W untouched"))
register(_nlora_method("inttune", ("lora_A", "lora_B"), "IntTune: the NLoRA init with only the r×r N trainable"))
register(Method(name="slora", residual=False, check=_nlora.check_rank, reference=_NLORA_REF,
                description="SLoRA: Kaiming A and r×r N, zero B; W untouched",
                init=lambda W, r, scaling, *, backend=None, bases=None: _nlora.slora_init(W, r, scaling)))
