"""The Attack interface: pure functions over batches and stacked client updates (DESIGN.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax

from marsjax.client import ClientData
from marsjax.data.triggers import Trigger
from marsjax.types import Key, Updates, Variables

__all__ = ["Attack", "AttackContext", "CraftContext", "EmptyState"]

AttackState = Any


class EmptyState(NamedTuple):
    """The state of an attack that keeps none."""


class CraftContext(NamedTuple):
    """What the round hands to ``craft`` (all traced values).

    Attributes:
      global_variables: the global model of this round (the clients' starting point).
      round: int32 round number.
      client_ids: ``[N]`` int32 ids of the sampled clients (row ``i`` of ``updates``).
      is_malicious: ``[N]`` bool, the sampled attackers (attack active this round).
      data: the federation's :class:`~marsjax.client.ClientData` (attackers read their shards).
      counts: ``[N]`` int32 sample counts of the sampled clients.
    """

    global_variables: Variables
    round: jax.Array
    client_ids: jax.Array
    is_malicious: jax.Array
    data: ClientData
    counts: jax.Array


class Attack(NamedTuple):
    """An attack: ``init``, data-level ``poison``, update-level ``craft`` and the test ``trigger``.

    * ``init(global_variables) -> state``.
    * ``poison(key, x_uint8 [B, ...], y [B], state) -> (x, y)``: applied to every batch of an
      attacking client during its local training (trigger + relabel).
    * ``craft(key, updates [N, ...], state, ctx: CraftContext) -> (updates, state)``: rewrites the
      malicious rows (scaling, a shared backdoored model, 3DFed's masks and indicators); it runs
      only in rounds where the attack is active.
    * ``trigger(x_uint8 [B, ...], state) -> x``: stamps the backdoor trigger on test images (ASR).
    * ``asr_images``: ``None`` (the ASR is measured on the triggered test set), or ``[M, H, W, C]``
      uint8 images (host numpy) on which it is measured instead, each through ``trigger``: the
      attack's own backdoor set (the held-out part of a semantic backdoor's subset).
    """

    init: Callable[[Variables], AttackState]
    poison: Callable[[Key, jax.Array, jax.Array, AttackState], tuple[jax.Array, jax.Array]]
    craft: Callable[[Key, Updates, AttackState, CraftContext], tuple[Updates, AttackState]]
    trigger: Callable[[jax.Array, AttackState], jax.Array]
    asr_images: Any = None


class AttackContext(NamedTuple):
    """Static facts an attack factory may need (Python values), given by the simulator.

    Attributes:
      model: the flax module.
      normalize: uint8 images -> model inputs.
      train: the benign clients' ``TrainConfig`` (lr, momentum, batch size, epochs, ...).
      target_label: backdoor target class.
      poison_fraction: share of each attacker batch that is poisoned.
      trigger: the fixed pixel trigger (:class:`~marsjax.data.triggers.Trigger`).
      num_classes: output size.
      image_shape: ``(H, W, C)``.
      num_clients: clients in the federation.
      num_attackers: malicious clients in the federation.
      clients_per_round: N.
      attackers_per_round: attackers among them (configured or expected).
      dataset: the loaded :class:`~marsjax.data.Dataset` (host numpy; attacks that select
        training images by content, such as the semantic backdoor), or ``None``.
    """

    model: nn.Module
    normalize: Callable[[jax.Array], jax.Array]
    train: Any
    target_label: int
    poison_fraction: float
    trigger: Trigger
    num_classes: int
    image_shape: tuple[int, int, int]
    num_clients: int
    num_attackers: int
    clients_per_round: int
    attackers_per_round: int
    dataset: Any = None
