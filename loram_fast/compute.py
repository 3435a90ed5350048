"""Compute every target's :class:`~loram_fast.methods.common.LayerInit` (read-only), then write them all in one
:class:`~loram_fast.transaction.Transaction`: the shared core of ``init_model`` and the peft hook."""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from .methods.common import LayerInit
from .ops.sharded import MatrixOperator, all_max
from .registry import Method
from .targets import LoraTarget
from .transaction import Transaction

logger = logging.getLogger(__name__)


def compute(method: Method, targets: list[LoraTarget], options: dict, backend, progress,
             per_layer: Optional[list[dict]] = None, gather_full_weights: bool = False,
             bases: Optional[dict] = None) -> list[LayerInit]:
    """Adapters for every target, read-only. Errors name the module. Methods with a batched form get same-shaped
    weights together; the others run in module order (so seeded randomness matches a layer-by-layer reference).
    A weight split across ranks goes alone, through :func:`compute_sharded`. ``bases``: the methods' cache shared by
    the layers (LoRAM's bases, MiLoRA's memo of shapes that fell back, ...); a new one per call by default."""
    bases = {} if bases is None else bases
    inits: list[Optional[LayerInit]] = [None] * len(targets)
    groups: dict = {}
    for i, t in enumerate(targets):
        W = t.weight
        if t.sharding is not None:
            try:
                extra = per_layer[i] if per_layer is not None else {}
                inits[i] = compute_sharded(method, t, {**options, **extra}, backend, bases, gather_full_weights)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{t.describe()}: {exc}") from exc
            progress.update(1)
            continue
        key = (t.shape, W.dtype, W.device, t.r) if method.init_batch is not None else i
        groups.setdefault(key, []).append(i)
    for idx in groups.values():
        views = [targets[i].weight_view() for i in idx]
        if method.init_batch is not None and len(idx) > 1:
            try:
                results = method.init_batch(views, targets[idx[0]].r, [targets[i].scaling for i in idx],
                                            backend=backend, bases=bases, **options)
            except (ValueError, TypeError) as exc:
                bad = getattr(exc, "batch_index", None)
                who = targets[idx[bad]].describe() if bad is not None else _culprits(targets, idx, views)
                raise type(exc)(f"{who}: {exc}") from exc
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


def compute_sharded(method: Method, t: LoraTarget, options: dict, backend, bases: dict, gather: bool) -> LayerInit:
    """The init of a weight split across ranks: the method's sharded form on the sharded products, or, with
    ``gather``, the one-process form on the whole weight gathered on every rank. Every rank gets whole A, B (and
    middle); they must agree across ranks (a random init needs the same seed on every rank), else ``ValueError``."""
    op = MatrixOperator(t.weight_view(), t.shape, t.sharding, backend)
    sharded = method.init_sharded is not None and not gather
    grad = options.get("grad")
    if isinstance(grad, torch.Tensor):  # this rank's block of a gradient sharded like the weight (FSDP2)
        grad = MatrixOperator(grad, t.shape, t.sharding, backend)
        options = {**options, "grad": grad if sharded else grad.whole()}
    if sharded:
        init = method.init_sharded(op, t.r, t.scaling, backend=backend, bases=bases, **options)
    else:
        init = method.init(op.whole(), t.r, t.scaling, backend=backend, bases=bases, **options)
    init = init.formed(backend)  # every rank writes its own piece of whole A and B
    _check_agreement(init, t)
    return init


def _check_agreement(init: LayerInit, t: LoraTarget) -> None:
    """Raise on every rank when the ranks computed different adapters (each writes its own piece of them)."""
    mats = [m for m in (init.A, init.B, init.middle) if m is not None]
    squares = torch.stack([m.double().square().sum() for m in mats])
    sums = torch.cat([torch.stack([m.double().sum() for m in mats]), squares])
    # |sum| <= sqrt(numel · sum of squares): the scale of the sums' rounding
    scale = torch.cat([(squares * torch.tensor([float(m.numel()) for m in mats], dtype=torch.float64,
                                                device=squares.device)).sqrt(), squares]).cpu() + 1e-30
    both = all_max(torch.cat([sums, -sums]).to(t.weight_view().device), t.sharding.group).cpu()
    gap = both[: len(sums)] + both[len(sums):]  # max − min over the ranks
    if bool((gap > 1e-4 * scale).any()):
        raise ValueError("the ranks computed different adapters (a random init draws from each rank's own "
                         "generator: seed every rank the same, e.g. torch.manual_seed(0), or pass seed=)")


def _culprits(targets, idx, views) -> str:
    """The modules of a failed batch to name: those holding NaN/Inf when any do, else all of them."""
    bad = [i for i, W in zip(idx, views) if not bool(torch.isfinite(W).all())]
    return ", ".join(targets[i].describe() for i in (bad or idx))


def compute_and_write(spec: Method, targets: list[LoraTarget], options: dict, transaction: Transaction, *,
                      progress=True, per_layer: Optional[Callable[[], list[dict]]] = None,
                      gather_full_weights: bool = False, bases: Optional[dict] = None) -> None:
    """In ``transaction``: put back earlier residuals, compute every target's init (``per_layer()`` first gives
    each layer's extra inputs, e.g. gradients, from the restored model), then write them all. The kernels run on
    ``transaction.backend``. With weights split across ranks, the ranks that share them vote before the
    transaction ends (all commit or all roll back) and only the first rank shows a progress bar. ``bases``: see
    :func:`compute`."""
    for t in targets:
        vote = (t.sharding.group, t.weight_view().device) if t.sharding is not None else None
        if vote is not None and all(vote[0] is not g for g, _ in transaction.vote):
            transaction.vote.append(vote)
    if transaction.vote and _rank() != 0:
        progress = False
    bar = tqdm(total=2 * len(targets), desc=f"loram_fast {spec.name}", disable=not progress or not targets,
               unit="layer", leave=False)
    try:
        start = time.perf_counter()
        with transaction:
            for t in targets:  # a second init starts from the original weight
                transaction.fold_back(t)
            extra = per_layer() if per_layer is not None else None
            bar.set_postfix_str("compute")
            inits = compute(spec, targets, options, transaction.backend, bar, extra, gather_full_weights, bases)
            logger.info("loram_fast %s: computed %d layers in %.3f s", spec.name, len(targets),
                        time.perf_counter() - start)
            bar.set_postfix_str("write")
            for t, init in zip(targets, inits):
                transaction.write(t, init)
                bar.update(1)
            transaction.commit_config()
            transaction.flush()  # the held-back residual writes, last
        logger.info("loram_fast %s: initialised %d layers in %.3f s", spec.name, len(targets),
                    time.perf_counter() - start)
    finally:
        bar.close()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
