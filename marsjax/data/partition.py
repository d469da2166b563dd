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

__all__ = [
    "Partition",
    "dirichlet_partition",
    "from_owners",
    "iid_partition",
    "pad_partition",
    "sampled_partition",
]


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


def from_owners(
    owner: np.ndarray, sample: np.ndarray, labels: np.ndarray, num_clients: int, num_classes: int
) -> Partition:
    """The padded :class:`Partition` of ``(owner[j], sample[j])`` pairs, vectorised.

    Client ``i`` holds the samples ``sample[owner == i]`` in increasing order. No Python object
    per client: a federation of 1,000,000 registered clients is built in a few array passes.
    """
    owner = np.asarray(owner, np.int64)
    sample = np.asarray(sample, np.int64)
    order = np.lexsort((sample, owner))  # by client, then by sample index
    owner, sample = owner[order], sample[order]
    counts = np.bincount(owner, minlength=num_clients).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)[:-1]])
    max_len = max(1, int(counts.max(initial=0)))
    indices = np.zeros((num_clients, max_len), np.int32)
    indices[owner, np.arange(len(owner)) - offsets[owner]] = sample
    labels = np.asarray(labels)
    held = labels[sample]
    if held.size and (held.min() < 0 or held.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {held.min()}..{held.max()}")
    class_counts = np.bincount(
        owner * num_classes + held, minlength=num_clients * num_classes
    ).reshape(num_clients, num_classes)
    return Partition(indices, counts, class_counts.astype(np.int64))


def pad_partition(lists: list[np.ndarray], labels: np.ndarray, num_classes: int) -> Partition:
    """The :class:`Partition` of explicit per-client index lists."""
    lens = [len(v) for v in lists]
    owner = np.repeat(np.arange(len(lists)), lens)
    sample = np.concatenate([np.asarray(v, np.int64) for v in lists]) if lists else owner
    return from_owners(owner, sample, labels, len(lists), num_classes)


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
    owners, samples = [], []
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
        # position j of the shuffled class goes to the client whose share [cuts[i-1], cuts[i]) holds it
        owners.append(np.searchsorted(cuts[:-1], np.arange(len(idx)), side="right"))
        samples.append(idx)
    return from_owners(
        np.concatenate(owners), np.concatenate(samples), labels, num_clients, num_classes
    )


def iid_partition(
    labels: np.ndarray, num_clients: int, seed: int, num_classes: int | None = None
) -> Partition:
    """Uniformly random split into near-equal shares (the first ``n % num_clients`` get one more)."""
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    q, extra = divmod(len(labels), num_clients)
    j = np.arange(len(labels))
    # np.array_split's shares: clients < extra hold q + 1 positions, the others q
    big = extra * (q + 1)
    owner = np.where(j < big, j // (q + 1), extra + (j - big) // max(q, 1))
    return from_owners(owner, perm, labels, num_clients, num_classes)


def sampled_partition(
    labels: np.ndarray,
    num_clients: int,
    samples_per_client: int,
    seed: int,
    num_classes: int | None = None,
) -> Partition:
    """Every client draws ``samples_per_client`` distinct training samples uniformly at random.

    Clients' draws are independent, so clients overlap: the partition for federations with more
    clients than samples (1,000,000 registered clients on a 60,000-image dataset), where a
    disjoint split would leave most clients empty. Built with array operations only.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 1 <= samples_per_client <= n:
        raise ValueError(f"samples_per_client must be in [1, {n}], got {samples_per_client}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    rng = np.random.default_rng(seed)
    k = samples_per_client
    # k distinct samples per client, all clients at once: pick t is uniform over the n - t samples
    # not yet picked (a draw in [0, n - t) moved past the earlier picks, smallest first), so each
    # row is a uniform k-subset
    picks = np.empty((num_clients, k), np.int64)
    for t in range(k):
        r = rng.integers(0, n - t, size=num_clients)
        for s in np.sort(picks[:, :t], axis=1).T:  # skip the earlier picks, smallest first
            r = r + (r >= s)
        picks[:, t] = r
    owner = np.repeat(np.arange(num_clients), k)
    return from_owners(owner, picks.reshape(-1), labels, num_clients, num_classes)
