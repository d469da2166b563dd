"""Dyn-Attack, the MARS paper's dynamic attacker (arXiv:2509.20383, Appendix, Table 13): every
attacker, every round, picks one of 3DFed, CerP, MRA or no attack at random. Re-implemented from
the paper's description; no code is copied.

Per attack round, inside the compiled round:

1. ``k_choice, k_craft = split(key)``; the attacker with client id ``i`` draws its attack from
   ``choices`` (default ``("3dfed", "cerp", "mra", "none")``) with probabilities ``probs``
   (default uniform) using ``fold_in(k_choice, i)`` (:func:`dyn_choices`): a fresh, independent
   draw per attacker and per round (the round's attack key changes every round).
2. Each candidate attack ``a`` runs its own ``craft`` with the key ``fold_in(k_craft, j)``
   (``j`` its position in :data:`DYN_ATTACKS`) and with ``is_malicious`` restricted to the
   attackers that picked it: the attackers that picked 3DFed are this round's 3DFed attackers
   (their noise masks cancel among them, they share one backdoored model), those that picked
   CerP run CerP together (cosine terms among themselves), those that picked MRA upload one
   shared scaled model. An attacker that picked ``"none"`` uploads its honestly trained update
   (the ``poison`` hook of all three attacks is the identity, so the simulator trained it like a
   benign client).
3. Each attacker's row is the row its attack wrote; benign rows come from 3DFed's output (its
   decoys, when it planted any), otherwise untouched.

Each candidate attack keeps its own state (:class:`DynState`) and only advances it in rounds in
which at least one attacker picked it (3DFed's indicator feedback then spans the rounds in
between, as with any gap in its attack rounds).

**Cost.** Each candidate runs under ``lax.cond`` on "at least one attacker picked it", so a round
costs the crafts of the attacks actually picked: at worst 3DFed + CerP + MRA in one round (about
three shared backdoor trainings plus one CerP training per CerP attacker), on average
``sum_a (1 - (1 - p_a)^n_adv)`` of them. Where the round is vmapped (batched sweeps over seeds),
``lax.cond`` becomes a select and every candidate runs every round.

**ASR.** The test trigger is one image transformation, while the candidates use two triggers:
MRA and 3DFed the pattern trigger, CerP its 24-pixel trigger. ``test_trigger="pattern"`` (the
default) measures the pattern backdoor, ``"cerp"`` CerP's (its ``trigger`` with its state). The
paper does not say which one its Table 13 measures.

Options of the candidates go in ``threedfed_options``, ``cerp_options`` and ``mra_options``
(dicts of the attacks' own options, e.g. ``{"constants": "mnist"}`` for 3DFed on MNIST).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from marsjax.attacks._3dfed import threedfed
from marsjax.attacks._cerp import cerp
from marsjax.attacks._mra import identity_poison, model_replacement, pattern_trigger_fn
from marsjax.attacks.base import Attack, AttackContext, CraftContext

__all__ = ["DYN_ATTACKS", "DynState", "dyn", "dyn_choices", "dyn_craft_key"]

# The candidate attacks that craft uploads, in the order that fixes their craft keys.
DYN_ATTACKS = ("3dfed", "cerp", "mra")
_FACTORIES = {"3dfed": threedfed, "cerp": cerp, "mra": model_replacement}
_ALL = (*DYN_ATTACKS, "none")
_TEST_TRIGGERS = ("pattern", "cerp")


class DynState(NamedTuple):
    """Dyn-Attack's state.

    Attributes:
      states: the candidate attacks' states, keyed by name (``"3dfed"``, ``"cerp"``, ``"mra"``).
      last_choice: ``[N]`` int32, the last attack round's pick per row (an index into
        ``choices``; -1 for benign rows).
      attack_rounds: int32, attack rounds so far.
    """

    states: dict
    last_choice: jax.Array
    attack_rounds: jax.Array


def dyn_choices(
    key: jax.Array, client_ids: jax.Array, is_malicious: jax.Array, probs: Sequence[float]
) -> jax.Array:
    """``[N]`` int32: each attacker row's pick (an index into ``probs``), -1 for benign rows.

    The attacker with client id ``i`` draws with ``fold_in(key, i)``, where ``key`` is the round's
    ``k_choice`` (the first half of ``split(craft key)``).
    """
    logits = jnp.log(jnp.asarray(probs, jnp.float32))

    def one(cid):
        return jax.random.categorical(jax.random.fold_in(key, cid), logits)

    pick = jax.vmap(one)(client_ids).astype(jnp.int32)
    return jnp.where(is_malicious, pick, -1)


def dyn_craft_key(key: jax.Array, name: str) -> jax.Array:
    """The craft key candidate ``name`` gets from the round's Dyn-Attack ``key``."""
    _, k_craft = jax.random.split(key)
    return jax.random.fold_in(k_craft, DYN_ATTACKS.index(name))


def _check_sub_options(name: str, options: Any) -> dict:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"attack.options.{name}_options must be a dict, got {options!r}")
    factory = _FACTORIES[name]
    allowed = set(inspect.signature(factory).parameters) - {"ctx"}
    bad = sorted(set(options) - allowed)
    if bad:
        raise ValueError(
            f"attack.options.{name}_options: unknown option(s) {bad} of attack {name!r}; "
            f"allowed: {sorted(allowed)}"
        )
    return dict(options)


def dyn(
    ctx: AttackContext,
    choices: tuple[str, ...] = ("3dfed", "cerp", "mra", "none"),
    probs: tuple[float, ...] | None = None,
    threedfed_options: dict | None = None,
    cerp_options: dict | None = None,
    mra_options: dict | None = None,
    test_trigger: str = "pattern",
) -> Attack:
    """Dyn-Attack: each attacker picks 3DFed, CerP, MRA or no attack at random every round.

    Args:
      ctx: static facts of the run.
      choices: the candidates, a subset of ``("3dfed", "cerp", "mra", "none")``.
      probs: their probabilities (default: uniform); must be positive and sum to 1.
      threedfed_options, cerp_options, mra_options: options of the candidate attacks.
      test_trigger: ``"pattern"`` (MRA's and 3DFed's trigger) or ``"cerp"`` (CerP's).
    """
    choices = tuple(choices)
    if not choices or len(set(choices)) != len(choices) or not set(choices) <= set(_ALL):
        raise ValueError(
            f"attack.options.choices must be distinct names among {_ALL}, got {choices!r}"
        )
    if probs is None:
        probs = (1.0 / len(choices),) * len(choices)
    probs = tuple(float(p) for p in probs)
    if len(probs) != len(choices) or min(probs) <= 0 or abs(sum(probs) - 1.0) > 1e-6:
        raise ValueError(
            f"attack.options.probs must be {len(choices)} positive numbers summing to 1, "
            f"got {probs}"
        )
    if test_trigger not in _TEST_TRIGGERS:
        raise ValueError(
            f"attack.options.test_trigger must be one of {_TEST_TRIGGERS}, got {test_trigger!r}"
        )
    if test_trigger == "cerp" and "cerp" not in choices:
        raise ValueError("attack.options.test_trigger='cerp' needs 'cerp' among the choices")
    sub_options = {
        "3dfed": _check_sub_options("3dfed", threedfed_options),
        "cerp": _check_sub_options("cerp", cerp_options),
        "mra": _check_sub_options("mra", mra_options),
    }
    subs = {a: _FACTORIES[a](ctx, **sub_options[a]) for a in DYN_ATTACKS if a in choices}
    n_rows = ctx.clients_per_round

    def init(global_variables) -> DynState:
        return DynState(
            {a: s.init(global_variables) for a, s in subs.items()},
            jnp.full((n_rows,), -1, jnp.int32),
            jnp.int32(0),
        )

    def craft(key, updates, state: DynState, c: CraftContext):
        k_choice, _ = jax.random.split(key)
        mal = c.is_malicious
        pick = dyn_choices(k_choice, c.client_ids, mal, probs)
        new_states = {}
        outs = {}
        for a, sub in subs.items():
            rows = mal & (pick == choices.index(a))
            ca = c._replace(is_malicious=rows)
            k_a = dyn_craft_key(key, a)

            def run(u, s, sub=sub, ca=ca, k_a=k_a):
                return sub.craft(k_a, u, s, ca)

            outs[a], new_states[a] = jax.lax.cond(
                jnp.any(rows), run, lambda u, s: (u, s), updates, state.states[a]
            )
        # Benign rows (and the "none" attackers): 3DFed's output where it ran (decoys), restored
        # to the honest update on attackers that did not pick 3DFed.
        out = outs.get("3dfed", updates)
        if "3dfed" in outs:
            keep = mal & (pick != choices.index("3dfed"))
            out = _select_rows(keep, updates, out)
        for a in ("cerp", "mra"):
            if a in outs:
                out = _select_rows(mal & (pick == choices.index(a)), outs[a], out)
        return out, DynState(new_states, pick, state.attack_rounds + 1)

    if test_trigger == "cerp":
        cerp_trigger = subs["cerp"].trigger

        def trigger(x, state: DynState):
            return cerp_trigger(x, state.states["cerp"])
    else:
        pattern = pattern_trigger_fn(ctx)

        def trigger(x, state):
            return pattern(x, state)

    return Attack(init, identity_poison, craft, trigger)


def _select_rows(rows: jax.Array, a, b):
    """Row ``i`` of ``a`` where ``rows[i]``, else of ``b`` (stacked trees)."""

    def f(x, y):
        m = rows.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(m, x, y)

    return jax.tree.map(f, a, b)
