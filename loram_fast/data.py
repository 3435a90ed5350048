"""Gradient estimation from data, for the gradient-based inits (LoRA-One, LoRA-GA).

``estimate_gradients(model, weights, ...)`` returns, for each target base weight, the mean over batches of
∂loss/∂W with the adapters disabled, as an fp32 out×in matrix on the weight's device.

How the data comes in (one of):
- ``dataloader``: an iterable of batches; each batch is a dict for the model, the loss is ``model(**batch).loss``,
  or ``loss_fn(model, batch)`` when given;
- ``train_step``: a callable that runs forward and backward itself (peft's LoRA-GA convention), with peft's
  semantics: what ``.grad`` holds at the end (a ``zero_grad()`` inside the step clears what came before;
  accumulated in the weight's dtype) divided by the number of backward passes that reached the weight.

Modes:
- ``"full"``: each weight's gradient is accumulated in fp32 on its device by a post-accumulate-grad hook, which
  frees ``.grad`` at once (no host round trips; one fp32 out×in accumulator per weight).
- ``"sketch"``: no full gradient is ever held. Hooks capture each layer's input X (tokens×in) and output gradient
  Δ (tokens×out), and accumulate two random sketches of ``G = Δᵀ X``: ``Y = G Ω = Δᵀ (X Ω)`` (out×k) and
  ``Z = Ψ G = (Ψ Δᵀ) X`` (l×in), with Gaussian Ω (in×k), Ψ (l×out), k = rank + oversample, l = 2k + 1.
  The low-rank approximation is ``G ≈ Q (Ψ Q)⁺ Z`` with ``Q = orth(Y)`` (Tropp, Yurtsever, Udell, Cevher 2017,
  single-pass streaming). Exact when rank(G) ≤ k (G's rank is at most the number of tokens seen).

Everything the estimation changes is restored afterwards: ``requires_grad`` flags, ``.grad`` of every
parameter, training mode, and the adapters' enabled state.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from .ops.sharded import all_reduce, is_dtensor, local_tensor

logger = logging.getLogger(__name__)


@dataclass
class SketchedGradient:
    """A low-rank gradient ``G ≈ left @ right`` (out×k @ k×in), from the sketch mode."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def shape(self):
        return (self.left.shape[0], self.right.shape[1])

    def dense(self) -> torch.Tensor:
        return self.left @ self.right


def _move(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _move(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(v, device) for v in batch)
    return batch


@contextlib.contextmanager
def _estimation_state(model: nn.Module, lora_layers: list, train: bool):
    """Freeze every parameter, keep their .grad aside, disable adapters, set the mode; restore on exit."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    mode = model.training
    disabled = [getattr(layer, "disable_adapters", False) for layer in lora_layers]
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for layer in lora_layers:
            layer.enable_adapters(False)
        model.train(train)
        with torch.enable_grad():  # a caller's no_grad() must not starve the estimation
            yield
    finally:
        # adapters first: peft's enable_adapters(True) re-enables gradients of every active adapter, so the saved
        # flags (frozen adapters, inference_mode) are put back after it
        for layer, was_disabled in zip(lora_layers, disabled):
            layer.enable_adapters(not was_disabled)
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(mode)


def _run(model, dataloader, loss_fn, train_step, max_batches, progress=None) -> int:
    if train_step is not None:
        if dataloader is not None or loss_fn is not None:
            raise ValueError("loram_fast: pass either train_step or dataloader (with an optional loss_fn), not both")
        train_step()
        return 1
    if dataloader is None:
        raise ValueError("loram_fast: gradient-based methods need data: pass dataloader=batches (dicts for the "
                         "model; loss = model(**batch).loss), optionally loss_fn=(model, batch) -> loss, or "
                         "train_step=callable that runs forward and backward itself")
    device = next(model.parameters()).device
    n = 0
    for batch in dataloader:
        if max_batches is not None and n >= max_batches:
            break
        if loss_fn is None and not isinstance(batch, Mapping):
            raise TypeError(f"loram_fast: batch {n} is a {type(batch).__name__}, but without loss_fn each batch must "
                            "be a dict of model inputs (e.g. {'input_ids': ids, 'labels': ids}, loss = "
                            "model(**batch).loss); pass loss_fn=(model, batch) -> loss for other batches")
        batch = _move(batch, device)
        try:
            loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
        except RuntimeError as exc:
            if "Inference tensors" in str(exc):
                raise RuntimeError(f"loram_fast: batch {n} holds tensors made under torch.inference_mode(), which "
                                   "autograd cannot use; create the batches outside inference_mode") from exc
            raise
        if loss is None or not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError("loram_fast: the loss must be a scalar tensor (model(**batch).loss or loss_fn's result)")
        loss.backward()
        n += 1
        if progress is not None:
            progress.update(1)
    if n == 0:
        raise ValueError("loram_fast: the dataloader yielded no batch")
    return n


def estimate_gradients(model: nn.Module, weights: list[nn.Parameter], views: list[bool], lora_layers: list, *,
                       dataloader: Optional[Iterable] = None, loss_fn: Optional[Callable] = None,
                       train_step: Optional[Callable] = None, mode: str = "full", sketch_rank: int = 64,
                       oversample: int = 8, max_batches: Optional[int] = None, train: bool = True,
                       seed: int = 0, base_layers: Optional[list] = None, names: Optional[list[str]] = None,
                       progress: bool = False, desc: str = "loram_fast: gradients"):
    """Mean gradient of each weight in ``weights`` (``views[i]``: the weight is stored transposed, in×out);
    see the module docstring. Returns fp32 out×in tensors (``"full"``) or :class:`SketchedGradient` (``"sketch"``).
    ``names`` name the modules in errors; ``progress`` shows a tqdm bar over the batches."""
    if mode not in ("full", "sketch"):
        raise ValueError(f"loram_fast: unknown gradient mode {mode!r}; valid: full, sketch")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("loram_fast: gradient-based inits need autograd, but torch.inference_mode() is active; "
                           "call init_model outside it")
    names = names or [f"weight of shape {tuple(w.shape)}" for w in weights]
    total = max_batches if train_step is None and max_batches is not None else None
    if total is None and train_step is None and hasattr(dataloader, "__len__"):
        total = len(dataloader) if max_batches is None else min(len(dataloader), max_batches)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="batch", disable=not progress, leave=False)
    try:
        with _estimation_state(model, lora_layers, train):
            if mode == "full":
                return _full(model, weights, views, names, dataloader, loss_fn, train_step, max_batches, bar)
            return _sketch(model, weights, views, names, base_layers, dataloader, loss_fn, train_step, max_batches,
                           sketch_rank + oversample, seed, bar)
    finally:
        bar.close()


def _no_gradient(name: str) -> ValueError:
    return ValueError(f"loram_fast: no gradient reached the base weight of {name!r}; is the module part of the "
                      "loss? Leave it out of target_modules (e.g. an unused pooler)")


def _full(model, weights, views, names, dataloader, loss_fn, train_step, max_batches, bar):
    """With a dataloader: every backward pass added into an fp32 accumulator, ``.grad`` freed at once (mean over
    batches). With ``train_step`` (peft's LoRA-GA convention), as peft's ``preprocess_loraga``: the gradient
    accumulates in ``.grad`` (the weight's dtype; a ``zero_grad()`` inside the step clears it) and is divided by
    the number of backward passes that reached the weight."""
    peft_mode = train_step is not None
    # a sharded weight (FSDP2 DTensor): its gradient arrives as this rank's shard, averaged over the ranks by FSDP
    accum = [None if peft_mode else torch.zeros(local_tensor(w).shape, dtype=torch.float32, device=w.device)
             for w in weights]
    counts = [0] * len(weights)
    handles = []
    for i, w in enumerate(weights):
        w.requires_grad_(True)

        def hook(p, i=i):
            counts[i] += 1
            if not peft_mode:
                accum[i].add_(local_tensor(p.grad))
                p.grad = None

        handles.append(w.register_post_accumulate_grad_hook(hook))
    try:
        _run(model, dataloader, loss_fn, train_step, max_batches, bar)
        if peft_mode:
            accum = [None if w.grad is None else local_tensor(w.grad.detach()).float() for w in weights]
    finally:
        for h in handles:
            h.remove()
        if peft_mode:
            for w in weights:
                w.grad = None
    out = []
    for acc, count, transposed, name in zip(accum, counts, views, names):
        if count == 0 or acc is None:
            raise _no_gradient(name)
        acc.div_(count)
        out.append(acc.T if transposed else acc)
    return out


def _mesh_mean(st: dict, w) -> None:
    """Average the sketches Y, Z (and the backward count) over every rank of ``w``'s device mesh."""
    mesh = w.device_mesh
    packed = torch.cat([st["Y"].reshape(-1), st["Z"].reshape(-1),
                        torch.tensor([float(st["count"])], device=st["Y"].device)])
    for dim in range(mesh.ndim):
        all_reduce(packed, mesh.get_group(dim))
    packed /= mesh.size()
    ny = st["Y"].numel()
    st["Y"] = packed[:ny].reshape(st["Y"].shape)
    st["Z"] = packed[ny:ny + st["Z"].numel()].reshape(st["Z"].shape)
    st["count"] = float(packed[-1])


def _sketch(model, weights, views, names, base_layers, dataloader, loss_fn, train_step, max_batches, k, seed, bar):
    from .ops.orth import cholesky_qr

    states = []
    handles = []
    for w, transposed, layer in zip(weights, views, base_layers):
        out_f, in_f = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
        g = torch.Generator(device=w.device).manual_seed(seed + len(states))
        kk, ll = min(k, out_f, in_f), min(2 * k + 1, out_f)
        st = {
            "omega": torch.randn(in_f, kk, generator=g, device=w.device),
            "psi": torch.randn(ll, out_f, generator=g, device=w.device),
            "Y": torch.zeros(out_f, kk, device=w.device),
            "Z": torch.zeros(ll, in_f, device=w.device),
            "count": 0,
        }
        states.append(st)

        def pre_hook(module, args, st=st):
            x = args[0]
            if not x.requires_grad:  # nothing upstream needs a gradient: make the input a leaf that does
                x = x.detach().requires_grad_(True)
            st["x"] = x.detach()
            return (x, *args[1:])

        def fwd_hook(module, args, output, st=st):
            x = st.pop("x")  # kept alive by the hook below until the backward pass reaches this output

            def grad_hook(delta, x=x, st=st):
                X = x.reshape(-1, x.shape[-1]).float()
                D = delta.reshape(-1, delta.shape[-1]).float()
                st["Y"].add_(D.T @ (X @ st["omega"]))  # G Ω = Δᵀ (X Ω)
                st["Z"].add_((D @ st["psi"].T).T @ X)  # Ψ G = (Ψ Δᵀ) X
                st["count"] += 1

            output.register_hook(grad_hook)
            return output

        handles.append(layer.register_forward_pre_hook(pre_hook))
        handles.append(layer.register_forward_hook(fwd_hook))
    try:
        batches = _run(model, dataloader, loss_fn, train_step, max_batches, bar)
    finally:
        for h in handles:
            h.remove()
    out = []
    for st, name, w in zip(states, names, weights):
        if is_dtensor(w):  # data parallel over the weight's mesh: the mean of every rank's sketches
            _mesh_mean(st, w)
        if st["count"] == 0:
            raise _no_gradient(name)
        denom = batches if train_step is None else st["count"]
        Y, Z = st["Y"] / denom, st["Z"] / denom
        Q = cholesky_qr(Y)
        core = torch.linalg.lstsq(st["psi"] @ Q, Z).solution  # k×in
        out.append(SketchedGradient(left=Q, right=core))
    return out


def estimate_covariances(model: nn.Module, base_layers: list, lora_layers: list, *,
                         dataloader: Optional[Iterable] = None, run_model: Optional[Callable] = None,
                         max_batches: Optional[int] = None, names: Optional[list[str]] = None,
                         progress: bool = False, desc: str = "loram_fast: covariances") -> list[torch.Tensor]:
    """Input covariance of each layer in ``base_layers``, as peft's CorDA collects it (``calib_cov_distribution``),
    with the adapters disabled: ``C = mean over samples of X̂ᵀX̂``, ``X̂ = X / |max(X)|`` per sample (X: the sample's
    tokens × in, fp32; the abs of the max, not the max of abs, as peft). peft hooks one forward call per sample
    (batch size 1); a batch of b samples here counts as b samples. Data: ``dataloader`` (dict batches,
    ``model(**batch)``) or ``run_model()`` (peft's convention: a callable that runs the model itself).
    Returns fp32 in×in tensors on each layer's device."""
    if (dataloader is None) == (run_model is None):
        raise ValueError("loram_fast: covariance-based methods (corda) need data: pass dataloader=batches (dicts for "
                         "the model) or run_model=callable that runs the model itself, not both")
    names = names or [f"layer {i}" for i in range(len(base_layers))]
    sums: list = [None] * len(base_layers)
    counts = [0] * len(base_layers)

    def hook(i):
        def collect(module, inputs, output):
            x = inputs[0].detach()
            samples = x.reshape(-1, *x.shape[-2:]) if x.dim() >= 3 else x.unsqueeze(0)
            for X in samples.float():
                X = X / X.max().abs()
                if not bool(torch.isfinite(X).all()):
                    raise ValueError(f"loram_fast: the input of {names[i]!r} holds NaN or Inf values, or a sample "
                                     "whose largest entry is 0")
                cov = X.T @ X
                sums[i] = cov if sums[i] is None else sums[i].add_(cov)
                counts[i] += 1
        return collect

    from tqdm.auto import tqdm

    total = None if dataloader is None or not hasattr(dataloader, "__len__") else (
        len(dataloader) if max_batches is None else min(len(dataloader), max_batches))
    bar = tqdm(total=total, desc=desc, unit="batch", disable=not progress or dataloader is None, leave=False)
    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(base_layers)]
    try:
        with _estimation_state(model, lora_layers, train=False), torch.no_grad():
            if run_model is not None:
                run_model()
            else:
                device = next(model.parameters()).device
                n = 0
                for batch in dataloader:
                    if max_batches is not None and n >= max_batches:
                        break
                    if not isinstance(batch, Mapping):
                        raise TypeError(f"loram_fast: batch {n} is a {type(batch).__name__}; each batch must be a "
                                        "dict of model inputs, or pass run_model=callable")
                    model(**_move(batch, device))
                    n += 1
                    bar.update(1)
                if n == 0:
                    raise ValueError("loram_fast: the dataloader yielded no batch")
    finally:
        for h in handles:
            h.remove()
        bar.close()
    for i, name in enumerate(names):
        if counts[i] == 0:
            raise ValueError(f"loram_fast: no input reached {name!r}; is the module part of the model's forward? "
                             "Leave it out of target_modules")
        sums[i].div_(counts[i])
    return _shared_equal(sums)


def _shared_equal(mats: list[torch.Tensor]) -> list[torch.Tensor]:
    """Equal matrices (layers that read the same input, e.g. q/k/v or gate/up) become one tensor, so per-covariance
    work (CorDA's damping) runs once for them: a cheap fingerprint first, ``torch.equal`` to confirm."""
    kept: dict = {}
    out = []
    for M in mats:
        key = (tuple(M.shape), M.device, float(M.sum()), float(M.diagonal().sum()), float(M[0].sum()))
        for other in kept.get(key, []):
            if torch.equal(other, M):
                M = other
                break
        else:
            kept.setdefault(key, []).append(M)
        out.append(M)
    return out


def _token_selection(batch, use_label_mask: bool, label_mask_value: int):
    """peft's ``prepare_model_inputs_fn_language_modeling``: the (batch, position) indices EVA uses."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError("loram_fast: eva needs dict batches with input_ids (and optionally attention_mask, labels)")
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    if use_label_mask and "labels" in batch:
        mask = torch.logical_and(mask, batch["labels"] != label_mask_value)
    return mask.nonzero()


def estimate_eva(model: nn.Module, lora_layers: list, names: list[str], ranks: list[int], *, dataloader: Iterable,
                 rho: float, tau: float, use_label_mask: bool, label_mask_value: int, config_r: int,
                 max_batches: Optional[int] = None, cache_mib: float = 1024, progress: bool = False,
                 desc: str = "loram_fast: eva"):
    """EVA's statistics (``methods/eva.py``), as peft's ``get_eva_state_dict`` gathers them: returns
    ``({name: (components, singular values)}, {name: rank})``. Layers whose inputs on the first batch are equal
    share one PCA (peft hashes every input entry in Python; here a fingerprint computed on the device). Batches cycle until every layer has converged;
    ``max_batches`` bounds the passes over a batch (then unconverged layers raise; peft loops forever). The layer
    inputs of the first cycle are kept (up to ``cache_mib``) and replayed in later cycles without forward passes:
    the same inputs in the same order per layer, so the same result as peft's repeated forward passes."""
    from itertools import cycle

    from tqdm.auto import tqdm

    from .methods.eva import component_budget, rank_distribution
    from .ops.ipca import IncrementalPCA

    if not hasattr(dataloader, "__len__") or len(dataloader) == 0:
        raise ValueError("loram_fast: eva needs a non-empty dataloader with a length (it cycles through it)")
    max_dim = max(max(p.shape) for p in model.parameters() if p.dim() > 0)
    keep = component_budget(dict(zip(names, ranks)), rho, config_r, max_dim)
    budget = sum(ranks)
    device = next(model.parameters()).device
    state = {"select": None}

    def prepared(x):
        x = x[0] if isinstance(x, (tuple, list)) else x
        return x[state["select"].T.unbind()]

    # the first batch: which layers get equal inputs (peft hashes every entry in Python; here a fingerprint of the
    # values: the shape, the fp64 sum, the sum of squares and a seeded random projection)
    seen: dict = {}
    leader_of: dict = {}
    probes: dict = {}

    def fingerprint(X: torch.Tensor) -> tuple:
        Xd = X.detach().reshape(-1, X.shape[-1]).double()
        if Xd.shape not in probes:
            g = torch.Generator().manual_seed(12345)
            probes[Xd.shape] = (torch.randn(Xd.shape[1], generator=g, dtype=torch.float64).to(Xd.device),
                                torch.randn(Xd.shape[0], generator=g, dtype=torch.float64).to(Xd.device))
        u, v = probes[Xd.shape]
        return (tuple(X.shape), X.dtype, float(Xd.sum()), float(Xd.square().sum()), float((Xd @ u) @ v))

    def identify(name):
        def hook(module, inputs, output):
            leader_of[name] = seen.setdefault(fingerprint(prepared(inputs)), name)
        return hook

    with _estimation_state(model, lora_layers, train=False), torch.no_grad():
        first = _move(next(iter(dataloader)), device)
        state["select"] = _token_selection(first, use_label_mask, label_mask_value)
        handles = [layer.register_forward_hook(identify(n)) for n, layer in zip(names, lora_layers)]
        try:
            model(**first)
        finally:
            for h in handles:
                h.remove()
        shares = {n: leader_of[n] for n in names if leader_of.get(n, n) != n}
        for group_leader in set(shares.values()):
            group = [n for n in names if leader_of.get(n) == group_leader]
            top = max(keep[n] for n in group)
            for n in group:
                keep[n] = top
        leaders = [n for n in names if n not in shares]
        pcas = {n: IncrementalPCA(keep[n], lowrank=True, lowrank_seed=42) for n in leaders}
        converged = {n: torch.zeros(keep[n], dtype=torch.bool) for n in leaders}
        layer_of = dict(zip(names, lora_layers))
        active = {n: True for n in leaders}  # peft registers / removes a hook; here the hook checks this flag
        # the layer inputs of the first cycle through the dataloader, replayed in later cycles instead of forward
        # passes (the model does not change during EVA, so each batch's inputs are the same every cycle)
        replay: dict = {"batches": [], "bytes": 0, "on": cache_mib > 0, "index": 0}

        def svd_update(name, X):
            if X.dim() > 2:
                X = X.reshape(-1, X.shape[-1])
            pca = pcas[name]
            if X.shape[0] < pca.n_components:
                logger.warning("loram_fast eva: skipping a batch for %s: fewer than %d tokens", name, pca.n_components)
                return
            previous = None if pca.components_ is None else pca.components_.clone()
            pca.partial_fit(X.to(torch.float32))
            if previous is not None:
                converged[name] = torch.nn.functional.cosine_similarity(pca.components_, previous) >= tau

        def hook_for(name):
            def hook(module, inputs, output):
                X = prepared(inputs)
                if replay["on"] and len(replay["batches"]) == replay["index"] + 1:  # the first cycle: keep them
                    replay["bytes"] += X.numel() * X.element_size()
                    if replay["bytes"] > cache_mib * 2**20:
                        replay.update(on=False, batches=[])
                    else:
                        replay["batches"][-1][name] = X
                if active[name]:
                    svd_update(name, X)
            return hook

        handles = [layer_of[n].register_forward_hook(hook_for(n)) for n in leaders]
        layer_pca = {**{n: n for n in leaders}, **shares}
        rank = dict(keep)
        bar = tqdm(desc=desc, unit="batch", disable=not progress, leave=False)
        passes = forwards = 0
        try:
            for index, batch in enumerate(cycle(dataloader)):
                index %= len(dataloader)
                for n in leaders:
                    now = bool(torch.all(converged[n][: rank[n]]))
                    if active[n] and now:
                        active[n] = False
                    elif not active[n] and not now:
                        active[n] = True
                if not any(active.values()):
                    break
                if max_batches is not None and passes >= max_batches:
                    late = [n for n in leaders if active[n]]
                    raise ValueError(f"loram_fast: eva: {len(late)} layer(s) did not converge within max_batches="
                                     f"{max_batches} forward passes (tau={tau}), e.g. {late[0]!r}; pass more data, "
                                     "a larger max_batches, or a lower tau")
                if replay["on"] and passes >= len(dataloader):
                    for n in leaders:  # each layer's PCA sees only its own inputs: the order does not matter
                        if active[n]:
                            svd_update(n, replay["batches"][index][n])
                else:
                    batch = _move(batch, device)
                    state["select"] = _token_selection(batch, use_label_mask, label_mask_value)
                    if replay["on"] and passes < len(dataloader):
                        replay["index"] = index
                        replay["batches"].append({})
                    model(**batch)
                    forwards += 1
                passes += 1
                bar.update(1)
                if all(pcas[n].components_ is not None for n in leaders):
                    rank = rank_distribution({n: pcas[n].explained_variance_ratio_ for n in leaders}, layer_pca,
                                             shares, budget, keep)
        finally:
            for h in handles:
                h.remove()
            bar.close()
    for n in names:
        if not bool(torch.all(converged[layer_pca[n]][: rank[n]])):
            raise ValueError(f"loram_fast: eva: layer {n!r} has not converged but was given rank {rank[n]}")
    logger.info("loram_fast eva: converged after %d passes over a batch (%d forward passes)", passes, forwards)
    return {n: (pcas[layer_pca[n]].components_, pcas[layer_pca[n]].singular_values_) for n in names}, rank
