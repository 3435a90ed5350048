"""EVA (peft's ``get_eva_state_dict`` + ``initialize_lora_eva_weights``): A from the principal components of each
layer's inputs, B = 0, ranks redistributed across layers by explained variance.

Per layer with rank r_l: an incremental PCA (:class:`~loram_fast.ops.ipca.IncrementalPCA`, randomized SVD seeded
with 42) of the layer's input tokens (those the attention mask and, with ``use_label_mask``, the labels keep) keeps
``round(r_l·ρ)`` components; batches cycle until the top components of every layer converge (cosine similarity with
the previous batch's ≥ τ). The budget Σ r_l goes to the layers whose components explain most variance
(:func:`rank_distribution`); layer l gets A = its first k_l components (``whiten``: divided by √singular value),
B = 0 (so W·x is unchanged at step 0), lora_alpha scaled by k_l / r_l with ``adjust_scaling_factors``, and a layer
with k_l = 0 loses its LoRA layer. Layers that read the same input share one PCA.
"""
from __future__ import annotations

from collections import Counter

import torch


def component_budget(ranks: dict[str, int], rho: float, r: int, max_dim: int) -> dict[str, int]:
    """Components each layer's PCA keeps: ``round(r_l·ρ)``; ρ above 1000 is capped at ``max_dim // r`` (peft's
    rule, with ``max_dim`` the longest side of any parameter of the model and ``r`` the config's rank)."""
    if rho > 1000:
        rho = min(rho, max_dim // r)
    return {name: round(rank * rho) for name, rank in ranks.items()}


def rank_distribution(explained: dict[str, torch.Tensor], layer_pca: dict[str, str], shares: dict[str, str],
                      budget: int, keep: dict[str, int]) -> dict[str, int]:
    """peft's ``_get_rank_distribution``: the ``budget`` largest explained-variance ratios over all layers (each
    layer offers its PCA's first ``keep`` ratios; ``layer_pca`` maps a layer to the layer whose PCA it uses), counted
    per layer; a layer sharing another's PCA (``shares``) never gets more than that one (they swap)."""
    names, values = zip(*[(name, v) for name, pca in layer_pca.items() for v in explained[pca][: keep[pca]]])
    order = torch.stack(values).argsort(descending=True)
    counts = Counter([names[i] for i in order[:budget]])
    counts = {name: counts.get(name, 0) for name in layer_pca}
    for name, leader in shares.items():
        if counts[leader] < counts[name]:
            counts[leader], counts[name] = counts[name], counts[leader]
    return counts


def adapter_a(components: torch.Tensor, singular_values: torch.Tensor, rank: int, whiten: bool) -> torch.Tensor:
    """A (rank×in): the first ``rank`` components, divided by √singular value with ``whiten`` (a fresh tensor:
    layers sharing a PCA are whitened once each; peft divides its shared components in place, so a second layer
    reading the same input is whitened twice)."""
    A = components[:rank].clone()
    if whiten:
        A /= singular_values[:rank].sqrt().reshape(-1, 1)
    return A
