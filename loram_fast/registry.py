"""The one place that maps method names to their math.

A :class:`Method` says what ``init_model`` and the peft hook need to know: the per-layer init function,
whether it writes a residual into the base weight, which keyword options it accepts (each with its validator),
a cheap shape check run before anything is written, and which layer kinds it supports. A new method is one file
in ``methods/`` plus one ``register(Method(...))`` call here.

Init strings: ``LoraConfig(init_lora_weights=...)`` takes a registered name (``"loram"``), or the form that
``init_model`` records in the adapter's peft config so that a reload rebuilds the same model:
``"loram_fast:<name>"`` or ``"loram_fast:<name>[key=value,...]"`` (options that change the result). The prefix
keeps peft from taking names it also knows (``"pissa_niter_4"``, ``"olora"``, ``"lora_ga"``) for its own.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import options as _opt
from .methods.common import LayerInit
from .methods import corda as _corda
from .methods import eva as _eva
from .methods import gradient as _gradient
from .methods import loftq as _loftq
from .methods import loram as _loram
from .methods import nlora as _nlora
from .methods import orthogonal as _orthogonal
from .methods import svd as _svd


@dataclass(frozen=True)
class Method:
    name: str
    init: Callable  # (W out×in, r, scaling, *, backend, bases, **options) -> LayerInit
    residual: bool  # writes W − s·B·A into the base weight
    description: str
    options: dict = field(default_factory=dict)  # accepted keyword options: name -> validator (loram_fast.options)
    check: Optional[Callable] = None  # (shape (out, in), r, **options) -> problem string or None
    layer_kinds: tuple = ("linear",)  # peft layer kinds supported: "linear", "embedding", "conv"
    needs_data: bool = False
    # what needs_data means: "gradient" (per-layer grad), "covariance" (input covariance) or "eva" (input PCA)
    data_kind: str = "gradient"
    reference: str = ""  # where the published math comes from
    # optional batched form: (list of same-shaped W, r, list of scalings, **same kwargs) -> list of LayerInit; a
    # ValueError / TypeError about one weight may carry its position in the list as ``batch_index`` (the error then
    # names that module)
    init_batch: Optional[Callable] = None
    middle: bool = False  # adds an r×r matrix N between A and B (three-matrix methods)
    # optional form for a weight split across ranks: (MatrixOperator, r, scaling, *, backend, bases, **options) ->
    # LayerInit with whole A, B (every rank) and a residual of whole factors; None: needs the whole weight
    init_sharded: Optional[Callable] = None
    check_sharded: Optional[Callable] = None  # (**options) -> why these options need the whole weight, or None
    replaces_weight: bool = False  # the init replaces the base weight (LoftQ), with no inverse
    # folds a peft config object among the options (e.g. loftq_config) into plain options that can be recorded;
    # applied once, after validation, by init_model and the hook (the init functions see plain options only)
    expand: Optional[Callable] = None

    def writes_residual(self, options: dict) -> bool:
        """Whether the init changes the base weight (a residual or a replacement; ``residual=True`` turns it on for
        the three-matrix methods)."""
        return self.residual or bool(options.get("residual", False))


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


PREFIX = "loram_fast:"


def parse_init_string(text) -> Optional[tuple[str, dict, bool]]:
    """``(method name, options, recorded)`` for an init string (see module docstring), or None when ``text`` is not
    one of ours. ``recorded``: it has the ``loram_fast:`` prefix (written by ``init_model``)."""
    if not isinstance(text, str):
        return None
    recorded = text.startswith(PREFIX)
    body = text[len(PREFIX):] if recorded else text
    options: dict = {}
    if body.endswith("]") and "[" in body:
        body, _, args = body[:-1].partition("[")
        for item in filter(None, args.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                return None
            options[key.strip()] = _parse_value(value.strip())
    if body not in _METHODS and not any(regex.fullmatch(body) for regex, _, _ in _PATTERNS):
        return None
    return body, options, recorded


def format_init_string(name: str, options: dict) -> str:
    """The recorded form of ``name`` with ``options`` (sorted; bool, int, float and plain-string values)."""
    if not options:
        return PREFIX + name
    items = []
    for key in sorted(options):
        value = options[key]
        text = ("true" if value else "false") if isinstance(value, bool) else repr(value) if isinstance(
            value, float) else str(value)
        if any(c in text for c in ",=[]") or isinstance(value, str) and text in ("true", "false"):
            raise ValueError(f"loram_fast: option {key}={value!r} cannot be recorded in an init string")
        items.append(f"{key}={text}")
    return f"{PREFIX}{name}[{','.join(items)}]"


def _parse_value(text: str):
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _method_for(name) -> Optional[Method]:
    if not isinstance(name, str):
        return None
    if name in _METHODS:
        return _METHODS[name]
    for regex, _, factory in _PATTERNS:
        match = regex.fullmatch(name)
        if match:
            return factory(match)
    return None


def _lookup(name) -> Optional[Method]:
    parsed = parse_init_string(name)
    return None if parsed is None else _method_for(parsed[0])


def is_registered(name) -> bool:
    return _lookup(name) is not None


def get_method(name) -> Method:
    """The :class:`Method` for ``name`` (a name or an init string); ``ValueError`` naming it and the valid names
    otherwise."""
    method = _lookup(name)
    if method is None:
        raise ValueError(f"loram_fast: unknown init method {name!r}; available methods: {', '.join(available_methods())}")
    return method


def _loram_method(name: str, kind: str, description: str) -> Method:
    def init(W, r, scaling, *, backend=None, bases=None, allow_zero_adapter=False):
        # A and B not formed yet: the writer forms them in the adapter parameters' own memory (LayerInit.formed)
        return _loram.loram_factors(W, r, scaling, kind=kind, allow_zero_adapter=allow_zero_adapter, bases=bases,
                                    backend=backend, round_to=W.dtype, deferred=True)

    def init_batch(views, r, scalings, *, backend=None, bases=None, allow_zero_adapter=False):
        return _loram.loram_factors_batch(views, r, scalings, kind=kind, allow_zero_adapter=allow_zero_adapter,
                                          bases=bases, backend=backend, round_to=views[0].dtype, deferred=True)

    def init_sharded(op, r, scaling, *, backend=None, bases=None, allow_zero_adapter=False):
        return _loram.loram_factors_sharded(op, r, scaling, kind=kind, allow_zero_adapter=allow_zero_adapter,
                                            bases=bases, backend=backend, round_to=op.dtype)

    return Method(name=name, init=init, init_batch=init_batch, init_sharded=init_sharded, residual=True,
                  description=description,
                  options={"allow_zero_adapter": _opt.boolean()}, check=_loram.check_loram,
                  reference="zhangzc21/LoRAM layer.py (loram_init, fast_dst_matrix); arXiv 2507.06558")


register(_loram_method("loram", "dst1", "LoRAM: DST-I bases scaled by the weight's magnitude, residual in W"))
register(_loram_method("loram_dct", "dct2", "LoRAM with orthonormal DCT-II bases (a loram_fast extension)"))


def _svd_method(name: str, which: str, niter: Optional[int], description: str, reference: str) -> Method:
    def init_batch(views, r, scalings, *, backend=None, bases=None, **options):
        return _svd.svd_init_batch(views, r, scalings, which=which, niter=niter, backend=backend, bases=bases,
                                   **options)

    def init(W, r, scaling, *, backend=None, bases=None, **options):
        return init_batch([W], r, [scaling], backend=backend, bases=bases, **options)[0]

    def init_sharded(op, r, scaling, *, backend=None, bases=None, **options):
        return _svd.svd_init_sharded(op, r, scaling, niter=niter, backend=backend, **options)

    options = {"oversample": _opt.integer(0)} if niter is not None else {"solver": _opt.choice("iterative", "svd")}
    # MiLoRA's minor components and pissa(solver="svd") need the full SVD of the whole weight
    sharded = init_sharded if which == "top" else None
    return Method(name=name, init=init, init_batch=init_batch, residual=True, description=description,
                  options=options, check=_svd.check_rank, reference=reference, init_sharded=sharded,
                  check_sharded=_svd.check_sharded)


def _olora_method() -> Method:
    def init_batch(views, r, scalings, *, backend=None, bases=None):
        return _svd.olora_init_batch(views, r, scalings, backend=backend)

    def init(W, r, scaling, *, backend=None, bases=None):
        return init_batch([W], r, [scaling], backend=backend)[0]

    def init_sharded(op, r, scaling, *, backend=None, bases=None):
        return _svd.olora_init_sharded(op, r, scaling, backend=backend)

    return Method(name="olora", init=init, init_batch=init_batch, init_sharded=init_sharded, residual=True,
                  description="OLoRA: A = R[:r], B = Q[:, :r] of W = QR (from an out×r panel), residual in W",
                  check=_svd.check_rank, reference="peft LoraLayer.olora_init; arXiv 2406.01775")


register(_svd_method("pissa", "top", None,
                     "PiSSA: exact top-r singular triplets (iterated to a residual test, or the full SVD), sqrt(S/s) "
                     "split, residual in W",
                     "peft LoraLayer.pissa_init; arXiv 2404.02948"))
register(_svd_method("milora", "bottom", None,
                     "MiLoRA: the r smallest singular triplets (shift-and-invert iteration or the full SVD), "
                     "sqrt(S/s) split, residual in W",
                     "arXiv 2406.09044 (reproduction: svd_init.py, mode='min')"))
register(_olora_method())
register_pattern(r"pissa_niter_(\d+)", "pissa_niter_<N>", lambda m: _svd_method(
    m.group(0), "top", int(m.group(1)),
    "PiSSA on loram_fast.randomized_svd with N power iterations and oversampling", "peft LoraLayer.pissa_init"))


def _expand_lora_ga(options: dict) -> dict:
    """``lora_ga_config`` (peft's LoraGAConfig) fills the fields not passed."""
    options = dict(options)
    config = options.pop("lora_ga_config", None)
    if config is not None:
        for key in ("direction", "scale", "stable_gamma"):
            options.setdefault(key, getattr(config, key))
    return options


def _lora_one_init(W, r, scaling, *, backend=None, bases=None, stored_rows=None, **o):
    return _gradient.lora_one_init(W, r, scaling, backend=backend, **o)


def _lora_ga_init(W, r, scaling, *, backend=None, bases=None, **o):
    return _gradient.lora_ga_init(W, r, scaling, backend=backend, **o)


# the gradient inits take a sharded weight's operator for W and a sharded (or sketched) gradient as they are
register(Method(
    name="lora_one", init=_lora_one_init, init_sharded=_lora_one_init,
    residual=False, needs_data=True,
    description="LoRA-One: SVD of the negative one-step full gradient, sqrt(S)/sqrt(sigma1*gamma) split; W untouched",
    options={"scale": _opt.choice(*_gradient.LORA_ONE_SCALES), "gamma": _opt.positive_real(),
             "solver": _opt.choice(*_gradient.SOLVERS), "niter": _opt.integer(0)},
    check=_gradient.check_rank,
    reference="YuanheZ/LoRA-One run_exp.py (direction LoRA-One); arXiv 2502.01235"))
register(Method(
    name="lora_ga", init=_lora_ga_init, init_sharded=_lora_ga_init, expand=_expand_lora_ga,
    residual=True, needs_data=True,
    description="LoRA-GA (peft's): top-2r gradient SVD split between A and B, scaled; residual in W",
    options={"direction": _opt.choice(*_gradient.LORA_GA_DIRECTIONS), "scale": _opt.choice(*_gradient.LORA_GA_SCALES),
             "stable_gamma": _opt.positive_real(), "solver": _opt.choice(*_gradient.SOLVERS),
             "stable_dim": _opt.choice("stored", "out"), "lora_ga_config": _opt.peft_config("LoraGAConfig", "direction", "scale", "stable_gamma")},
    check=lambda shape, r, **o: _gradient.check_lora_ga_rank(shape, r),
    reference="peft LoraLayer.lora_ga_init + loraga.py; arXiv 2407.05000"))


def _expand_corda(options: dict) -> dict:
    """``corda_config`` (peft's CordaConfig) gives ``corda_method`` when not passed."""
    options = dict(options)
    config = options.pop("corda_config", None)
    if config is not None and config.corda_method is not None:
        options.setdefault("corda_method", _opt.choice(*_corda.MODES)("corda_method", config.corda_method))
    return options


def _corda_init(W, r, scaling, *, backend=None, bases=None, covariance=None, eigens=None, **options):
    if eigens is not None:  # the hook's take-over of peft's corda_init: peft's cropped eigens of W·C'
        return _corda.corda_from_eigens(W, r, scaling, eigens.U_WC, eigens.S_WC, eigens.V_WC)
    if covariance is None:
        raise ValueError("loram_fast.corda: no input covariance (init_model collects it from dataloader= or "
                         "run_model=)")
    return _corda.corda_init(W, r, scaling, covariance=covariance, backend=backend, cache=bases, **options)


def _eigens(name, value):
    if not all(hasattr(value, key) for key in ("U_WC", "S_WC", "V_WC")):
        raise TypeError(f"loram_fast: option {name}: expected peft's CordaEigens (the hook passes them)")
    return value


register(Method(
    name="corda", init=_corda_init, residual=True, needs_data=True, data_kind="covariance",
    description="CorDA: SVD of W·C (C: damped input covariance from data), the r largest (ipm) or smallest (kpm) "
                "triplets, V whitened by inv(C), sqrt(S/s) split; residual in W",
    options={"corda_method": _opt.choice(*_corda.MODES), "corda_config": _opt.peft_config("CordaConfig", "corda_method"),
             "eigens": _eigens},
    expand=_expand_corda,
    check=_corda.check_rank, reference="peft corda.py (preprocess_corda) + LoraLayer.corda_init; arXiv 2406.05223"))


_EVA_CONFIG_FIELDS = ("rho", "tau", "use_label_mask", "label_mask_value", "whiten", "adjust_scaling_factors")


def _expand_eva(options: dict) -> dict:
    """``eva_config`` (peft's EvaConfig) fills the EVA options not passed."""
    options = dict(options)
    config = options.pop("eva_config", None)
    if config is not None:
        for key in _EVA_CONFIG_FIELDS:
            options.setdefault(key, getattr(config, key))
    return options


def _eva_init(W, r, scaling, *, backend=None, bases=None, eva=None, whiten=False, adjust_scaling_factors=True,
              **estimator_options):
    """``eva``: what the estimator found for this layer (components, singular values, rank, the layer's alpha)."""
    if eva is None:
        raise ValueError("loram_fast.eva: no input statistics (init_model collects them from dataloader=)")
    components, singular_values, rank, alpha = eva
    if rank == 0:
        empty = torch.zeros(0, W.shape[1], device=W.device)
        return LayerInit(A=empty, B=torch.zeros(W.shape[0], 0, device=W.device), scaling=scaling, rank=0,
                         lora_alpha=alpha, owned=True)
    if rank != r and adjust_scaling_factors:
        alpha = alpha * rank / r
    A = _eva.adapter_a(components, singular_values, rank, whiten).to(W.device)
    return LayerInit(A=A, B=torch.zeros(W.shape[0], rank, device=W.device), scaling=scaling, rank=rank,
                     lora_alpha=alpha, owned=True, as_is=True)  # peft copies the fp32 components as they are


register(Method(
    name="eva", init=_eva_init, residual=False, needs_data=True, data_kind="eva", expand=_expand_eva,
    description="EVA: A = principal components of each layer's inputs (incremental PCA until converged), B = 0, "
                "ranks redistributed by explained variance (rho); W untouched",
    options={"rho": _opt.real_in(lambda v: v >= 1, "a number >= 1 (as peft's EvaConfig)"),
             "tau": _opt.real_in(lambda v: 0 < v <= 1, "a number in (0, 1]"), "use_label_mask": _opt.boolean(),
             "label_mask_value": _opt.integer(), "whiten": _opt.boolean(), "adjust_scaling_factors": _opt.boolean(),
             "eva_config": _opt.peft_config("EvaConfig", *_EVA_CONFIG_FIELDS)},
    check=lambda shape, r, **o: None,
    reference="peft eva.py (get_eva_state_dict, initialize_lora_eva_weights); arXiv 2410.07170"))


def _orthogonal_init(W, r, scaling, *, backend=None, bases=None, seed=None):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return _orthogonal.orthogonal_init(W, r, scaling, generator=generator)


register(Method(name="orthogonal", residual=False, init=_orthogonal_init, check=_orthogonal.check_rank,
                init_sharded=_orthogonal_init,  # uses W's shape and device only
                options={"seed": _opt.integer(0, optional=True)},
                description="Orthogonal: A and B from the two halves of a random r×r orthogonal matrix (B A = 0); "
                            "W untouched",
                reference="peft LoraLayer.orthogonal_init"))
register(Method(name="mica", residual=False, check=_svd.check_rank,
                options={"solver": _opt.choice("iterative", "svd")},
                init=lambda W, r, scaling, *, backend=None, bases=None, solver="iterative": _svd.mica_init(
                    W, r, scaling, solver, memo=bases),
                description="MiCA: B = the r minor left singular vectors (shift-and-invert iteration or the full "
                            "SVD), A = 0, B frozen; W untouched",
                reference="peft LoraLayer.mica_init + MiCALinearVariant; arXiv 2604.01694"))


_LOFTQ_OPTIONS = {"loftq_bits": _opt.int_choice(4, 8), "loftq_iter": _opt.integer(1)}


def _expand_loftq(options: dict) -> dict:
    """``loftq_config`` (peft's LoftQConfig, or LoraConfig.loftq_config's dict) fills what is not passed."""
    options = dict(options)
    config = options.pop("loftq_config", None)
    if config is not None:
        for key, check in _LOFTQ_OPTIONS.items():
            value = config.get(key) if isinstance(config, dict) else getattr(config, key)
            if key not in options and value is not None:
                options[key] = check(key, value)
    return options


def _loftq_init(W, r, scaling, *, backend=None, bases=None, **options):
    return _loftq.loftq_init(W, r, scaling, backend=backend, **options)


register(Method(name="loftq", residual=True, replaces_weight=True, init=_loftq_init, check=_loftq.check_rank,
                expand=_expand_loftq,
                options={**_LOFTQ_OPTIONS, "solver": _opt.choice(*_loftq.SOLVERS), "niter": _opt.integer(0),
                         "loftq_config": _opt.peft_config("LoftQConfig", "loftq_bits", "loftq_iter",
                                                          allow_dict=True)},
                description="LoftQ: base weight replaced by its NF4/int8 quantisation Q (bitsandbytes' own), B A = "
                            "the top-r SVD of W − Q, alternated loftq_iter times",
                reference="peft loftq_utils.loftq_init + LoraLayer.loftq_init; arXiv 2310.08659"))


_NLORA_REF = "TracyGuo2001/NLoRA peft fork (nlora_init, slora_init, inttune.py); arXiv 2502.14482"


def _nlora_method(name: str, frozen: tuple, description: str) -> Method:
    def init_sharded(op, r, scaling, *, backend=None, bases=None, **options):
        return _nlora.nlora_init_sharded(op, r, scaling, frozen=frozen, **options)

    return Method(name=name, residual=False, description=description, middle=True, init_sharded=init_sharded,
                  options={"nystrom": _opt.choice(*_nlora.NYSTROM), "residual": _opt.boolean()},
                  check=_nlora.check_rank, reference=_NLORA_REF,
                  init=lambda W, r, scaling, *, backend=None, bases=None, **o: _nlora.nlora_init(W, r, scaling,
                                                                                                 frozen=frozen, **o))


register(_nlora_method("nlora", (), "NLoRA: A = W[:r,:], B = W[:,:r], r×r N = W[:r,:r] between them; W untouched"))
register(_nlora_method("inttune", ("lora_A", "lora_B"), "IntTune: the NLoRA init with only the r×r N trainable"))
_slora_init = lambda W, r, scaling, *, backend=None, bases=None: _nlora.slora_init(W, r, scaling)  # noqa: E731
register(Method(name="slora", residual=False, middle=True, check=_nlora.check_rank, reference=_NLORA_REF,
                description="SLoRA: Kaiming A and r×r N, zero B; W untouched",
                init=_slora_init, init_sharded=_slora_init))  # uses W's shape and device only
