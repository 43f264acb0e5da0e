"""Synthetic, clustered unit vectors standing in for sentence embeddings (tests and benchmarks).

Embedding 100k real sentences on a laptop CPU takes too long for a benchmark, and isotropic Gaussian
clusters are a poor stand-in: in 384 dimensions they make every point nearly equidistant from every
other, which no approximate index (and no real embedding model) resembles. Real embeddings are
hierarchical (domain → topic → subtopic) with low-dimensional local variation, so this generator is:

    leaf centre  = Σ_levels  scale_l · u_l        (a tree with ``branching`` children per level,
                                                     u_l random unit vectors)
    point        = leaf centre + local · B z / √rank + iso · ε / √d,   then L2-normalised

with ``B`` a random orthonormal (d × rank) basis per leaf, ``z, ε`` standard normal, and leaf
popularity Zipf-like (exponent 0.8). With the defaults, a point's nearest neighbour has cosine ≈ 0.8
and its 100th ≈ 0.6, unrelated points ≈ 0.
"""

from __future__ import annotations

import numpy as np

__all__ = ["clustered_unit_vectors"]


def clustered_unit_vectors(
    n: int,
    d: int = 384,
    *,
    branching: tuple[int, ...] = (20, 10, 10),
    scales: tuple[float, ...] = (1.0, 0.8, 0.6),
    rank: int = 16,
    local: float = 0.9,
    iso: float = 0.6,
    zipf: float = 0.8,
    seed: int = 0,
) -> np.ndarray:
    """``n`` float32 unit vectors of dimension ``d`` from the hierarchical mixture described above.

    The same ``seed`` gives the same mixture; draw corpus and queries in one call and split, so
    that queries come from the same mixture but are not corpus rows.
    """
    if len(branching) != len(scales):
        raise ValueError("branching and scales must have the same length")
    rng = np.random.default_rng(seed)

    def unit(k: int) -> np.ndarray:
        v = rng.standard_normal((k, d)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    centres = np.zeros((1, d), np.float32)
    for b, s in zip(branching, scales):
        centres = (centres[:, None, :] + s * unit(len(centres) * b).reshape(len(centres), b, d)).reshape(-1, d)
    n_leaves = len(centres)
    w = 1.0 / np.arange(1, n_leaves + 1) ** zipf
    w = rng.permutation(w / w.sum())
    leaf = rng.choice(n_leaves, size=n, p=w)
    x = np.empty((n, d), np.float32)
    order = np.argsort(leaf, kind="stable")
    for idx in np.split(order, np.flatnonzero(np.diff(leaf[order])) + 1):
        if len(idx) == 0:
            continue
        basis = np.linalg.qr(rng.standard_normal((d, rank)))[0].astype(np.float32)
        z = rng.standard_normal((len(idx), rank)).astype(np.float32) * (local / np.sqrt(rank))
        eps = rng.standard_normal((len(idx), d)).astype(np.float32) * (iso / np.sqrt(d))
        x[idx] = centres[leaf[idx[0]]] + z @ basis.T + eps
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x
