import numpy as np
import pytest

from marsjax.data import dirichlet_partition, iid_partition


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
