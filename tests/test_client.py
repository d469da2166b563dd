import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marsjax.client import ClientData, make_local_train, make_normalize, num_local_steps
from marsjax.models import build_model
from marsjax.simulation import run_clients


class Linear(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(self.features)(x)


def _data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.integers(0, 256, (n, 8, 8, 1)), jnp.uint8)
    y = jnp.asarray(rng.integers(0, 10, n), jnp.int32)
    return x, y


def test_mapped_and_vmapped_clients_equal_python_loop():
    x, y = _data()
    counts = np.array([37, 5, 0, 18], np.int32)
    idx = np.zeros((4, 40), np.int32)
    start = 0
    for i, c in enumerate(counts):
        idx[i, :c] = np.arange(start, start + c) % 60
        start += c
    data = ClientData(x, y, jnp.asarray(idx), jnp.asarray(counts))
    model = build_model("simplenet", 10, width="small", batch_norm=True)
    v = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    train = make_local_train(
        model, make_normalize((0.3,), (0.37,)), lr=0.05, batch_size=8, epochs=2
    )
    keys = jax.random.split(jax.random.key(1), 4)

    def one(k, i, c):
        return train(v, k, data, i, c)

    args = (keys, jnp.asarray(idx), jnp.asarray(counts))
    loop = [jax.jit(one)(keys[i], args[1][i], args[2][i]) for i in range(4)]
    for strategy, chunk in (("vmap", None), ("map", None), ("map", 2)):
        got = jax.jit(lambda *a, s=strategy, c=chunk: run_clients(one, a, s, c))(*args)
        for i in range(4):
            want = loop[i]
            g = jax.tree.map(lambda t, i=i: t[i], got)
            for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(g)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # the empty client did not move; the others did
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(loop[2][0])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(
        np.asarray(loop[1][0]["params"]["fc2"]["kernel"]), np.asarray(v["params"]["fc2"]["kernel"])
    )


@pytest.mark.parametrize(
    "count,batch,epochs,drop_last",
    [(12, 4, 2, False), (10, 4, 1, False), (10, 4, 3, True), (3, 8, 2, False)],
)
def test_every_sample_visited_per_epoch(count, batch, epochs, drop_last):
    # A "model" with one counter per sample: loss = -sum(c[y]) with y = the sample's index, so one
    # SGD step with lr 1 adds 1 to the counter of every sample in the batch.
    n = 16
    x = jnp.zeros((n, 1, 1, 1), jnp.uint8)
    y = jnp.arange(n, dtype=jnp.int32)
    idx = jnp.asarray(np.r_[np.arange(3, 3 + count), np.zeros(16 - count)], jnp.int32)

    def loss_fn(params, bs, xb, yb, key, aux):
        return -jnp.sum(params["c"][yb]), bs

    train = make_local_train(
        nn.Dense(1),
        lambda z: z,
        lr=1.0,
        momentum=0.0,
        weight_decay=0.0,
        batch_size=batch,
        epochs=epochs,
        drop_last=drop_last,
        loss_fn=loss_fn,
    )
    out, _ = jax.jit(train)(
        {"params": {"c": jnp.zeros(n)}},
        jax.random.key(0),
        ClientData(x, y, idx[None], jnp.asarray([count])),
        idx,
        count,
    )
    c = np.asarray(out["params"]["c"])
    steps = int(num_local_steps(count, batch, epochs, None, drop_last))
    assert c.sum() == steps * batch
    owned = np.zeros(n, bool)
    owned[3 : 3 + count] = True
    assert c[~owned].sum() == 0  # never a sample of another client
    if not drop_last:
        per_epoch = -(-count // batch)
        # every owned sample at least once per epoch; the wrap-around fill of the last batch
        # repeats a sample at most ceil(per_epoch * batch / count) times per epoch
        assert c[owned].min() >= epochs
        assert c[owned].max() <= epochs * -(-per_epoch * batch // count)
    else:
        assert steps == epochs * (count // batch)


def test_sgd_matches_pytorch_semantics_by_hand():
    # One linear softmax layer; compare to a numpy re-derivation of torch.optim.SGD(momentum, wd).
    rng = np.random.default_rng(0)
    n, d, k, lr, mu, wd = 8, 5, 3, 0.1, 0.9, 5e-4
    xs = rng.normal(size=(n, d)).astype(np.float32)
    ys = rng.integers(0, k, n)
    model = Linear(k)
    v = model.init(jax.random.key(0), jnp.zeros((1, d)))
    x_img = jnp.asarray(xs.reshape(n, d, 1, 1))

    train = make_local_train(
        model,
        lambda z: z.reshape(z.shape[0], -1).astype(jnp.float32),
        lr=lr,
        momentum=mu,
        weight_decay=wd,
        batch_size=n,
        epochs=3,
    )
    data = ClientData(x_img, jnp.asarray(ys, jnp.int32), jnp.arange(n)[None], jnp.asarray([n]))
    out, _ = train(v, jax.random.key(0), data, jnp.arange(n), n)

    W = np.asarray(v["params"]["Dense_0"]["kernel"], np.float64)
    b = np.asarray(v["params"]["Dense_0"]["bias"], np.float64)
    bufW, bufb = np.zeros_like(W), np.zeros_like(b)
    for step in range(3):  # full batch: order does not matter
        z = xs @ W + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(n), ys] -= 1
        gW = xs.T @ p / n + wd * W
        gb = p.mean(0) + wd * b
        bufW = mu * bufW + gW if step else gW
        bufb = mu * bufb + gb if step else gb
        W, b = W - lr * bufW, b - lr * bufb
    got = out["params"]["Dense_0"]
    np.testing.assert_allclose(np.asarray(got["kernel"]), W, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["bias"]), b, rtol=1e-5, atol=1e-6)
