"""The contract every registered defense keeps (parametrized over ``defenses.REGISTRY``, so
defenses registered later are covered automatically):

* ``apply`` runs under ``jax.jit``; ``accepted``/``scores`` are float32 ``[N]``; the update has the
  global variables' tree, shapes and dtypes; the state keeps its structure round to round;
* the aggregate is what the defense documents, checked against an independent numpy/scipy
  computation on all-benign input and on hostile input: the weighted mean (``client_weights *
  accepted``) of the uploads, every leaf, to ``rtol 1e-5``; the documented exceptions
  (``NOT_A_WEIGHTED_MEAN``: coordinate-wise statistics, clipping, noise, rescaling, pruning,
  the indicator implant) each have their own check;
* permuting the clients permutes ``accepted`` and leaves the aggregate unchanged;
* hostile uploads as the round delivers them (NaN / Inf rows and 1e30 rows, whose float32 squared
  norm overflows, zeroed with weight 0; all-zero rows; exact copies) get ``accepted = 0`` where
  dropped, and the aggregate's norm stays within the bound of the defense's rule (a finite 1e29
  is a failure); the baselines also reject raw NaN / Inf rows given a positive weight and stay
  finite with a raw 1e30 row; through ``simulation`` with an attack that uploads NaN and 1e30 too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from marsjax import attacks, defenses, simulation
from marsjax.client import make_normalize
from marsjax.config import TrainConfig, get_preset, override
from marsjax.data import load_dataset
from marsjax.defenses import _fltrust
from marsjax.models import build_model

N = 10
NAMES = sorted(defenses.REGISTRY)

# Smaller settings so that every defense compiles and runs in seconds on a CPU.
FAST_OPTIONS = {
    "deepsight": {"num_samples": 100, "batch_size": 50},
    "indicator": {"epochs": 1, "num_ood": 64, "batch_size": 32},
    "fltrust": {"batch_size": 16, "local_epochs": 1},
    "rflbat": {"n_init": 3},
}

# Defenses whose aggregate is not the weighted mean of the rows they accept, by design; each has
# its own check in ``check_aggregate``. Every other defense (FedAvg, Krum and Multi-Krum, whose
# aggregate is the mean of the selected rows, FoolsGold with its soft weights, RFLBAT,
# FLDetector, MARS, MARS*) must return exactly that weighted mean.
NOT_A_WEIGHTED_MEAN = {
    "median": "coordinate-wise median of the valid rows (numpy.median)",
    "trimmed_mean": "coordinate-wise trimmed mean, f = attackers_per_round cut per side "
    "(scipy.stats.trim_mean)",
    "norm_clipping": "params rows clipped to the median norm of the valid rows, then averaged",
    "deepsight": "accepted rows clipped to the median norm of the valid rows, then averaged",
    "flame": "accepted rows clipped to the median norm, averaged, plus N(0, (0.001 S)^2) noise "
    "on every parameter",
    "fltrust": "rows rescaled to the norm of the server's own update g0, weighted by "
    "ReLU(cos(row, g0))",
    "fedclp": "CLP prunes outlier channels of every local model (the channel's BN scale and bias "
    "become 0, so its update is -global), then FedAvg",
    "indicator": "the returned update also plants the indicator task in the global model (no "
    "closed form; only round 0's acceptance is checked)",
}
TRIMMED = 2  # the contract's attackers_per_round: trimmed_mean's default cut per side
FLAME_LAMDA = 0.001  # FLAME's default noise level

# The baselines of this package also reject raw non-finite rows given a positive weight
# (the round never sends those; the interface only requires weight-0 rows to be ignored).
SELF_SANITIZING = [n for n in NAMES if n not in ("fedavg", "mars", "mars_star")]


@pytest.fixture(scope="module")
def setup():
    ds = load_dataset("digits")
    model = build_model("simplenet", ds.num_classes, width="small", batch_norm=True)
    norm = make_normalize(ds.mean, ds.std)
    ctx = defenses.DefenseContext(
        model=model,
        num_clients=N,
        clients_per_round=N,
        attackers_per_round=TRIMMED,
        num_classes=ds.num_classes,
        image_shape=ds.image_shape,
        normalize=norm,
        server_rule="mean",
        server_lr=1.0,
        eta=0.8,
        train=TrainConfig(),
        server_data=(ds.x_train[:32], ds.y_train[:32]),
    )
    g = model.init(jax.random.key(0), jnp.zeros((1, *ds.image_shape), jnp.float32))
    rng = np.random.default_rng(0)

    def stacked(base, noise):
        return jax.tree.map(
            lambda b: jnp.asarray(b[None] + noise * rng.normal(size=(N, *b.shape)), jnp.float32),
            base,
        )

    base = jax.tree.map(lambda a: 0.02 * rng.normal(size=a.shape), g)
    benign = stacked(base, 0.002)
    hostile_base = jax.tree.map(lambda a: -0.2 * rng.normal(size=a.shape), g)
    outliers = jax.tree.map(
        lambda b, h: b.at[N - 2 :].set(
            jnp.asarray(h[None] + 0.001 * rng.normal(size=(2, *h.shape)), jnp.float32)
        ),
        benign,
        hostile_base,
    )
    return {"ctx": ctx, "g": g, "benign": benign, "outliers": outliers, "ds": ds}


_BUILT = {}


def _defense(name, setup):
    if name not in _BUILT:
        d = defenses.make(name, setup["ctx"], **FAST_OPTIONS.get(name, {}))
        _BUILT[name] = (d, jax.jit(d.apply))
    return _BUILT[name]


def _apply(name, setup, updates, weights=None, key=0):
    d, fn = _defense(name, setup)
    g = setup["g"]
    state = d.init(g)
    w = jnp.ones(N) if weights is None else jnp.asarray(weights, jnp.float32)
    res, new_state = fn(
        jax.random.key(key),
        updates,
        state,
        global_variables=g,
        client_weights=w,
        client_ids=jnp.arange(N, dtype=jnp.int32),
    )
    return res, state, new_state


def _params_vector(tree):
    return np.concatenate(
        [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree["params"])]
    )


def _all_finite(tree):
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(tree))


def _path(p) -> str:
    return "/".join(str(k.key) for k in p)


def _rows64(tree) -> dict:
    """``{path: float64 [N, d]}`` of a stacked tree (``path`` like ``params/fc1/kernel``)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path(p): np.asarray(x, np.float64).reshape(x.shape[0], -1) for p, x in flat}


def _leaves64(tree) -> dict:
    """``{path: float64 [d]}`` of an unstacked tree."""
    return {k: v[0] for k, v in _rows64(jax.tree.map(lambda x: np.asarray(x)[None], tree)).items()}


def _is_param(path: str) -> bool:
    return path.startswith("params/")


def _param_norms(rows: dict) -> np.ndarray:
    return np.sqrt(sum(np.sum(v**2, axis=1) for k, v in rows.items() if _is_param(k)))


def _wmean(rows: dict, weights: np.ndarray) -> dict:
    total = weights.sum()
    if total <= 0:
        return {k: np.zeros(v.shape[1]) for k, v in rows.items()}
    return {k: weights @ v / total for k, v in rows.items()}


def _clip_params(rows: dict, bound: float) -> dict:
    norms = _param_norms(rows)
    f = np.where(norms > bound, bound / np.where(norms > 0, norms, 1.0), 1.0)
    return {k: (v * f[:, None] if _is_param(k) else v) for k, v in rows.items()}


def _assert_leaves_close(got: dict, want: dict, rtol=1e-5, what=""):
    assert got.keys() == want.keys()
    for k, v in got.items():
        atol = rtol * max(float(np.max(np.abs(want[k]))), 1e-12)
        np.testing.assert_allclose(v, want[k], rtol=rtol, atol=atol, err_msg=f"{what} {k}")


def _norm(leaves: dict) -> float:
    return float(np.sqrt(sum(np.sum(v**2) for v in leaves.values())))


@functools.cache
def _fltrust_g0(setup_id: int, key: int):
    """FLTrust's server update g0 for ``_apply(..., key=key)``: the server trains the global model
    on its root data like a client (``marsjax.client`` local training, tested on its own)."""
    s = _SETUPS[setup_id]
    ctx, t = s["ctx"], s["ctx"].train
    opts = FAST_OPTIONS["fltrust"]
    fn = _fltrust.server_update_fn(
        ctx.model,
        ctx.normalize,
        *ctx.server_data,
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        batch_size=opts["batch_size"],
        local_epochs=opts["local_epochs"],
        local_steps=t.local_steps,
    )
    return _leaves64(jax.jit(fn)(jax.random.key(key), s["g"]))


_SETUPS: dict = {}


def _g0(setup, key=0) -> dict:
    _SETUPS[id(setup)] = setup
    return _fltrust_g0(id(setup), key)


def _clp_pruned(setup, rows: dict, valid: np.ndarray, u: float = 3.0) -> dict:
    """CLP's decision per local model, computed with numpy: ``{bn path: bool [N, C]}``.

    Channel ``k`` of a convolution followed by a BatchNorm scores the largest singular value of
    its ``(C_in, kh*kw)`` kernel slice times ``|gamma_k / sqrt(var_k + 1e-5)|`` of the local model
    (global + update); channels above ``mean + u * std`` (``ddof=1``) of their layer are pruned.
    """
    g = setup["g"]
    gl = _leaves64(g)
    out = {}
    convs = [k for k in g["params"] if g["params"][k].get("kernel", np.zeros(0)).ndim == 4]
    assert convs, "the contract model has convolutions"
    for conv in convs:
        bn = conv.replace("conv", "bn")
        assert bn in g["params"], f"{conv} has no BatchNorm partner in the contract model"
        shape = g["params"][conv]["kernel"].shape
        kern = gl[f"params/{conv}/kernel"][None] + rows[f"params/{conv}/kernel"]
        kern = kern.reshape(-1, *shape)
        gamma = gl[f"params/{bn}/scale"][None] + rows[f"params/{bn}/scale"]
        var = gl[f"batch_stats/{bn}/var"][None] + rows[f"batch_stats/{bn}/var"]
        var = np.where(np.isnan(var) | (var < 0), 0.0, var)
        n, c = kern.shape[0], shape[-1]
        sig = np.array(
            [
                [
                    np.linalg.svd(kern[i, ..., k].reshape(-1, shape[2]), compute_uv=False)[0]
                    for k in range(c)
                ]
                for i in range(n)
            ]
        )
        lips = sig * np.abs(gamma / np.sqrt(var + 1e-5))
        thr = lips.mean(1, keepdims=True) + u * lips.std(1, ddof=1, keepdims=True)
        out[bn] = (lips > thr) & valid[:, None]
    return out


def check_aggregate(name, setup, ups, weights, res, key=0):
    """``res.update`` against an independent computation of the defense's documented rule, from
    the rows it accepted; returns the bound on the aggregate's norm that the rule implies."""
    rows = _rows64(ups)
    w = np.asarray(weights, np.float64)
    acc = np.asarray(res.accepted, np.float64)
    valid = (w > 0) & np.all([np.all(np.isfinite(v), axis=1) for v in rows.values()], axis=0)
    rows = {k: np.where(valid[:, None], v, 0.0) for k, v in rows.items()}
    got = _leaves64(res.update)
    norms = np.sqrt(sum(np.sum(v**2, axis=1) for v in rows.values()))
    bound = norms[valid].max() * (1 + 1e-5)  # a convex combination of (shrunk) valid rows
    pnorms = _param_norms(rows)
    s_med = float(np.median(pnorms[valid]))
    if name == "median":
        want = {k: np.median(v[valid], axis=0) for k, v in rows.items()}
        _assert_leaves_close(got, want, what=name)
        bound = _norm({k: np.max(np.abs(v[valid]), axis=0) for k, v in rows.items()})
    elif name == "trimmed_mean":
        nv = int(valid.sum())
        k = min(TRIMMED, (nv - 1) // 2)
        assert int(k / nv * nv) == k  # trim_mean cuts int(proportion * n) per side
        want = {p: scipy.stats.trim_mean(v[valid], k / nv, axis=0) for p, v in rows.items()}
        _assert_leaves_close(got, want, what=name)
        bound = _norm({p: np.max(np.abs(v[valid]), axis=0) for p, v in rows.items()})
    elif name == "norm_clipping":
        np.testing.assert_array_equal(acc, valid.astype(np.float64))
        _assert_leaves_close(got, _wmean(_clip_params(rows, s_med), w * valid), what=name)
    elif name == "deepsight":
        _assert_leaves_close(got, _wmean(_clip_params(rows, s_med), w * acc), what=name)
    elif name == "flame":
        want = _wmean(_clip_params(rows, s_med), w * acc)
        noise = np.concatenate([got[k] - want[k] for k in got if _is_param(k)])
        sigma = FLAME_LAMDA * s_med
        # BN statistics get no noise; every parameter gets N(0, sigma^2)
        _assert_leaves_close(
            {k: v for k, v in got.items() if not _is_param(k)},
            {k: v for k, v in want.items() if not _is_param(k)},
            what=name,
        )
        assert abs(noise.std() / sigma - 1.0) < 0.05, (noise.std(), sigma)
        assert abs(noise.mean()) < 5 * sigma / np.sqrt(noise.size)
        bound += 1.5 * sigma * np.sqrt(noise.size)
    elif name == "fltrust":
        g0 = _g0(setup, key)
        p = [k for k in rows if _is_param(k)]
        g0v = np.concatenate([g0[k] for k in p])
        x = np.concatenate([rows[k] for k in p], axis=1)
        n0 = np.linalg.norm(g0v)
        cos = x @ g0v / np.maximum(np.linalg.norm(x, axis=1) * n0, 1e-30)
        ts = np.where(valid, np.maximum(cos, 0.0), 0.0)
        clear = np.abs(cos) > 1e-4  # (a float32 cosine within 1e-4 of 0 may fall either way)
        np.testing.assert_array_equal(acc[clear], (ts[clear] > 0).astype(np.float64))
        factor = np.where(pnorms > 0, n0 / np.where(pnorms > 0, pnorms, 1.0), 0.0)
        rescaled = {k: (v * factor[:, None] if _is_param(k) else v) for k, v in rows.items()}
        _assert_leaves_close(got, _wmean(rescaled, ts * w), rtol=1e-4, what=name)
        bn = np.sqrt(sum(np.sum(v**2, axis=1) for k, v in rows.items() if not _is_param(k)))
        bound = np.sqrt(n0**2 + bn[valid].max() ** 2) * (1 + 1e-4)
    elif name == "fedclp":
        np.testing.assert_array_equal(acc, valid.astype(np.float64))
        pruned = _clp_pruned(setup, rows, valid)
        gl = _leaves64(setup["g"])
        rows = dict(rows)
        for bn, mask in pruned.items():
            for leaf in ("scale", "bias"):
                k = f"params/{bn}/{leaf}"
                rows[k] = np.where(mask, -gl[k][None], rows[k])  # pruned: local value 0
        _assert_leaves_close(got, _wmean(rows, w * valid), what=name)
        bound = _norm(_wmean(rows, w * valid)) * (1 + 1e-5)
    elif name == "indicator":
        np.testing.assert_array_equal(acc, valid.astype(np.float64))  # round 0: no indicator yet
        bound = 10 * bound  # no closed form for the implant; one short epoch moves it little
    else:
        assert name not in NOT_A_WEIGHTED_MEAN
        _assert_leaves_close(got, _wmean(rows, w * acc), what=name)
    return bound


def check_jit_shapes_dtypes_and_state(name, setup):
    res, state, new_state = _apply(name, setup, setup["benign"])
    g = setup["g"]
    assert jax.tree.structure(res.update) == jax.tree.structure(g)
    for u, v in zip(jax.tree.leaves(res.update), jax.tree.leaves(g)):
        assert u.shape == v.shape and u.dtype == v.dtype
    for arr in (res.accepted, res.scores):
        assert arr.shape == (N,) and arr.dtype == jnp.float32
        assert np.isfinite(np.asarray(arr)).all()
    acc = np.asarray(res.accepted)
    assert np.all((acc >= 0) & (acc <= 1))
    assert _all_finite(res.update)
    # the state keeps its structure, shapes and dtypes (a scan over rounds needs that)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
        assert jnp.shape(a) == jnp.shape(b) and jnp.result_type(a) == jnp.result_type(b)


def check_all_benign_aggregate(name, setup):
    res, _, _ = _apply(name, setup, setup["benign"])
    bound = check_aggregate(name, setup, setup["benign"], np.ones(N), res)
    assert _norm(_leaves64(res.update)) <= bound
    if name != "fltrust":
        # (the synthetic benign rows are random directions, not trained on the data: FLTrust's
        # server update disagrees with all of them; check_fltrust_trusts_aligned_rows covers it)
        assert np.asarray(res.accepted).sum() >= 1


def check_fltrust_trusts_aligned_rows(setup):
    """Rows along the server's own update g0 (scaled 0.5..2.3, plus noise) are trusted, rows
    against it are not; the aggregate follows the rescaled trust-weighted mean."""
    g0 = _g0(setup)
    rng = np.random.default_rng(4)
    sign = np.where(np.arange(N) < N - 3, 1.0, -1.0)
    scale = sign * (0.5 + 0.2 * np.arange(N))

    def rows(x):
        x = np.asarray(x, np.float64)
        return x[None] * scale.reshape((-1,) + (1,) * x.ndim) + 1e-4 * rng.normal(
            size=(N, *x.shape)
        )

    g0_tree = jax.tree_util.tree_map_with_path(
        lambda p, a: g0[_path(p)].reshape(a.shape), setup["g"]
    )
    ups = jax.tree.map(lambda x: jnp.asarray(rows(x), jnp.float32), g0_tree)
    res, _, _ = _apply("fltrust", setup, ups)
    np.testing.assert_array_equal(np.asarray(res.accepted), (sign > 0).astype(np.float32))
    check_aggregate("fltrust", setup, ups, np.ones(N), res)


def check_fedclp_prunes(setup):
    """One local model with a channel of far larger Lipschitz bound: it is pruned in that model
    only (its BN scale and bias count as 0), and the aggregate follows."""
    g = setup["g"]
    conv = max(k for k in g["params"] if k.startswith("conv"))
    ups = jax.tree.map(lambda u: np.array(u), setup["benign"])
    k = ups["params"][conv]["kernel"]
    k[5, ..., 3] += 50.0 * np.asarray(g["params"][conv]["kernel"])[..., 3]
    ups = jax.tree.map(jnp.asarray, ups)
    res, _, _ = _apply("fedclp", setup, ups)
    pruned = _clp_pruned(setup, _rows64(ups), np.ones(N, bool))
    assert pruned[conv.replace("conv", "bn")][5, 3]  # the reference prunes it
    check_aggregate("fedclp", setup, ups, np.ones(N), res)


def check_permuting_clients_permutes_accepted(name, setup):
    perm = np.array([3, 9, 0, 5, 1, 8, 2, 7, 4, 6])
    ups = setup["outliers"]
    res, _, _ = _apply(name, setup, ups)
    res_p, _, _ = _apply(name, setup, jax.tree.map(lambda u: u[perm], ups))
    np.testing.assert_allclose(
        np.asarray(res_p.accepted), np.asarray(res.accepted)[perm], atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(res_p.scores), np.asarray(res.scores)[perm], rtol=1e-3, atol=1e-5
    )
    np.testing.assert_allclose(
        _params_vector(res_p.update), _params_vector(res.update), rtol=1e-3, atol=1e-5
    )


def _hostile(setup, raw: bool):
    """Rows 0: NaN entry, 1: +Inf entry, 2: all 1e30, 3: all zeros, 4: exact copy of row 5.

    ``raw=False``: what the round delivers: rows with a non-finite entry or a non-finite float32
    squared norm (the 1e30 row) zeroed with weight 0 (``marsjax.simulation``'s rule, redone here
    in numpy). ``raw=True``: every row as uploaded, weight 1.
    """
    ups = setup["outliers"]

    def f(u):
        u = np.array(u)
        u[0].flat[0] = np.nan
        u[1].flat[-1] = np.inf
        u[2] = 1e30
        u[3] = 0.0
        u[4] = u[5]
        return jnp.asarray(u)

    ups = jax.tree.map(f, ups)
    w = np.ones(N, np.float32)
    if not raw:
        leaves = [np.asarray(x).reshape(N, -1) for x in jax.tree.leaves(ups)]
        with np.errstate(over="ignore", invalid="ignore"):
            sq = sum(np.sum(np.square(x), axis=1, dtype=np.float32) for x in leaves)
        keep = np.all([np.isfinite(x).all(1) for x in leaves], axis=0) & np.isfinite(sq)
        np.testing.assert_array_equal(keep, np.arange(N) > 2)  # rows 0-2 are dropped
        ups = jax.tree.map(
            lambda u: jnp.where(keep.reshape((-1,) + (1,) * (u.ndim - 1)), u, 0), ups
        )
        w[~keep] = 0.0
    return ups, w


def check_hostile_uploads_as_delivered(name, setup):
    ups, w = _hostile(setup, raw=False)
    res, _, _ = _apply(name, setup, ups, w)
    assert _all_finite(res.update)
    acc, sc = np.asarray(res.accepted), np.asarray(res.scores)
    assert np.isfinite(acc).all() and np.isfinite(sc).all()
    np.testing.assert_array_equal(acc[:3], 0)
    bound = check_aggregate(name, setup, ups, w, res)
    norm = _norm(_leaves64(res.update))
    assert norm <= bound, f"{name}: aggregate norm {norm:.3g} > {bound:.3g}"


def check_raw_hostile_uploads(name, setup):
    """Raw NaN/Inf rows with a positive weight (the round never sends those) are rejected; a raw
    1e30 row (the round drops it, tests/test_hostile.py) leaves the aggregate finite."""
    ups, w = _hostile(setup, raw=True)
    res, _, _ = _apply(name, setup, ups, w)
    assert _all_finite(res.update)
    acc, sc = np.asarray(res.accepted), np.asarray(res.scores)
    assert np.isfinite(acc).all() and np.isfinite(sc).all()
    assert acc[0] == 0 and acc[1] == 0
    new_global = jax.tree.map(lambda g, u: g + u, setup["g"], res.update)
    assert _all_finite(new_global)


@pytest.mark.parametrize("name", NAMES)
def test_defense_contract(name, setup):
    """All checks of one defense in one test, so that it compiles once per test process."""
    check_jit_shapes_dtypes_and_state(name, setup)
    check_all_benign_aggregate(name, setup)
    if name == "fltrust":
        check_fltrust_trusts_aligned_rows(setup)
    if name == "fedclp":
        check_fedclp_prunes(setup)
    check_permuting_clients_permutes_accepted(name, setup)
    check_hostile_uploads_as_delivered(name, setup)
    if name in SELF_SANITIZING:
        check_raw_hostile_uploads(name, setup)


# ------------------------------------------------------------------------------------------------
# Through the compiled round, with an attack that uploads NaN and 1e30


def _hostile_attack(ctx: attacks.AttackContext) -> attacks.Attack:
    def craft(key, updates, state, c):
        rank = jnp.cumsum(c.is_malicious) * c.is_malicious  # 1 for the first attacker, 2, ...

        def f(u):
            r = rank.reshape((-1,) + (1,) * (u.ndim - 1))
            u = jnp.where(r == 1, jnp.nan, u)
            return jnp.where(r == 2, jnp.asarray(1e30, u.dtype), u)

        return jax.tree.map(f, updates), state

    return attacks.Attack(
        init=lambda v: attacks.EmptyState(),
        poison=lambda key, x, y, s: (x, y),
        craft=craft,
        trigger=lambda x, s: x,
    )


def test_round_with_nan_and_huge_uploads_stays_finite(setup, monkeypatch):
    name = "multikrum"
    monkeypatch.setitem(attacks.REGISTRY, "hostile_test", _hostile_attack)
    cfg = override(
        get_preset("demo", defense=name),
        {"attack.name": "hostile_test", "attack.options": {}, "run.rounds": 2},
    )
    sim = simulation.build(cfg, setup["ds"])
    state = sim.init_state()
    for _ in range(2):
        state, m = sim.round_step(state, sim.data)
        # the NaN upload and the 1e30 one (its squared norm overflows float32) are both dropped
        # before the defense sees them
        assert int(m["num_dropped"]) == 2
        assert _all_finite(state.global_variables)
        mal = np.asarray(m["is_attacking"])
        assert np.all(np.asarray(m["accepted"])[mal] == 0) and int(m["reverted"]) == 0
