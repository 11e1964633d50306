"""Similarity metrics on L2-normalised embeddings (rows are items)."""

from __future__ import annotations

import torch


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of every row of a with every row of b (inputs already L2-normalised)."""
    return a.float() @ b.float().T


def image_similarity(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean pairwise cosine between generated images and the dataset (Guralnick et al., image similarity)."""
    return cosine_matrix(generated, reference).mean().item()


def self_similarity(reference: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of the dataset: the ceiling a model can be compared with.

    The diagonal (an image with itself, always 1) is left out; a single image gives 1.
    """
    n = len(reference)
    if n < 2:
        return 1.0
    sims = cosine_matrix(reference, reference)
    return ((sims.sum() - sims.diagonal().sum()) / (n * (n - 1))).item()


def paired_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine of row i of a with row i of b (same context, same seed; Guralnick et al., prompt similarity)."""
    if a.shape != b.shape:
        raise ValueError(f"paired embeddings must match in shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (a.float() * b.float()).sum(dim=-1).mean().item()
