"""The one writer: a method's :class:`LayerInit` per layer goes into the peft LoRA layers as one transaction.

First, for every layer, the residual that an earlier loram_fast init left in the base weight is added back (its
record, see below), so that the new init is computed from the original weight. Then per layer, in order: add or
remove the r×r middle matrix (module and peft LoRA variant), store the adapters (rounded to
the base weight's dtype, as the references store them), set which adapter weights are frozen and which train,
subtract the new residual from the base weight and record it. The peft config's ``init_lora_weights`` then names
the method and its options (``loram_fast:<name>[...]``), so a reload rebuilds the same model through the hook.

Every step first puts its exact inverse on an undo log: the old adapter tensors, flags, modules, variant and
frozen names, and a copy of the base weight before its first change (kept on the weight's device, or in host
memory with ``snapshot_device="cpu"``, until the call returns). Any exception, ``KeyboardInterrupt`` included,
runs the log backwards: the model is left bit-identical to before the call. With ``exact_rollback=False`` no
copy is kept: the inverse of a residual write is adding the residual back (exact up to one rounding per entry of
the weight's dtype for each undone write; the rollback says so in its log line).

Held-back writes: a residual whose kernel cannot fail once it starts (LoRAM's closed form on ``cpu-ext`` or
``cuda``, :func:`~loram_fast.ops.residual.write_cannot_fail`), on a weight nothing else in the call changes or reads
afterwards, needs no copy: it is held back and written by :meth:`Transaction.flush`, the transaction's last step
(weights of one shape together, :func:`~loram_fast.ops.residual.apply_residuals`). See :meth:`flush` for Ctrl-C.

Adapters formed in place: LoRAM's A and B (:class:`~loram_fast.ops.rounding.ScaledRounded`, β times a basis) of a
held-back write are formed by :meth:`Transaction.flush` straight into the adapter parameters' own memory, after the
residual writes, with no copy of peft's initial adapters: nothing after them can fail (the compiled
``scale_rounded_`` checks everything before its first store). A parameter whose storage the model also holds under
another name, or that is a view, a DTensor or of another dtype, gets a new tensor swapped in instead, as for every
other method.

Residual records: ``layer._loram_fast_residuals[adapter]`` holds the residual an init subtracted (its factors, or
LoRAM's basis coefficients), so a second init of the same adapter puts it back first (exact up to one rounding
of the weight's dtype) instead of stacking two residuals.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Callable, Optional

import torch

from .methods.common import LayerInit, product_residual
from .ops.bases import dst_basis
from .ops.norms import lowrank_row_norms
from .ops import memory
from .ops.residual import (BasisResidual, LowRankResidual, Residual, apply_residual, apply_residuals,
                           write_cannot_fail)
from .ops.rounding import ScaledRounded, form_all, formable_together, scale_rounded
from .ops.sharded import Sharding, all_reduce, any_rank, is_dtensor, local_part, local_tensor
from .targets import LoraTarget

logger = logging.getLogger(__name__)

_RECORD = "_loram_fast_residuals"
_MISSING = object()


@contextlib.contextmanager
def _sigint_held(deliver_at_exit: bool = True):
    """Hold back SIGINT (Ctrl-C) during the block (main thread, where Python installed the handler; elsewhere a
    no-op). Yields a list that receives a function answering the held interrupt as the previous handler would
    (KeyboardInterrupt, or the default action); with ``deliver_at_exit`` it is called when the block ends."""
    held: list = []
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is None):  # a handler not installed from Python cannot be restored
        yield held
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            held.append(lambda: _answer_sigint(previous, caught[0]))
    if held and deliver_at_exit:
        held[0]()


def _answer_sigint(handler, frame) -> None:
    if callable(handler):
        handler(signal.SIGINT, frame)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signal.SIGINT)


class ReplacedWeight:
    """Record of an init that replaced the base weight (LoftQ: its dequantised weight); the original is gone, so a
    later init of the adapter is refused."""

    def __repr__(self) -> str:
        return "ReplacedWeight()"


def residual_record(layer, adapter: str) -> Optional[Residual]:
    """The residual a loram_fast init left in ``layer``'s base weight for ``adapter`` (None if none)."""
    return getattr(layer, _RECORD, {}).get(adapter)


class Transaction:
    """Writes :class:`LayerInit` s into peft LoRA layers of one adapter; :meth:`rollback` undoes every write.

    Use as a context manager: leaving it by an exception rolls back and re-raises.

    ``config``: the adapter's peft config, whose ``init_lora_weights`` becomes ``record`` (None: left alone, as in
    the hook, where peft's config already says it). ``rounded_residual``: residuals from the adapters as stored
    (rounded to W's dtype), LoRA-GA's convention, instead of the methods' fp32 factors. ``shared_storages``: the
    storages (``untyped_storage().data_ptr()``) the model holds under more than one parameter name; adapters are
    formed in their parameters' own memory only outside them (None, not known: never).
    """

    def __init__(self, adapter: str, *, config=None, record: Optional[str] = None, rounded_residual: bool = False,
                 model=None,
                 snapshot_device=None, backend=None, exact_rollback: bool = True,
                 shared_storages: Optional[set] = None):
        self.adapter = adapter
        # (process group, device) of the ranks that share sharded weights with this one: they vote before leaving
        self.vote: list[tuple] = []
        self.exact_rollback = exact_rollback
        self.shared_storages = shared_storages
        self.config = config
        self.record = record
        self.model = model  # the root the targets' names are relative to (needed to remove a LoRA layer)
        self.layout: list = []  # (name, rank, lora_alpha, removed) of layers whose init set their rank
        self.rounded_residual = rounded_residual
        self.snapshot_device = snapshot_device
        self.backend = backend
        self._undo: list[Callable[[], None]] = []
        self._saved_weights: set[int] = set()
        # residual writes held back until :meth:`flush` (writes that cannot fail once started: no copy needed)
        self._pending: list[tuple[LoraTarget, Residual]] = []
        # adapters formed in their parameter's own memory by :meth:`flush`, after the residuals (no copy, no undo)
        # (target, adapter module name, parameter, value, the parameter's data_ptr when checked)
        self._pending_adapters: list[tuple[LoraTarget, str, torch.nn.Parameter, ScaledRounded, int]] = []
        self._held_sigint = None  # a Ctrl-C that arrived during the flush: delivered once the transaction commits

    # -- the log -------------------------------------------------------------------------------------------------
    def _will(self, undo: Callable[[], None]) -> None:
        """Register the inverse of the step about to run (harmless if that step never ran)."""
        self._undo.append(undo)

    def rollback(self) -> None:
        with torch.no_grad():
            while self._undo:
                self._undo.pop()()
        self._saved_weights.clear()
        self._pending.clear()
        self._pending_adapters.clear()

    def __enter__(self):
        self._inference = torch.inference_mode(False)  # new modules must be ordinary (trainable) tensors
        self._inference.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            other_failed = self._other_rank_failed(exc_type is not None)
            if other_failed and exc_type is None:
                logger.error("loram_fast: another rank failed; restoring this rank's model")
                self.rollback()
                raise RuntimeError("loram_fast: another rank failed while initialising the sharded model (see its "
                                   "error); this rank's model is restored")
            if exc_type is not None:
                if self._undo:  # something was changed already
                    logger.error("loram_fast: writing failed (%s); restoring the model%s", exc_type.__name__,
                                 "" if self.exact_rollback else " (exact_rollback=False: base weights up to "
                                 "rounding)")
                self.rollback()
            else:
                if self._pending or self._pending_adapters:
                    raise RuntimeError("loram_fast: internal error: writes were held back and never flushed; the "
                                       "model is restored")
                self._undo.clear()
                self._saved_weights.clear()
        except BaseException:
            self.rollback()
            raise
        finally:
            self._inference.__exit__(None, None, None)
        held, self._held_sigint = self._held_sigint, None
        if held is not None and exc_type is None:
            held()  # Ctrl-C during the final writes: answered now that the model is complete (KeyboardInterrupt)
        return False

    def _other_rank_failed(self, failed: bool) -> bool:
        """Every rank sharing a sharded weight says whether it failed; True when another one did (all ranks
        roll back together, so none keeps a half-initialised shard)."""
        any_failed = False
        for group, device in self.vote:
            any_failed = any_rank(failed, group, device) or any_failed
        return any_failed and not failed

    # -- steps ---------------------------------------------------------------------------------------------------
    def _save_weight(self, target: LoraTarget, *, always: bool = False) -> None:
        """Keep a copy of the base weight before its first change (``always``: even with ``exact_rollback=False``,
        for a change that has no inverse)."""
        W = target.local_weight()
        if id(target.weight) in self._saved_weights or not (self.exact_rollback or always):
            return
        copy = memory.clone(W.detach(), device=self.snapshot_device or W.device)
        self._will(lambda: W.copy_(copy))
        self._saved_weights.add(id(target.weight))

    def _apply(self, target: LoraTarget, residual: Residual, sign: float) -> None:
        """Apply a residual to the base weight. Without snapshots its inverse (the opposite sign) goes on the log once
        the write is complete; the write runs with Ctrl-C deferred (main thread), so it is never left half done."""
        if self.exact_rollback:
            apply_residual(target.weight_view(), residual, sign, backend=self.backend)
            return
        with _sigint_held():
            try:
                apply_residual(target.weight_view(), residual, sign, backend=self.backend)
            except BaseException:
                logger.error("loram_fast: the residual write of %s failed part way; with exact_rollback=False its "
                             "base weight cannot be restored", target.name)
                raise
            self._will(lambda: apply_residual(target.weight_view(), residual, -sign, backend=self.backend))

    def _residual(self, target: LoraTarget, init: LayerInit) -> Optional[Residual]:
        residual = init.residual
        if residual is not None and self.rounded_residual:
            residual = product_residual(init.scaling, init.B, init.A, init.middle, rounded_to=target.weight.dtype)
        if residual is not None and target.sharding is not None:
            residual = localise(residual, target.sharding, target.shape, target.weight_view().device)
        return residual

    def fold_back(self, target: LoraTarget) -> None:
        """Add back the residual an earlier loram_fast init of this adapter left in the base weight (before the
        new init is computed from the weight, which then is the original again, up to one rounding)."""
        previous = residual_record(target.layer, self.adapter)
        if previous is None:
            return
        if isinstance(previous, ReplacedWeight):
            raise ValueError(f"loram_fast: adapter {self.adapter!r} of {target.describe()} was initialised by loftq, "
                             "which replaced the base weight by its quantised form; the original weight is not in "
                             "the model any more: load the base model again to initialise this adapter anew")
        with torch.no_grad():
            self._save_weight(target)
            self._set_record(target.layer, None)
            self._apply(target, previous, +1.0)

    def write(self, target: LoraTarget, init: LayerInit) -> None:
        """Write one layer (see module docstring); :meth:`fold_back` ran before its init was computed."""
        layer = target.layer
        if self.rounded_residual:
            init = init.formed(self.backend)
        residual = self._residual(target, init)
        with torch.no_grad():
            if init.rank is not None:
                self.layout.append((target.name, init.rank, init.lora_alpha, init.rank == 0))
                if init.rank == 0:
                    self._remove_layer(target)
                    return
            defer = residual is not None and self._can_defer(target, init, residual)
            if not defer:
                init = init.formed(self.backend)  # adapters formed in their parameters only with the residual held
            if residual is not None and not defer:
                self._save_weight(target)
                self._write_held_back(target.weight)  # earlier held-back writes to this weight keep their order
            weights = self._adapter_weights(layer)  # looked up once, while no module of the layer changes
            trainable = any(w.requires_grad for w in weights.values())
            if init.rank is not None and init.rank != layer.r[self.adapter]:
                self._resize(layer, init.rank, init.lora_alpha)
                weights = None
            if self._set_middle(layer, init.middle is not None):
                weights = None
            for name, value in init.adapters().items():
                if isinstance(value, ScaledRounded):
                    param = (weights or {}).get(name)
                    param = getattr(layer, name)[self.adapter].weight if param is None else param
                    if self._in_place(param, value):
                        self._pending_adapters.append((target, name, param, value, param.data.data_ptr()))
                        continue
                    value = value.tensor(self.backend)
                self._set_adapter(target, name, value, owned=init.owned, as_is=init.as_is)
            self._set_frozen(layer, init.frozen, trainable, weights)
            if defer:
                self._pending.append((target, residual))
            elif residual is not None:
                self._apply(target, residual, -1.0)
            if init.new_weight is not None:
                self._replace(target, init.new_weight)
            self._set_record(layer, ReplacedWeight() if init.new_weight is not None else None if residual is None
                             else residual.without_bases() if isinstance(residual, BasisResidual) else residual)
            self._set_dora_magnitude(target, init)

    def _can_defer(self, target: LoraTarget, init: LayerInit, residual: Residual) -> bool:
        """Whether this residual write can wait for :meth:`flush`: a kernel that cannot fail once it starts (LoRAM's
        closed form, compiled), on a weight that no step of this call changed or copied yet, of a one-process
        model, where nothing later in the call reads the written weight (no DoRA magnitude, no replaced weight)."""
        if target.sharding is not None or self.vote or init.new_weight is not None:
            return False
        if id(target.weight) in self._saved_weights or target.layer.use_dora.get(self.adapter, False):
            return False
        return write_cannot_fail(target.weight_view(), residual, backend=self.backend)

    def _write_held_back(self, weight) -> None:
        """Write now the held-back residuals of ``weight`` (a weight shared by several targets whose next write cannot
        be held back): every weight gets its residuals in the order of the targets, as without holding back."""
        mine = [(t, res) for t, res in self._pending if t.weight is weight]
        if not mine:
            return
        self._pending = [(t, res) for t, res in self._pending if t.weight is not weight]
        for t, res in mine:
            self._apply(t, res, -1.0)

    def flush(self) -> None:
        """Write the held-back residuals, then form the held-back adapters in their parameters' own memory: the last
        steps of the transaction, after every other change. Each write runs on a kernel that checks everything before
        its first store and cannot stop after it, so no weight copy is kept for them, and the adapters, written
        after every step that can fail, keep no copy of the old ones at all (peft's initial A and B). Ctrl-C (main
        thread) is held during these writes and answered once the transaction has committed: the model is then
        complete, as if the interrupt came just after the call returned. Should a residual write raise all the
        same, the weights written before it get their residual added back (up to one rounding of their dtype; the
        error log says so) and no adapter has been touched."""
        pending, self._pending = self._pending, []
        adapters, self._pending_adapters = self._pending_adapters, []
        in_place, ordinary = [], []
        for item in adapters:  # a parameter whose memory changed since (a later write of it, which wins, as in
            # order) is checked again; what no longer passes is stored the ordinary way, undoably
            target, name, param, value, ptr = item
            if param.data.data_ptr() == ptr or self._in_place(param, value):
                in_place.append((param.data, value))
            else:
                ordinary.append(item)
        if in_place and not formable_together(in_place):
            ordinary, in_place = adapters, []  # one call could not form them all: each the ordinary way, in order
        for target, name, param, value, _ in ordinary:
            self._set_adapter(target, name, value.tensor(self.backend), owned=True, as_is=True)
        if not pending and not in_place:
            return
        done: list[tuple[torch.Tensor, Residual]] = []  # (weight view, residual) of the completed writes

        def undo():
            if len(done) < len(pending):
                logger.error("loram_fast: a held-back residual write failed after %d of %d weights; those %d are "
                             "restored up to one rounding of their dtype", len(done), len(pending), len(done))
            for W, residual in reversed(done):
                apply_residual(W, residual, +1.0, backend=self.backend)

        self._will(undo)
        with _sigint_held(deliver_at_exit=False) as held:
            if pending:
                apply_residuals([(target.weight_view(), residual) for target, residual in pending], -1.0,
                                backend=self.backend, done=done)
            if in_place:
                form_all(in_place, self.backend)
        if held:
            self._held_sigint = held[0]

    def _replace(self, target: LoraTarget, new_weight: torch.Tensor) -> None:
        """The base weight becomes ``new_weight`` (out×in, rounded once to the weight's dtype). It has no inverse, so
        the weight is copied first even with ``exact_rollback=False``."""
        if target.sharding is not None:
            raise NotImplementedError(f"loram_fast: {target.describe()}: a replaced base weight cannot be written "
                                      "into shards")
        W = target.weight_view()
        if tuple(new_weight.shape) != tuple(W.shape):
            raise ValueError(f"loram_fast: {target.describe()}: replacement weight of shape "
                             f"{tuple(new_weight.shape)} for a weight of shape {tuple(W.shape)}")
        self._save_weight(target, always=True)
        W.copy_(new_weight)

    def _set_dora_magnitude(self, target: LoraTarget, init: LayerInit) -> None:
        """DoRA: the magnitude vector becomes the row norms of ``W + s·B A`` (the new residual weight and adapters),
        as peft's DoRA layer computes it when it is created, so the output is unchanged at step 0. A weight split
        across ranks: each rank's rows (row shards, gathered) or partial sums of squares (column shards,
        all-reduced), from the adapters as stored."""
        layer = target.layer
        if not layer.use_dora.get(self.adapter, False) or self.adapter not in layer.lora_magnitude_vector:
            return  # no DoRA, or the hook path: peft creates the DoRA layer after this init, from these weights
        magnitude = layer.lora_magnitude_vector[self.adapter].weight
        A = layer.lora_A[self.adapter].weight
        B = layer.lora_B[self.adapter].weight
        scaling = layer.scaling[self.adapter]
        sh = target.sharding
        if sh is None:
            norms = lowrank_row_norms(target.weight_view().to(A.device), B, A, scaling)
        else:
            W = target.weight_view()
            A = init.A.to(target.weight.dtype).to(device=W.device, dtype=A.dtype)
            B = init.B.to(target.weight.dtype).to(device=W.device, dtype=B.dtype)
            if sh.dim == 0:
                norms = sh.gather(lowrank_row_norms(W, sh.local_rows(B), A, scaling))
            else:
                part = lowrank_row_norms(W, B, sh.local_rows(A.T).T, scaling)
                norms = all_reduce(part.double().square(), sh.group).sqrt().to(part.dtype)
        if is_dtensor(magnitude):  # this rank's piece, in place
            old = local_tensor(magnitude.data)
            saved = old.clone()
            self._will(lambda: old.copy_(saved))
            old.copy_(local_part(norms.to(device=old.device, dtype=old.dtype), magnitude))
            return
        old = magnitude.data
        self._will(lambda: setattr(magnitude, "data", old))
        magnitude.data = norms.to(device=old.device, dtype=old.dtype)

    def _resize(self, layer, rank: int, lora_alpha: float) -> None:
        """Re-create this adapter of ``layer`` at ``rank`` with peft's ``update_layer`` (as peft's EVA does); undo
        puts back every per-adapter entry (modules, r, alpha, scaling, ...) and every requires_grad flag."""
        import copy as _copy

        if self.config is None:
            raise ValueError("loram_fast: changing an adapter's rank needs its peft config")
        containers = [v for v in list(layer.__dict__.values()) + list(layer._modules.values())
                      if isinstance(v, (dict, torch.nn.ModuleDict, torch.nn.ParameterDict))]
        saved = [(c, c[self.adapter] if self.adapter in c else _MISSING) for c in containers]
        flags = [(p, p.requires_grad) for p in layer.parameters()]

        def undo():
            for c, value in saved:
                if value is _MISSING:
                    if self.adapter in c:
                        del c[self.adapter]
                else:
                    c[self.adapter] = value
            for p, flag in flags:
                p.requires_grad_(flag)

        self._will(undo)
        config = _copy.copy(self.config)
        config.init_lora_weights = True  # B = 0, A overwritten next (peft's EVA passes "eva": the same)
        layer.update_layer(self.adapter, r=rank, lora_alpha=lora_alpha, config=config)

    def _remove_layer(self, target: LoraTarget) -> None:
        """Replace the LoRA layer by its base layer in its parent (peft's EVA for a layer given rank 0)."""
        if self.model is None:
            raise ValueError(f"loram_fast: removing the LoRA layer of {target.describe()} needs the model")
        parent_name, _, child = target.name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        layer = getattr(parent, child)
        self._will(lambda: setattr(parent, child, layer))
        setattr(parent, child, layer.get_base_layer())

    def commit_config(self) -> None:
        """Record the method in the peft config (after every layer is written); where an init set ranks, also the
        config's rank_pattern, alpha_pattern and target_modules, as peft's EVA writes them."""
        if self.config is None or self.record is None:
            return
        old = self.config.init_lora_weights
        self._will(lambda: setattr(self.config, "init_lora_weights", old))
        self.config.init_lora_weights = self.record
        if self.layout:
            self._commit_layout()

    def _commit_layout(self) -> None:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import _find_minimal_target_modules
        from peft.utils.constants import MIN_TARGET_MODULES_FOR_OPTIMIZATION

        config = self.config
        prefix = "base_model.model."
        rank_pattern, alpha_pattern, targets = {}, {}, []
        for name, rank, alpha, removed in self.layout:
            if removed:
                continue
            short = name.replace(prefix, "")
            targets.append(short)
            if rank != config.r:
                rank_pattern[short] = rank
            if alpha != config.lora_alpha:
                alpha_pattern[short] = alpha
        if len(targets) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION and self.model is not None:
            others = [n.replace(prefix, "") for n, m in self.model.named_modules() if not isinstance(m, LoraLayer)]
            targets = _find_minimal_target_modules(targets, others)
        old = (config.target_modules, config.rank_pattern, config.alpha_pattern)

        def undo():
            config.target_modules, config.rank_pattern, config.alpha_pattern = old

        self._will(undo)
        config.target_modules, config.rank_pattern, config.alpha_pattern = targets, rank_pattern, alpha_pattern

    def _adapter_weights(self, layer) -> dict[str, torch.nn.Parameter]:
        """This adapter's matrices in ``layer``, those it has: ``{"lora_A": weight, "lora_B": ..., "lora_N": ...}``.
        Whether it trains at all is whether any of them requires grad (frozen adapters stay frozen)."""
        modules = layer._modules
        found = {}
        for name in ("lora_A", "lora_B", "lora_N"):
            container = modules.get(name)
            if container is not None and self.adapter in container:
                found[name] = container[self.adapter].weight
        return found

    def _set_adapter(self, target: LoraTarget, name: str, value: torch.Tensor, owned: bool = False,
                     as_is: bool = False) -> None:
        param = getattr(target.layer, name)[self.adapter].weight
        # rounded to the base weight's dtype (as the references store them; ``as_is``: not), held in the
        # parameter's own dtype, shape and device; a copy unless the method owns ``value`` outright (it may be a view
        # of W, a cached basis or a factor a residual record keeps)
        narrow = target.weight.dtype in (torch.bfloat16, torch.float16)
        if (not as_is and narrow and value.dtype == param.dtype == torch.float32
                and value.device == param.device):
            # fp32 adapters of a bf16 / fp16 weight: rounded through the weight's dtype in one pass (scale_rounded:
            # the same bits as .to(W).to(fp32)), in place in the method's own tensor when it owns it, else into
            # fresh memory
            src = value.reshape(param.shape)
            in_place = owned and src.is_contiguous()
            if not src.is_contiguous():
                src, in_place = memory.clone(src), True
            new = scale_rounded(src, 1.0, target.weight.dtype, out=src if in_place else None, backend=self.backend)
        else:
            rounded = value if as_is else value.to(target.weight.dtype)
            new = rounded.to(device=param.device, dtype=param.dtype).reshape(param.shape)
            if new.data_ptr() == value.data_ptr() and not owned:
                new = new.clone()
        data = param.data
        if _owns_storage(data):
            self._swap(param, new.contiguous())
        else:
            # a view into a larger buffer (a flat parameter, a shared storage) or a DTensor (FSDP2, distribute_tensor:
            # this rank's piece of ``new``) is written in place
            local = local_tensor(data)
            old = local.clone()
            self._will(lambda: local.copy_(old))
            local.copy_(local_part(new, param))

    def _in_place(self, param: torch.nn.Parameter, value: ScaledRounded) -> bool:
        """Whether ``value`` may be formed in ``param``'s own memory at the flush: a plain tensor that is its whole
        storage, which no other parameter name of the model reaches (a tied adapter would change with it), passing
        every check of the compiled kernel."""
        data = param.data
        return (self.shared_storages is not None and _owns_storage(data)
                and data.untyped_storage().data_ptr() not in self.shared_storages
                and value.forms_in_place(data, self.backend))

    def _swap(self, param: torch.nn.Parameter, new: torch.Tensor) -> None:
        """``param`` holds ``new`` (its own storage swapped, not overwritten: the old one is the exact undo, no copy
        made); a held-back in-place write of the same parameter, now superseded, is dropped."""
        data = param.data
        self._will(lambda: setattr(param, "data", data))
        self._pending_adapters = [w for w in self._pending_adapters if w[2] is not param]
        param.data = new

    def _set_middle(self, layer, wanted: bool) -> bool:
        """Create (or remove) ``lora_N[adapter]`` and the middle-matrix variant, with undo; True when it did."""
        from .peft_variant import add_middle, remove_middle

        container = layer._modules.get("lora_N")
        has = container is not None and self.adapter in container
        if wanted == has:
            if wanted:
                add_middle(layer, self.adapter)  # re-installs the variant if a later peft call replaced it
            return False
        saved = {"lora_N": layer.__dict__.get("_modules", {}).get("lora_N", _MISSING),
                 "names": layer.adapter_layer_names,
                 "variant": layer.lora_variant.get(self.adapter, _MISSING),
                 "module": layer.lora_N[self.adapter] if has else _MISSING}

        def undo():
            if saved["lora_N"] is _MISSING:
                if "lora_N" in layer._modules:
                    del layer._modules["lora_N"]
            else:
                layer._modules["lora_N"] = saved["lora_N"]
                if saved["module"] is _MISSING:
                    saved["lora_N"].pop(self.adapter, None)
                else:
                    saved["lora_N"][self.adapter] = saved["module"]
            layer.adapter_layer_names = saved["names"]
            if saved["variant"] is _MISSING:
                layer.lora_variant.pop(self.adapter, None)
            else:
                layer.lora_variant[self.adapter] = saved["variant"]

        self._will(undo)
        (add_middle if wanted else remove_middle)(layer, self.adapter)
        return True

    def _set_frozen(self, layer, frozen: tuple, trainable: bool, weights: Optional[dict] = None) -> None:
        """Exactly ``frozen`` of this adapter's matrices stay frozen (peft's frozen-weight registry, re-applied by
        ``set_adapter``); the others train iff the adapter trained before. ``weights``: :meth:`_adapter_weights`, when
        the caller has it for the layer's current modules."""
        from .peft_variant import set_frozen

        weights = self._adapter_weights(layer) if weights is None else weights
        names = list(weights)
        flags = {n: w.requires_grad for n, w in weights.items()}
        registry = layer.__dict__.get("frozen_peft_weight_names", _MISSING)
        if (not frozen and (registry is _MISSING or not registry or self.adapter not in registry)
                and all(flag == trainable for flag in flags.values())):
            return  # nothing would change

        def undo():
            if registry is _MISSING:
                layer.__dict__.pop("frozen_peft_weight_names", None)
            else:
                layer.frozen_peft_weight_names = registry
            for n, flag in flags.items():
                getattr(layer, n)[self.adapter].weight.requires_grad_(flag)

        self._will(undo)
        set_frozen(layer, self.adapter, frozen)
        for n in names:
            getattr(layer, n)[self.adapter].weight.requires_grad_(trainable and n not in frozen)

    def _set_record(self, layer, residual: Optional[Residual]) -> None:
        records = layer.__dict__.get(_RECORD, _MISSING)
        old = _MISSING if records is _MISSING else records.get(self.adapter, _MISSING)

        def undo():
            current = layer.__dict__.get(_RECORD)
            if current is None:
                return
            if old is _MISSING:
                current.pop(self.adapter, None)
            else:
                current[self.adapter] = old

        self._will(undo)
        if records is _MISSING:
            records = layer.__dict__.setdefault(_RECORD, {})
        if residual is None:
            records.pop(self.adapter, None)
        else:
            records[self.adapter] = residual


def _owns_storage(data: torch.Tensor) -> bool:
    """A plain contiguous tensor that is its whole storage (not a view into a larger buffer, not a DTensor)."""
    return (type(data) is torch.Tensor and data._base is None and data.is_contiguous()
            and data.untyped_storage().nbytes() == data.numel() * data.element_size())


def localise(residual: Residual, sharding: Sharding, shape: tuple[int, int], device=None) -> LowRankResidual:
    """The part of a whole weight's residual that falls on this rank's block: its rows of the left factor, or its
    columns of the right one (LoRAM's bases are built, or taken from the method, and sliced)."""
    if isinstance(residual, BasisResidual):
        V, U = residual.bases if residual.bases is not None else (
            dst_basis(shape[0], residual.r, kind=residual.kind, device=device),
            dst_basis(shape[1], residual.r, kind=residual.kind, device=device))
        residual = LowRankResidual(residual.coef, V, U.T)
    left, right = residual.left, residual.right
    if sharding.dim == 0:
        left = sharding.local_rows(left)
    else:
        right = sharding.local_rows(right.T).T
    return LowRankResidual(residual.coef, left.contiguous(), right.contiguous())
