"""Shared helpers of the baseline defenses, against numpy / scipy / scikit-learn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import HDBSCAN, KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score
from sklearn.metrics.pairwise import cosine_similarity as sk_cos

from marsjax.defenses import _robust_utils as ru


def _blobs(rng, centers, n_each, scale=0.3):
    return np.concatenate([c + scale * rng.normal(size=(n_each, len(c))) for c in centers])


def test_distances_and_cosines_match_numpy_and_survive_huge_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 33)).astype(np.float32)
    d = np.asarray(ru.sq_distances([jnp.asarray(x[:, :20]), jnp.asarray(x[:, 20:])]))
    ref = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.testing.assert_allclose(d, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(ru.cosine_similarity(jnp.asarray(x))), sk_cos(x), atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(ru.row_norms(jnp.asarray(x))), np.linalg.norm(x, axis=1), rtol=1e-5
    )
    h = x.copy()
    h[2] = 1e30
    h[3] = 0.0
    d = np.asarray(ru.sq_distances(jnp.asarray(h)))
    assert not np.isnan(d).any()
    assert np.isinf(d[2, [0, 1, 4]]).all() and d[2, 2] == 0
    np.testing.assert_allclose(d[0, 1], ref[0, 1], rtol=1e-4)
    c = np.asarray(ru.cosine_similarity(jnp.asarray(h)))
    np.testing.assert_allclose(c[2, 0], sk_cos(np.ones((1, 33)), x[:1])[0, 0], atol=1e-5)
    assert c[3, 0] == 0 and np.isfinite(c).all()
    assert np.isfinite(np.asarray(ru.row_norms(jnp.asarray(h)))[2])


def test_masked_median_and_mean():
    rng = np.random.default_rng(1)
    for n in (5, 6):
        x = rng.normal(size=(n, 4)).astype(np.float32)
        valid = np.ones(n, bool)
        valid[1] = False
        x[1] = 1e9
        got = np.asarray(ru.masked_median(jnp.asarray(x), jnp.asarray(valid)))
        np.testing.assert_allclose(got, np.median(x[valid], axis=0), rtol=1e-6)
    assert float(ru.masked_median(jnp.ones(3), jnp.zeros(3, bool))) == 0.0
    assert float(ru.masked_mean(jnp.array([1.0, 5.0, 3.0]), jnp.array([True, False, True]))) == 2.0


def test_pca_matches_sklearn_up_to_sign():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 40)) @ np.diag(np.linspace(3, 0.1, 40))
    ref = PCA(2).fit_transform(x)
    valid = np.ones(14, bool)
    valid[[3, 9]] = False
    xx = np.zeros((14, 40), np.float32)
    xx[valid] = x
    xx[~valid] = 1e6  # masked rows must not matter
    got = np.asarray(ru.pca([jnp.asarray(xx[:, :25]), jnp.asarray(xx[:, 25:])], jnp.asarray(valid)))
    np.testing.assert_allclose(np.abs(got[valid]), np.abs(ref), rtol=1e-3, atol=1e-3)
    assert np.all(got[~valid] == 0)


def test_kmeans_matches_sklearn_on_blobs():
    rng = np.random.default_rng(3)
    x = _blobs(rng, [(0, 0), (6, 0), (0, 6)], 8).astype(np.float32)
    lab, _, inertia = ru.kmeans(jax.random.key(0), jnp.asarray(x), jnp.ones(24), 3)
    sk = KMeans(3, n_init=10, random_state=0).fit(x)
    assert adjusted_rand_score(np.asarray(lab), sk.labels_) == 1.0
    np.testing.assert_allclose(float(inertia), sk.inertia_, rtol=1e-4)
    # weights 0 remove points; a traced k below k_max
    w = np.ones(24)
    w[:8] = 0
    lab, _, inertia = jax.jit(
        lambda k: ru.kmeans(jax.random.key(1), jnp.asarray(x), jnp.asarray(w), k, k_max=4)
    )(2)
    sk = KMeans(2, n_init=10, random_state=0).fit(x[8:])
    assert adjusted_rand_score(np.asarray(lab)[8:], sk.labels_) == 1.0
    np.testing.assert_allclose(float(inertia), sk.inertia_, rtol=1e-4)


def test_gap_statistic_counts_blobs():
    rng = np.random.default_rng(4)
    x = _blobs(rng, [(0, 0), (8, 0), (0, 8)], 7).astype(np.float32)
    f = jax.jit(ru.gap_statistic, static_argnames=("k_max", "num_refs"))
    k, gap, s = f(jax.random.key(0), jnp.asarray(x), jnp.ones(21, bool), k_max=6, num_refs=10)
    assert int(k) == 3 and gap.shape == (6,) and s.shape == (6,)
    one = [
        int(
            f(
                jax.random.key(i),
                jnp.asarray(rng.normal(size=(21, 2)), jnp.float32),
                jnp.ones(21, bool),
                k_max=6,
                num_refs=10,
            )[0]
        )
        for i in range(4)
    ]
    assert one == [1, 1, 1, 1]
    # invalid points are ignored: the third blob removed leaves 2 clusters
    valid = np.ones(21, bool)
    valid[14:] = False
    assert (
        int(f(jax.random.key(0), jnp.asarray(x), jnp.asarray(valid), k_max=6, num_refs=10)[0]) == 2
    )


def test_hdbscan_callback_matches_sklearn_under_jit_and_vmap():
    rng = np.random.default_rng(5)
    x = _blobs(rng, [(0, 0), (5, 5)], 9, 0.4).astype(np.float32)
    x = np.concatenate([x, [[20.0, -20.0]]]).astype(np.float32)
    ref = HDBSCAN(min_cluster_size=4, copy=True).fit_predict(x)
    f = jax.jit(lambda a, v: ru.hdbscan_labels(a, v, min_cluster_size=4))
    got = np.asarray(f(jnp.asarray(x), jnp.ones(19, bool)))
    np.testing.assert_array_equal(got, ref)
    valid = np.ones(19, bool)
    valid[0] = False
    got = np.asarray(f(jnp.asarray(x), jnp.asarray(valid)))
    assert got[0] == -2
    np.testing.assert_array_equal(
        got[1:], HDBSCAN(min_cluster_size=4, copy=True).fit_predict(x[1:])
    )
    # precomputed distances, "half" = n // 2 + 1, and vmap over a batch of problems
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)).astype(np.float32)
    g = jax.vmap(
        lambda a: ru.hdbscan_labels(
            a,
            jnp.ones(19, bool),
            min_cluster_size="half",
            min_samples=1,
            allow_single_cluster=True,
            metric="precomputed",
        )
    )
    out = np.asarray(g(jnp.stack([jnp.asarray(d), jnp.asarray(d)])))
    ref = HDBSCAN(
        min_cluster_size=10,
        min_samples=1,
        allow_single_cluster=True,
        metric="precomputed",
        copy=True,
    ).fit_predict(d.astype(np.float64))
    np.testing.assert_array_equal(out[0], ref)
    np.testing.assert_array_equal(out[1], ref)


def test_layer_selection_and_output_layer():
    params = {
        "conv1": {"kernel": jnp.zeros((3, 3, 1, 4))},
        "fc1": {"kernel": jnp.zeros((8, 16)), "bias": jnp.zeros(16)},
        "fc2": {"kernel": jnp.zeros((16, 10)), "bias": jnp.zeros(10)},
        "bn1": {"scale": jnp.zeros(4), "bias": jnp.zeros(4)},
    }
    assert ru.find_output_layer(params) == "fc2"
    assert ru.find_output_layer(params, num_classes=16) == "fc1"
    tree = {"params": params, "batch_stats": {"bn1": {"mean": jnp.zeros(4), "var": jnp.zeros(4)}}}
    stacked = jax.tree.map(lambda a: jnp.zeros((3, *a.shape)), tree)
    sizes = {k: ru.flat_rows(stacked, k).shape[1] for k in ("all", "params", "output")}
    assert sizes == {"all": 36 + 144 + 170 + 8 + 8, "params": 36 + 144 + 170 + 8, "output": 170}
    assert ru.flat_rows(stacked, ("conv1/",)).shape == (3, 36)
    with pytest.raises(ValueError, match="selects no leaf"):
        ru.flat_rows(stacked, ("nothing",))


def test_clip_factors_and_param_scaling():
    f = np.asarray(ru.clip_factors(jnp.array([0.0, 1.0, 4.0, jnp.inf]), jnp.float32(2.0)))
    np.testing.assert_allclose(f, [1.0, 1.0, 0.5, 0.0])
    tree = {"params": {"w": jnp.ones((2, 3))}, "batch_stats": {"m": jnp.ones((2, 3))}}
    out = ru.scale_params_rows(tree, jnp.array([0.5, 2.0]))
    np.testing.assert_allclose(np.asarray(out["params"]["w"]), [[0.5] * 3, [2.0] * 3])
    np.testing.assert_allclose(np.asarray(out["batch_stats"]["m"]), np.ones((2, 3)))
