"""The MARS defense (marsjax.defenses._mars) on hand-made federations."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marsjax.config import TrainConfig
from marsjax.defenses._mars import MarsState, _build, _build_star, mars, model_energy_layout
from marsjax.defenses.base import DefenseContext

N = 20
NUM_ATTACKERS = 4
IMAGE_SHAPE = (8, 8, 3)
KEY0 = jax.random.key(0)


class TinyNet(nn.Module):
    """Three conv+BN layers (16/32/64 channels: CBE keeps 1 + 2 + 4 values) and a head."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i, width in enumerate((16, 32, 64)):
            x = nn.Conv(width, (3, 3), use_bias=False, name=f"conv{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x)
            x = nn.relu(x)
        return nn.Dense(10, name="fc")(x.mean((1, 2)))


CTX = DefenseContext(
    model=TinyNet(),
    num_clients=100,
    clients_per_round=N,
    attackers_per_round=NUM_ATTACKERS,
    num_classes=10,
    image_shape=IMAGE_SHAPE,
    normalize=lambda x: x.astype(jnp.float32) / 255.0,
    server_rule="mean",
    server_lr=1.0,
    eta=0.8,
    train=TrainConfig(),
)


def global_variables(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), jnp.float32)
    shapes = jax.eval_shape(TinyNet().init, jax.random.key(0), x)
    v = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), jnp.float32), shapes)
    for i in range(3):
        c = v["params"][f"bn{i}"]["scale"].shape[0]
        v["params"][f"bn{i}"]["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
        v["batch_stats"][f"bn{i}"]["var"] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
    return v


def federation(num_attackers: int = NUM_ATTACKERS, seed: int = 1, noise: float = 1e-3):
    """Benign updates: small noise on every leaf. Attackers (the first rows): two channels of
    ``conv2`` amplified 4x (concentrated high energy), on top of their own noise."""
    g = global_variables()
    rng = np.random.default_rng(seed)
    updates = jax.tree.map(
        lambda a: jnp.asarray(noise * rng.standard_normal((N, *a.shape)), jnp.float32), g
    )
    k = updates["params"]["conv2"]["kernel"]
    boost = 3.0 * g["params"]["conv2"]["kernel"][..., jnp.array([5, 9])]
    k = k.at[:num_attackers, ..., jnp.array([5, 9])].add(boost)
    updates["params"]["conv2"]["kernel"] = k
    return g, updates


def mean_of(updates, rows):
    return jax.tree.map(lambda u: jnp.mean(u[np.asarray(rows)], axis=0), updates)


@functools.cache
def compiled(star: bool = False, **options):
    defense = (_build_star if star else _build)(CTX, **options)
    traces = []

    @jax.jit
    def apply(updates, state, g, weights):
        traces.append(1)  # runs only while tracing
        return defense.apply(
            jax.random.key(7), updates, state, global_variables=g, client_weights=weights
        )

    apply.traces = traces
    return defense, apply


def run(updates, g, weights=None, state=None, star: bool = False, **options):
    defense, apply = compiled(star, **options)
    state = defense.init(g) if state is None else state
    weights = jnp.ones(N) if weights is None else weights
    result, _ = apply(updates, state, g, weights)
    return result


def assert_tree_close(a, b, **kw):
    chex.assert_trees_all_close(a, b, **{"rtol": 1e-5, "atol": 1e-7, **kw})


def test_rejects_concentrated_energy_attackers():
    g, updates = federation()
    r = run(updates, g)
    expected = np.r_[np.zeros(NUM_ATTACKERS), np.ones(N - NUM_ATTACKERS)]
    np.testing.assert_array_equal(r.accepted, expected)
    assert_tree_close(r.update, mean_of(updates, range(NUM_ATTACKERS, N)))
    assert np.min(r.scores[:NUM_ATTACKERS]) > np.max(r.scores[NUM_ATTACKERS:])
    assert r.accepted.dtype == jnp.float32 and r.scores.shape == (N,)


def test_all_benign_accepts_everyone():
    g, updates = federation(num_attackers=0)
    r = run(updates, g)
    np.testing.assert_array_equal(r.accepted, np.ones(N))
    assert_tree_close(r.update, mean_of(updates, range(N)))


def test_mars_star_keeps_the_majority():
    g, updates = federation(num_attackers=12)  # the high-energy group is now the majority
    np.testing.assert_array_equal(run(updates, g).accepted, np.r_[np.zeros(12), np.ones(8)])
    np.testing.assert_array_equal(
        run(updates, g, star=True).accepted, np.r_[np.ones(12), np.zeros(8)]
    )


def test_hostile_rows_are_rejected_and_output_stays_finite():
    g, updates = federation()
    p = updates["params"]
    p["conv1"]["kernel"] = p["conv1"]["kernel"].at[5, 0, 0, 0, 0].set(jnp.nan)
    p["fc"]["bias"] = p["fc"]["bias"].at[6, 3].set(jnp.inf)  # a leaf MARS does not score
    updates["batch_stats"]["bn2"]["var"] = updates["batch_stats"]["bn2"]["var"].at[8].set(-jnp.inf)
    p["bn0"]["scale"] = p["bn0"]["scale"].at[10].set(3e38)  # finite, but its energy overflows
    weights = jnp.ones(N).at[9].set(0.0)  # dropped by the round
    r = run(updates, g, weights)
    bad = [5, 6, 8, 9, 10]
    expected = np.ones(N)
    expected[:NUM_ATTACKERS] = 0  # the attackers are still found among the valid rows
    expected[bad] = 0
    np.testing.assert_array_equal(r.accepted, expected)
    chex.assert_tree_all_finite(r.update)
    assert np.isfinite(np.asarray(r.scores)).all()
    assert np.all(np.asarray(r.scores)[bad] >= np.asarray(r.scores)[:NUM_ATTACKERS].max())
    assert_tree_close(r.update, mean_of(updates, np.flatnonzero(expected)))


def test_huge_finite_rows_are_rejected():
    # 1e30 everywhere in a client's update: finite, but its energy overflows float32, so the row
    # is dropped before clustering and the attackers are still found among the others.
    g, updates = federation()
    updates = jax.tree.map(lambda u: u.at[6].set(1e30), updates)
    r = run(updates, g)
    expected = (np.arange(N) >= NUM_ATTACKERS) & (np.arange(N) != 6)
    np.testing.assert_array_equal(r.accepted, expected.astype(np.float32))
    chex.assert_tree_all_finite(r.update)
    assert np.isfinite(np.asarray(r.scores)).all()
    assert_tree_close(r.update, mean_of(updates, np.flatnonzero(expected)))


def test_traced_once_and_permutation_equivariant():
    g, updates = federation()
    perm = np.random.default_rng(0).permutation(N)
    permuted = jax.tree.map(lambda u: u[perm], updates)
    base = run(updates, g)
    for u in (federation(seed=2)[1], updates):  # same shapes and dtypes: no retrace
        run(u, g)
    r = run(permuted, g)
    np.testing.assert_array_equal(r.accepted, np.asarray(base.accepted)[perm])
    assert_tree_close(r.update, base.update)
    assert len(compiled(False)[1].traces) == 1


def test_epsilon_lives_in_the_state():
    g, updates = federation()
    r = run(updates, g, state=MarsState(jnp.float32(1e9)))  # same compiled program
    np.testing.assert_array_equal(r.accepted, np.ones(N))


def test_client_weights_and_chunking():
    g, updates = federation()
    weights = jnp.asarray(np.random.default_rng(3).uniform(0.5, 2.0, N), jnp.float32)
    r = run(updates, g, weights, chunk_size=8)
    np.testing.assert_array_equal(r.accepted[:NUM_ATTACKERS], 0)
    w = np.asarray(weights) * np.asarray(r.accepted)
    want = jax.tree.map(lambda u: jnp.tensordot(jnp.asarray(w / w.sum()), u, axes=1), updates)
    assert_tree_close(r.update, want, rtol=1e-4)


@pytest.mark.parametrize(
    "options",
    [{"clustering": "paper"}, {"layers": "all"}],
)
def test_variants_reject_the_attackers(options):
    g, updates = federation()
    r = run(updates, g, **options)
    np.testing.assert_array_equal(
        r.accepted, np.r_[np.zeros(NUM_ATTACKERS), np.ones(N - NUM_ATTACKERS)]
    )


def test_factory_validation_and_layout():
    with pytest.raises(ValueError, match="select"):
        mars(select="largest")
    with pytest.raises(ValueError, match="kappa"):
        mars(kappa=0.0)
    x = jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), jnp.float32)
    layout = model_energy_layout(TinyNet(), x)
    assert [(l.path, l.norm) for l in layout] == [((f"conv{i}",), (f"bn{i}",)) for i in range(3)]


def test_network_without_convolutions_falls_back_to_dense_layers():
    from marsjax.models import MLP

    ctx = CTX._replace(model=MLP(10, (16,)))
    with pytest.warns(UserWarning, match="no convolution"):
        defense = _build(ctx)
    x = jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), jnp.float32)
    g = jax.tree.map(
        lambda s: jnp.full(s.shape, 0.1, jnp.float32), jax.eval_shape(ctx.model.init, KEY0, x)
    )
    rng = np.random.default_rng(5)
    updates = jax.tree.map(
        lambda a: jnp.asarray(1e-3 * rng.standard_normal((N, *a.shape)), jnp.float32), g
    )
    k = updates["params"]["fc1"]["kernel"]
    updates["params"]["fc1"]["kernel"] = k.at[:NUM_ATTACKERS].add(2.0)  # far larger spectral norm
    r, _ = jax.jit(
        lambda u: defense.apply(
            KEY0, u, defense.init(g), global_variables=g, client_weights=jnp.ones(N)
        )
    )(updates)
    np.testing.assert_array_equal(
        r.accepted, np.r_[np.zeros(NUM_ATTACKERS), np.ones(N - NUM_ATTACKERS)]
    )
