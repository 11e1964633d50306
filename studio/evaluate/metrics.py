"""Metrics of the evaluation, each computed as its source computes it. Embeddings are rows; the cosine
metrics expect L2-normalised rows.

- CLIP-I, DINO (Ruiz et al. 2023, DreamBooth): mean cosine between the embeddings of generated and
  real images (CLIP image encoder; DINO ViT-S/16 CLS token): `image_similarity`.
- CLIP-T (Ruiz et al. 2023; the LyCORIS paper, Yeh et al. 2024, replaces the trigger by the class
  word first): mean cosine between each image and its prompt's text embedding: `paired_similarity`.
- Image and prompt similarity (Guralnick et al.): `image_similarity` and `paired_similarity` on CLIP
  image embeddings; the dataset against itself without the diagonal: `self_similarity`.
- KID (Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial kernel, averaged over subsets
  whose size adapts to small sets: `kid`.
- FID (Heusel et al. 2017) with a warning when there are fewer images than feature dimensions: `fid`.
- Vendi score (Friedman & Dieng 2023): exp of the entropy of the eigenvalues of K/n, K the cosine
  similarity matrix: the effective number of distinct images: `vendi`.
"""

from __future__ import annotations

import math
import re

import torch


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of every row of a with every row of b (inputs already L2-normalised)."""
    return a.float() @ b.float().T


def image_similarity(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean pairwise cosine between generated and reference images (CLIP-I, DINO; Guralnick's image similarity)."""
    return cosine_matrix(generated, reference).mean().item()


def per_image_similarity(generated: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """Each generated image's mean cosine to the reference set (one value per row of `generated`)."""
    return cosine_matrix(generated, reference).mean(dim=1).tolist()


def self_similarity(reference: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of the dataset: the ceiling a model can be compared with.

    The diagonal (an image with itself, always 1) is left out; a single image gives 1.
    """
    n = len(reference)
    if n < 2:
        return 1.0
    sims = cosine_matrix(reference, reference)
    return ((sims.sum() - sims.diagonal().sum()) / (n * (n - 1))).item()


def leave_one_out_similarity(reference: torch.Tensor) -> list[float]:
    """Each dataset image's mean cosine to the other dataset images (its row of `self_similarity`)."""
    n = len(reference)
    if n < 2:
        return [1.0] * n
    sims = cosine_matrix(reference, reference)
    return ((sims.sum(dim=1) - sims.diagonal()) / (n - 1)).tolist()


def paired_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine of row i of a with row i of b (CLIP-T: image i and its prompt; Guralnick's prompt
    similarity: the image with and without the concept at the same seed)."""
    return sum(paired_cosines(a, b)) / len(a)


def paired_cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    if a.shape != b.shape:
        raise ValueError(f"paired embeddings must match in shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (a.float() * b.float()).sum(dim=-1).tolist()


def replace_trigger(prompt: str, token: str, class_word: str) -> str:
    """The prompt as the text encoder of CLIP-T reads it: the trigger (a word the CLIP model never saw)
    is replaced by the class word, and a class word that now appears twice is kept once
    ("a sks dog" and "a sks dog dog" both become "a dog")."""
    if not token:
        return prompt
    text = re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", class_word, prompt)
    if class_word:
        doubled = rf"(?<!\w){re.escape(class_word)}\s+{re.escape(class_word)}(?!\w)"
        text = re.sub(doubled, class_word, text)
    return re.sub(r"\s+", " ", text).strip()


# ----------------------------------------------------------------------------- distribution distances

def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    d = x.shape[1]
    return (x @ y.T / d + 1) ** 3


def kid(x: torch.Tensor, y: torch.Tensor, subset_size: int | None = None, subsets: int = 100,
        seed: int = 0) -> tuple[float, int]:
    """Kernel Inception Distance between feature sets x and y, and the subset size used.

    Unbiased MMD² with k(a, b) = (a·b / d + 1)³, averaged over `subsets` random subsets of
    `subset_size` rows from each set (default: the smaller set's size, at most 1000, so a handful of
    images still gives an unbiased estimate; at least 2 rows per set are needed). Features are used
    as given; near 0 for two samples of one distribution (negative values are noise). A set against
    itself gives -2 (mean k(a, a) - mean k(a, b)) / m: self-pairs are left out within each set, not
    across them, so it is O(1/m) rather than exactly 0.
    """
    x, y = x.double(), y.double()
    m = min(len(x), len(y), 1000) if subset_size is None else subset_size
    if m < 2:
        raise ValueError("KID needs at least 2 images in each set")
    if m > min(len(x), len(y)):
        raise ValueError(f"KID subset size {m} is larger than a set ({len(x)}, {len(y)})")
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        a = x[torch.randperm(len(x), generator=g)[:m]]
        b = y[torch.randperm(len(y), generator=g)[:m]]
        kxx, kyy, kxy = _polynomial_kernel(a, a), _polynomial_kernel(b, b), _polynomial_kernel(a, b)
        off = m * (m - 1)
        mmd = ((kxx.sum() - kxx.diagonal().sum()) / off + (kyy.sum() - kyy.diagonal().sum()) / off
               - 2 * kxy.mean())
        values.append(mmd.item())
        if m == len(x) == len(y):  # every subset is the whole set: one draw is the estimate
            break
    return sum(values) / len(values), m


def fid(x: torch.Tensor, y: torch.Tensor) -> tuple[float, str]:
    """Fréchet distance between Gaussians fitted to x and y, and a warning ('' when none).

    tr(sqrt(Σx Σy)) is computed as the sum of square roots of the eigenvalues of the symmetric
    matrix sqrt(Σx) Σy sqrt(Σx), which has the same eigenvalues and no complex ones; tiny negative
    rounding is clipped to 0. With fewer images than feature dimensions the covariances are singular
    and the estimate is strongly biased (the general-matrix square root that FID code uses then turns
    complex, and some papers report its real part): the warning says so.
    """
    x, y = x.double(), y.double()
    n, d = min(len(x), len(y)), x.shape[1]
    if n < 2:
        raise ValueError("FID needs at least 2 images in each set")
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = torch.cov(x.T).reshape(d, d), torch.cov(y.T).reshape(d, d)
    root_x = _psd_sqrt(cov_x)
    middle = root_x @ cov_y @ root_x
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = float((mu_x - mu_y).pow(2).sum() + cov_x.trace() + cov_y.trace() - 2 * trace_root)
    warning = ""
    if n < d:
        warning = (f"FID from {n} images in {d} feature dimensions: the covariances are singular and the value "
                   "is strongly biased; compare KID instead.")
    return max(value, 0.0), warning


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T


def vendi(features: torch.Tensor) -> float:
    """Vendi score of L2-normalised rows: 1 for n identical images, n for n orthogonal ones."""
    n = len(features)
    if n == 0:
        return math.nan
    k = cosine_matrix(features, features).double() / n
    eigenvalues = torch.linalg.eigvalsh((k + k.T) / 2).clamp_min(0)
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    return float(torch.exp(-(eigenvalues * eigenvalues.log()).sum()))
