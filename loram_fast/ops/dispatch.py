"""The single dispatch point: which backend runs an op.

Backends: ``triton`` (GPU tensors), ``cuda`` (GPU tensors, compiled extension), ``cpu-ext`` (CPU tensors,
compiled extension), ``torch`` (the plain-torch references, always there). Automatic order: GPU tensors
triton → cuda → torch; CPU tensors cpu-ext → torch (see ``_CPU_ORDER``). GPU kernels are launched on the
device of the op's first tensor argument.

Each op module (``ops/<op>.py``) holds the op's plain-torch reference and registers every backend's
implementation with :func:`register` (:func:`lazy` for kernels in ``loram_fast.triton_kernels``, imported on first
use) and the op's fake kernel with :func:`on_native_load` (run once the compiled extension is loaded);
:func:`resolve` picks the first available backend that has an implementation for the tensor's device. Nothing
here knows an op, and no op knows which backend runs it.
``backend=`` or the ``LORAM_FAST_BACKEND`` environment variable forces one; a forced backend that is
unavailable, or does not run on the tensor's device, raises ``RuntimeError``; an op the forced backend does not
implement runs on the automatic choice (logged once per backend and op), so composite ops (randomized SVD,
OLoRA, sketches) work under any forced backend. An automatically chosen
backend that fails to load falls back quietly (one debug log line).
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Callable

import torch

from ..build import one_line

logger = logging.getLogger(__name__)

BACKENDS = ("triton", "cuda", "cpu-ext", "torch")
_GPU_ORDER = ("triton", "cuda", "torch")
# On CPU the C++ kernels come first where they implement an op: one-pass moments, fused low-precision residual
# updates and tabulated bases beat the torch references (bench/kernels.py); torch covers every other op.
_CPU_ORDER = ("cpu-ext", "torch")
# the compiled backends: their kernels check every argument and allocate everything before their first store, and
# nothing after it can fail, so a write that starts also finishes (no copy is needed to undo a half-done one)
WRITES_CANNOT_FAIL = ("cpu-ext", "cuda")

# op name -> backend -> implementation
_IMPLS: dict[str, dict[str, Callable]] = {}
# (op, device type) -> what _automatic chose: the probes are cached for the process, and register() empties this
_RESOLVED: dict[tuple[str, str], tuple[str, Callable]] = {}


def register(op: str, *backends: str):
    """Decorator: ``fn`` implements ``op`` on each of ``backends``."""
    for backend in backends:
        if backend not in BACKENDS:
            raise ValueError(f"loram_fast.dispatch: unknown backend {backend!r}; valid: {BACKENDS}")

    def deco(fn):
        for backend in backends:
            _IMPLS.setdefault(op, {})[backend] = _on_input_device(fn) if backend in ("triton", "cuda") else fn
        _RESOLVED.clear()
        return fn

    return deco


def lazy(module: str, name: str) -> Callable:
    """A function that imports ``module`` on its first call and calls ``module.name`` (kernel modules that need
    triton stay unimported until a kernel of theirs runs)."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"``{module}.{name}``, imported on first call."
    return call


_NATIVE_SETUP: list[Callable[[], None]] = []
_NATIVE_LOADED = False


def on_native_load(fn: Callable[[], None]) -> Callable[[], None]:
    """Decorator: run ``fn`` once the compiled extension is loaded (the fake kernels of an op's operators); at once
    when it is loaded already."""
    _NATIVE_SETUP.append(fn)
    if _NATIVE_LOADED:
        fn()
    return fn


def _native_setup() -> None:
    global _NATIVE_LOADED
    if not _NATIVE_LOADED:
        _NATIVE_LOADED = True
        for fn in _NATIVE_SETUP:
            fn()


def _on_input_device(fn: Callable) -> Callable:
    """GPU kernels launch on the current CUDA device: make that the device of the op's first tensor argument
    (a model spread over cuda:0 and cuda:1 gets each kernel on its weight's GPU)."""

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        device = first.device if first is not None else kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            with torch.cuda.device(torch.device(device)):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return guarded


@functools.lru_cache(maxsize=None)
def _probe(backend: str) -> bool | str:
    """True when ``backend`` can run here, else one line saying why not. Loading the backend
    registers its implementations."""
    ok = _probe_uncached(backend)
    return True if ok is True else one_line(ok)


def _probe_uncached(backend: str) -> bool | str:
    if backend == "torch":
        return True
    if backend == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            return "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on CPU, slowly)"
        try:
            importlib.import_module("triton")
        except Exception as exc:  # pragma: no cover - depends on the environment
            return f"triton is not importable: {exc}"
        try:
            importlib.import_module("loram_fast.triton_kernels")
        except Exception as exc:  # pragma: no cover
            return f"loram_fast.triton_kernels failed to import: {exc}"
        return True
    if backend in ("cpu-ext", "cuda"):
        from loram_fast import _ext

        status = _ext.status(cuda=backend == "cuda")
        if status is True:
            _native_setup()
        return status
    raise ValueError(f"loram_fast.dispatch: unknown backend {backend!r}; valid: {BACKENDS}")


def backends() -> dict[str, bool | str]:
    """``{backend: True or one line (at most 200 characters) saying why it is unavailable}``."""
    return {b: _probe(b) for b in BACKENDS}


def _forced(backend: str | None) -> str | None:
    if backend is None:
        backend = os.environ.get("LORAM_FAST_BACKEND") or None
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"loram_fast: unknown backend {backend!r}; valid: {BACKENDS}")
    return backend


def resolve(op: str, device: torch.device | str, backend: str | None = None) -> tuple[str, Callable]:
    """(backend name, implementation) for ``op`` on tensors living on ``device``."""
    forced = _forced(backend)
    if forced is None:  # the common case, several times per layer: remembered per op and device type
        kind = device.type if isinstance(device, torch.device) else torch.device(device).type
        found = _RESOLVED.get((op, kind))
        if found is None:
            found = _RESOLVED[(op, kind)] = _automatic(op, torch.device(kind))
        return found
    device = torch.device(device)
    if forced is not None:
        ok = _probe(forced)
        if ok is not True:
            raise RuntimeError(f"loram_fast: backend {forced!r} was requested but is unavailable: {ok}")
        if forced in ("cuda", "triton") and device.type != "cuda" and not (
            forced == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
        ):
            raise RuntimeError(f"loram_fast: backend {forced!r} needs CUDA tensors, got a tensor on {device}")
        if forced == "cpu-ext" and device.type != "cpu":
            raise RuntimeError(f"loram_fast: backend 'cpu-ext' needs CPU tensors, got a tensor on {device}")
        impl = _IMPLS.get(op, {}).get(forced)
        if impl is not None:
            return forced, impl
        # a forced backend is a preference per op: an op it lacks runs on the next backend that has it
        name, impl = _automatic(op, device)
        if (forced, op) not in _FELL_BACK:
            _FELL_BACK.add((forced, op))
            logger.info("loram_fast: backend %r has no %r; using %r for that op", forced, op, name)
        return name, impl
    return _automatic(op, device)


_FELL_BACK: set = set()


def _automatic(op: str, device: torch.device) -> tuple[str, Callable]:
    order = _GPU_ORDER if device.type == "cuda" else _CPU_ORDER
    for name in order:
        if _probe(name) is not True:
            continue
        impl = _IMPLS.get(op, {}).get(name)
        if impl is not None:
            return name, impl
    raise RuntimeError(f"loram_fast: no backend implements op {op!r} on {device}")  # pragma: no cover
