"""Compute every target's :class:`~loram_fast.methods.common.LayerInit` (read-only), then write them all in one
:class:`~loram_fast.transaction.Transaction`: the shared core of ``init_model`` and the peft hook."""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from .methods.common import LayerInit
from .registry import Method
from .targets import LoraTarget
from .transaction import Transaction

logger = logging.getLogger(__name__)


def compute(method: Method, targets: list[LoraTarget], options: dict, backend, progress,
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
                raise type(exc)(f"{_culprits(targets, idx, views)}: {exc}") from exc
            for i, res in zip(idx, results):
                inits[i] = res
            progress.update(len(idx))
            continue
        for i, W in zip(idx, views):
            t = targets[i]
            try:
                extra = per_layer[i] if per_layer is not None else {}
                inits[i] = method.init(W, t.r, t.scaling, backend=backend, bases=bases, **options, **extra)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{t.describe()}: {exc}") from exc
            progress.update(1)
    return inits


def _culprits(targets, idx, views) -> str:
    """The modules of a failed batch to name: those holding NaN/Inf when any do, else all of them."""
    bad = [i for i, W in zip(idx, views) if not bool(torch.isfinite(W).all())]
    return ", ".join(targets[i].describe() for i in (bad or idx))


def compute_and_write(spec: Method, targets: list[LoraTarget], options: dict, transaction: Transaction, *,
                      progress=True, per_layer: Optional[Callable[[], list[dict]]] = None) -> None:
    """In ``transaction``: put back earlier residuals, compute every target's init (``per_layer()`` first gives
    each layer's extra inputs, e.g. gradients, from the restored model), then write them all. The kernels run on
    ``transaction.backend``."""
    bar = tqdm(total=2 * len(targets), desc=f"loram_fast {spec.name}", disable=not progress or not targets,
               unit="layer", leave=False)
    try:
        start = time.perf_counter()
        with transaction:
            for t in targets:  # a second init starts from the original weight
                transaction.fold_back(t)
            extra = per_layer() if per_layer is not None else None
            bar.set_postfix_str("compute")
            inits = compute(spec, targets, options, transaction.backend, bar, extra)
            logger.info("loram_fast %s: computed %d layers in %.3f s", spec.name, len(targets),
                        time.perf_counter() - start)
            bar.set_postfix_str("write")
            for t, init in zip(targets, inits):
                transaction.write(t, init)
                bar.update(1)
            transaction.commit_config()
        logger.info("loram_fast %s: initialised %d layers in %.3f s", spec.name, len(targets),
                    time.perf_counter() - start)
    finally:
        bar.close()
