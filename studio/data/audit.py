"""Audit of a set of photos: duplicates and near-duplicates (perceptual hash), and outliers (embedding distance).

Findings are warnings, not errors: the user may keep a near-duplicate on purpose, so each one has a stable
key the UI can dismiss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

HASH_SIDE = 32  # the image is reduced to 32x32 grey before the DCT
HASH_BITS = 8   # the 8x8 lowest frequencies make the 64-bit hash
NEAR_DUPLICATE_BITS = 10  # Hamming distance at or below which two photos count as the same shot


@dataclass(frozen=True)
class Finding:
    key: str          # stable id, e.g. 'duplicate:a.jpg|b.jpg', for dismissing
    kind: str         # 'duplicate' | 'near-duplicate' | 'outlier'
    names: tuple[str, ...]
    message: str


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II basis: row k is cos(pi (2i + 1) k / 2n), scaled."""
    i = np.arange(n)
    m = np.cos(np.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


_DCT = _dct_matrix(HASH_SIDE)


def phash(image: Image.Image) -> int:
    """64-bit perceptual hash: the signs of the 8x8 lowest DCT frequencies of a 32x32 grey copy against
    their median (the pHash construction). Robust to resizing, recompression and small colour changes."""
    grey = np.asarray(image.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.LANCZOS), dtype=np.float64)
    coeffs = (_DCT @ grey @ _DCT.T)[:HASH_BITS, :HASH_BITS].flatten()
    bits = coeffs[1:] > np.median(coeffs[1:])  # the DC term is the mean brightness, not structure
    bits = np.concatenate([[coeffs[0] > 0], bits])
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def duplicates(names: list[str], hashes: list[int], digests: list[str] | None = None,
               near_bits: int = NEAR_DUPLICATE_BITS) -> list[Finding]:
    """Pairs that are the same file (same bytes or same hash) or near-duplicates (hash within near_bits)."""
    found = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            distance = hamming(hashes[i], hashes[j])
            same = (digests is not None and digests[i] == digests[j]) or distance == 0
            if same:
                found.append(Finding(f"duplicate:{names[i]}|{names[j]}", "duplicate", (names[i], names[j]),
                                     f"'{names[i]}' and '{names[j]}' are the same picture; remove one of them."))
            elif distance <= near_bits:
                found.append(Finding(f"near-duplicate:{names[i]}|{names[j]}", "near-duplicate", (names[i], names[j]),
                                     f"'{names[i]}' and '{names[j]}' are nearly the same shot ({distance} of 64 "
                                     "hash bits differ); keep both only if they show the concept differently."))
    return found


def outlier_scores(embeddings: np.ndarray) -> np.ndarray:
    """For each row, 1 - cosine similarity to the mean of the other rows (rows L2-normalised first)."""
    x = np.asarray(embeddings, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = len(x)
    others = (x.sum(axis=0, keepdims=True) - x) / max(1, n - 1)
    others /= np.maximum(np.linalg.norm(others, axis=1, keepdims=True), 1e-12)
    return 1.0 - (x * others).sum(axis=1)


def outliers(names: list[str], embeddings: np.ndarray, k: float = 3.0, min_images: int = 4) -> list[Finding]:
    """Images whose distance to the rest is more than k robust deviations (MAD) above the median distance.

    The median absolute deviation, not the standard deviation, so one far image cannot hide itself by
    inflating the spread. Fewer than `min_images` photos have no 'rest' to compare with.
    """
    if len(names) < min_images:
        return []
    scores = outlier_scores(embeddings)
    median = float(np.median(scores))
    mad = float(np.median(np.abs(scores - median))) * 1.4826  # consistent with sigma for normal data
    limit = median + k * max(mad, 0.02 * max(median, 1e-3), 1e-6)
    return [Finding(f"outlier:{name}", "outlier", (name,),
                    f"'{name}' looks unlike the other photos (distance {score:.2f} against a typical {median:.2f}); "
                    "check it shows the concept, or dismiss this.")
            for name, score in zip(names, scores) if score > limit]


def audit(names: list[str], images: list[Image.Image], digests: list[str] | None = None,
          embed: Callable[[list[Image.Image]], np.ndarray] | None = None) -> list[Finding]:
    """Duplicates always; outliers when an `embed` function (images -> (n, d) array) is given."""
    found = duplicates(names, [phash(im) for im in images], digests)
    if embed is not None and len(images) >= 4:
        found += outliers(names, np.asarray(embed(images)))
    return found


def clip_embedder(name: str = "") -> Callable[[list[Image.Image]], np.ndarray]:
    """A CLIP image embedder (by id, folder, or 'builtin'), loaded on first call, as an embed function."""
    state: dict[str, object] = {}

    def embed(images: list[Image.Image]) -> np.ndarray:
        if "model" not in state:
            from studio.data.clip import ClipEmbedder  # torch and transformers load only when used

            state["model"] = ClipEmbedder(name or None)
        return state["model"].embed_images(images).cpu().numpy()

    return embed
