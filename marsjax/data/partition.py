"""Splitting a training set among clients (non-IID by a per-class Dirichlet draw, or IID).

The paper's scheme (backdoors101 ``sample_dirichlet_train_data``): for every class, draw client
proportions ``p ~ Dirichlet(alpha * 1_N)`` and give each client that share of the class's shuffled
samples. The official code rounds each share separately, which drops or leaves some samples; here
the shares are cut at ``round(cumsum(p) * n_class)``, so every sample goes to exactly one client.
One pass per class: it always finishes, whatever ``alpha``; clients may end up with no sample at
tiny ``alpha`` (they then train no step).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Partition", "dirichlet_partition", "iid_partition", "pad_partition"]


class Partition(NamedTuple):
    """Clients' training indices, padded to one static length.

    Attributes:
      indices: ``[num_clients, max_len]`` int32; row ``i`` holds client ``i``'s indices in its
        first ``counts[i]`` entries, then padding (index 0, never read).
      counts: ``[num_clients]`` int32 number of samples per client.
      class_counts: ``[num_clients, num_classes]`` int64 histogram of each client's labels.
    """

    indices: np.ndarray
    counts: np.ndarray
    class_counts: np.ndarray

    @property
    def num_clients(self) -> int:
        return int(self.counts.shape[0])

    def client_indices(self, i: int) -> np.ndarray:
        return self.indices[i, : self.counts[i]]


def pad_partition(lists: list[np.ndarray], labels: np.ndarray, num_classes: int) -> Partition:
    counts = np.array([len(v) for v in lists], np.int32)
    max_len = max(1, int(counts.max(initial=0)))
    indices = np.zeros((len(lists), max_len), np.int32)
    class_counts = np.zeros((len(lists), num_classes), np.int64)
    for i, v in enumerate(lists):
        indices[i, : len(v)] = v
        class_counts[i] = np.bincount(labels[v], minlength=num_classes)[:num_classes]
    return Partition(indices, counts, class_counts)


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, num_classes: int | None = None
) -> Partition:
    """Per-class Dirichlet(alpha) split of ``labels`` among ``num_clients`` clients.

    Args:
      labels: ``[n]`` integer labels.
      num_clients: number of clients.
      alpha: Dirichlet concentration, > 0 (small = skewed, large = close to IID).
      seed: the partition's own seed (independent of the training randomness).
      num_classes: defaults to ``labels.max() + 1``.

    Returns:
      A :class:`Partition`; every index in ``range(n)`` appears exactly once.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    rng = np.random.default_rng(seed)
    lists: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        p = rng.dirichlet(np.full(num_clients, float(alpha)))
        # Tiny alpha can underflow every proportion to 0 (or give NaN); fall back to one client.
        if not np.all(np.isfinite(p)) or p.sum() <= 0:
            p = np.zeros(num_clients)
            p[rng.integers(num_clients)] = 1.0
        cuts = np.rint(np.cumsum(p) / p.sum() * len(idx)).astype(np.int64)
        cuts[-1] = len(idx)
        for i, part in enumerate(np.split(idx, cuts[:-1])):
            lists[i].append(part)
    flat = [np.sort(np.concatenate(v)).astype(np.int32) for v in lists]
    return pad_partition(flat, labels, num_classes)


def iid_partition(
    labels: np.ndarray, num_clients: int, seed: int, num_classes: int | None = None
) -> Partition:
    """Uniformly random split into near-equal shares."""
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    flat = [np.sort(v).astype(np.int32) for v in np.array_split(perm, num_clients)]
    return pad_partition(flat, labels, num_classes)
