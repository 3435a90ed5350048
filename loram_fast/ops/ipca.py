"""Incremental PCA of a stream of row batches (EVA's per-layer estimator), step for step as peft's
``peft.utils.incremental_pca.IncrementalPCA`` (itself after scikit-learn's), so results agree bit for bit.

``partial_fit(X)`` for a batch X (b×n, fp32): running mean and variance (fp64 sums), then the SVD of
``[diag(S) Vᵀ ; X − mean_batch ; mean correction]`` (the first batch: ``X − mean``), truncated to ``n_components``
rows of ``Vᵀ`` (``components_``, signs fixed by the largest entry of each row) and their singular values.
``lowrank=True``: that SVD is ``torch.svd_lowrank(q=lowrank_q (2·n_components), niter=4)`` drawn under a forked
RNG seeded with ``lowrank_seed`` (EVA uses 42), so the global generator is untouched.
"""
from __future__ import annotations

from typing import Optional

import torch


class IncrementalPCA:
    def __init__(self, n_components: int, *, lowrank: bool = True, lowrank_q: Optional[int] = None,
                 lowrank_niter: int = 4, lowrank_seed: Optional[int] = 42):
        self.n_components = n_components
        self.lowrank = lowrank
        self.lowrank_q = 2 * n_components if lowrank_q is None else lowrank_q
        self.lowrank_niter = lowrank_niter
        self.lowrank_seed = lowrank_seed
        self.components_: Optional[torch.Tensor] = None

    def _svd(self, X: torch.Tensor):
        if not self.lowrank:
            return torch.linalg.svd(X, full_matrices=False)
        seeded = self.lowrank_seed is not None
        with torch.random.fork_rng(enabled=seeded, devices=[X.device] if X.is_cuda else []):
            if seeded:
                torch.manual_seed(self.lowrank_seed)
            U, S, V = torch.svd_lowrank(X, q=self.lowrank_q, niter=self.lowrank_niter)
        return U, S, V.mH

    @staticmethod
    def _mean_and_var(X, last_mean, last_var, last_count):
        new_count = torch.tensor([X.shape[0]], device=X.device)
        count = last_count + new_count
        last_sum = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device) if last_mean is None \
            else last_mean * last_count
        new_sum = X.sum(dim=0, dtype=torch.float64)
        mean = (last_sum + new_sum) / count
        centred = X - new_sum / new_count
        correction = centred.sum(dim=0, dtype=torch.float64).square()
        centred.square_()
        new_unnormalised = centred.sum(dim=0, dtype=torch.float64)
        new_unnormalised -= correction / new_count
        if last_var is None:
            return mean, new_unnormalised / count, count
        last_over_new = last_count.double() / new_count
        unnormalised = (last_var * last_count + new_unnormalised
                        + last_over_new / count * (last_sum / last_over_new - new_sum).square())
        return mean, unnormalised / count, count

    @staticmethod
    def _flip_signs(U, Vt):
        rows = torch.argmax(torch.abs(Vt), dim=1)
        signs = torch.sign(Vt[range(Vt.shape[0]), rows])
        U *= signs[: U.shape[1]].view(1, -1)
        Vt *= signs.view(-1, 1)
        return U, Vt

    def partial_fit(self, X: torch.Tensor) -> "IncrementalPCA":
        """One batch (b×n); see the module docstring."""
        X = X.clone() if X.dtype in (torch.float32, torch.float64) else X.to(torch.float32)
        n_samples, n_features = X.shape
        if self.n_components > n_features or self.n_components > n_samples:
            raise ValueError(f"loram_fast.IncrementalPCA: n_components={self.n_components} needs at least as many "
                             f"samples and features, got {n_samples}×{n_features}")
        first = self.components_ is None
        if first:
            self.mean_, self.var_ = None, None
            self.n_samples_seen_ = torch.tensor([0], device=X.device)
        mean, var, total = self._mean_and_var(X, self.mean_, self.var_, self.n_samples_seen_)
        if first:
            X -= mean
        else:
            batch_mean = torch.mean(X, dim=0)
            X -= batch_mean
            factor = torch.sqrt((self.n_samples_seen_.double() / total) * n_samples)
            X = torch.vstack((self.singular_values_.view((-1, 1)) * self.components_, X,
                              factor * (self.mean_ - batch_mean)))
        U, S, Vt = self._svd(X)
        U, Vt = self._flip_signs(U, Vt)
        self.n_samples_seen_ = total
        self.components_ = Vt[: self.n_components]
        self.singular_values_ = S[: self.n_components]
        self.mean_, self.var_ = mean, var
        self.explained_variance_ratio_ = (S ** 2 / torch.sum(var * total))[: self.n_components]
        return self
