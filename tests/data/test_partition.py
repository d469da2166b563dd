import numpy as np
import pytest

from marsjax.data import dirichlet_partition, iid_partition, sampled_partition


def _labels(n=3000, c=10, seed=0):
    return np.random.default_rng(seed).integers(0, c, n)


@pytest.mark.parametrize("alpha", [0.01, 0.5, 0.9, 100.0])
def test_every_index_exactly_once(alpha):
    y = _labels()
    p = dirichlet_partition(y, 37, alpha, seed=1)
    got = np.concatenate([p.client_indices(i) for i in range(p.num_clients)])
    assert np.array_equal(np.sort(got), np.arange(len(y)))
    assert p.counts.sum() == len(y)
    # class statistics agree with the labels actually held
    for i in range(p.num_clients):
        assert np.array_equal(p.class_counts[i], np.bincount(y[p.client_indices(i)], minlength=10))


def test_reproducible_and_seed_dependent():
    y = _labels()
    a = dirichlet_partition(y, 20, 0.9, seed=3)
    b = dirichlet_partition(y, 20, 0.9, seed=3)
    c = dirichlet_partition(y, 20, 0.9, seed=4)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.counts, b.counts)
    assert not np.array_equal(a.counts, c.counts)


def test_finishes_at_tiny_alpha_with_1000_clients():
    y = _labels(60000)
    p = dirichlet_partition(y, 1000, 0.01, seed=0)
    assert p.counts.sum() == 60000 and p.indices.shape[0] == 1000
    # at alpha=0.01 each class lands on very few clients: strongly non-IID
    assert np.median((p.class_counts > 0).sum(1)) <= 1


def test_alpha_controls_skew():
    y = _labels(20000)
    skew = []
    for a in (0.1, 1.0, 100.0):
        p = dirichlet_partition(y, 20, a, seed=0)
        frac = p.class_counts / np.maximum(p.counts[:, None], 1)
        skew.append(frac.max(1).mean())
    assert skew[0] > skew[1] > skew[2]
    assert skew[2] < 0.2  # near-IID: no class dominates


def test_iid_partition_sizes():
    y = _labels(1000)
    p = iid_partition(y, 7, seed=0)
    assert p.counts.max() - p.counts.min() <= 1
    assert np.array_equal(
        np.sort(np.concatenate([p.client_indices(i) for i in range(7)])), np.arange(1000)
    )


def test_invalid_alpha():
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(_labels(), 5, 0.0, seed=0)


# --- the vectorised partition against the per-client-list implementation it replaced ---


def _reference_dirichlet(labels, num_clients, alpha, seed, num_classes):
    """The earlier per-client-list implementation (same draws, explicit lists)."""
    rng = np.random.default_rng(seed)
    lists = [[] for _ in range(num_clients)]
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        p = rng.dirichlet(np.full(num_clients, float(alpha)))
        if not np.all(np.isfinite(p)) or p.sum() <= 0:
            p = np.zeros(num_clients)
            p[rng.integers(num_clients)] = 1.0
        cuts = np.rint(np.cumsum(p) / p.sum() * len(idx)).astype(np.int64)
        cuts[-1] = len(idx)
        for i, part in enumerate(np.split(idx, cuts[:-1])):
            lists[i].append(part)
    return [np.sort(np.concatenate(v)) for v in lists]


def _reference_iid(labels, num_clients, seed):
    perm = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(v) for v in np.array_split(perm, num_clients)]


def _assert_same(p, lists, labels, num_classes):
    assert p.num_clients == len(lists)
    assert p.indices.shape[1] == max(1, max(len(v) for v in lists))
    for i, v in enumerate(lists):
        assert p.counts[i] == len(v)
        assert np.array_equal(p.client_indices(i), v)
        assert np.all(p.indices[i, len(v) :] == 0)
        assert np.array_equal(p.class_counts[i], np.bincount(labels[v], minlength=num_classes))


@pytest.mark.parametrize(
    ("n", "clients", "alpha", "seed"),
    [(3000, 37, 0.9, 1), (500, 64, 0.01, 2), (2000, 5, 100.0, 3), (40, 100, 0.5, 4)],
)
def test_dirichlet_equals_per_client_reference(n, clients, alpha, seed):
    y = _labels(n, seed=seed)
    p = dirichlet_partition(y, clients, alpha, seed=seed, num_classes=10)
    _assert_same(p, _reference_dirichlet(y, clients, alpha, seed, 10), y, 10)


@pytest.mark.parametrize(("n", "clients"), [(1000, 7), (1003, 10), (30, 100), (64, 64)])
def test_iid_equals_per_client_reference(n, clients):
    y = _labels(n)
    p = iid_partition(y, clients, seed=5, num_classes=10)
    _assert_same(p, _reference_iid(y, clients, 5), y, 10)


def test_sampled_partition_distinct_uniform_and_reproducible():
    y = _labels(50)
    p = sampled_partition(y, 20000, 6, seed=0, num_classes=10)
    assert p.indices.shape == (20000, 6) and np.all(p.counts == 6)
    rows = np.sort(p.indices, axis=1)
    assert np.all(np.diff(rows, axis=1) > 0)  # distinct within a client
    # uniform: every sample held by ~ 20000 * 6 / 50 = 2400 clients (binomial sd ~ 48)
    held = np.bincount(p.indices.ravel(), minlength=50)
    assert np.all(np.abs(held - 2400) < 6 * 49)
    assert np.array_equal(p.class_counts.sum(1), p.counts)
    q = sampled_partition(y, 20000, 6, seed=0, num_classes=10)
    assert np.array_equal(p.indices, q.indices)
    with pytest.raises(ValueError, match="samples_per_client"):
        sampled_partition(y, 3, 51, seed=0)


def test_million_registered_clients_in_array_passes():
    y = _labels(60000)
    p = dirichlet_partition(y, 1_000_000, 0.9, seed=0, num_classes=10)
    assert p.counts.sum() == 60000 and p.num_clients == 1_000_000
    held = np.arange(p.indices.shape[1])[None, :] < p.counts[:, None]
    assert np.array_equal(np.sort(p.indices[held]), np.arange(60000))
    s = sampled_partition(y, 1_000_000, 4, seed=0, num_classes=10)
    assert s.indices.shape == (1_000_000, 4) and int(s.class_counts.sum()) == 4_000_000


def test_labels_out_of_range_raise():
    with pytest.raises(ValueError, match="labels"):
        iid_partition(np.array([0, 1, 5]), 2, seed=0, num_classes=3)
