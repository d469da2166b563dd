"""The Defense interface: a pair of pure functions over stacked client updates (DESIGN.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import flax.linen as nn
import jax

from marsjax.types import Key, Updates, Variables

__all__ = [
    "Defense",
    "DefenseApplyFn",
    "DefenseContext",
    "DefenseInitFn",
    "DefenseResult",
    "EmptyState",
]

DefenseState = Any


class EmptyState(NamedTuple):
    """The state of a defense that keeps none."""


class DefenseResult(NamedTuple):
    """What a defense decides in one round.

    Attributes:
      update: the aggregated update, the tree of the global variables (no client axis). The
        server applies it with its rule (``marsjax.aggregation``).
      accepted: ``[N]`` float32 in ``[0, 1]``: each client's final aggregation weight relative to
        full acceptance; 0 = rejected. A client counts as flagged when ``accepted <= 0.5`` (the
        paper's rule for FoolsGold's soft weights), which drives TPR/FPR.
      scores: ``[N]`` float32 suspicion score, higher = more suspicious (logging, ROC curves).
    """

    update: Updates
    accepted: jax.Array
    scores: jax.Array


class DefenseInitFn(Protocol):
    def __call__(self, global_variables: Variables) -> DefenseState: ...


class DefenseApplyFn(Protocol):
    def __call__(
        self,
        key: Key,
        updates: Updates,
        state: DefenseState,
        *,
        global_variables: Variables,
        client_weights: jax.Array,
        client_ids: jax.Array,
    ) -> tuple[DefenseResult, DefenseState]:
        """Decides whom to accept and aggregates.

        Args:
          key: this round's defense key.
          updates: ``[N, ...]`` stacked client updates (client model minus global model), BN
            running statistics included.
          state: the defense's state from the previous round.
          global_variables: the global model the clients started from.
          client_weights: ``[N]`` float32 FedAvg weights (uniform, or by sample count); a 0 marks
            a row the round already dropped (non-finite upload): it must get ``accepted = 0`` and
            must not influence the others.
          client_ids: ``[N]`` int32 federation ids of the rows (the round shuffles its rows, so
            row ``i`` is a different client every round). The simulator always passes them;
            defenses with per-client state (FoolsGold's history, FLDetector's last updates) key
            it by id, never by row, and refuse to run without ids.
        """
        ...


class Defense(NamedTuple):
    """A server-side defense: ``init(global_variables) -> state`` and ``apply`` (see above)."""

    init: DefenseInitFn
    apply: DefenseApplyFn


class DefenseContext(NamedTuple):
    """Static facts a defense factory may need, given by the simulator (Python values).

    Every fact is a declared field that the simulator fills from the config; a defense reads
    the field, never a default of its own in its place.

    Attributes:
      model: the flax module (for defenses that run the model, e.g. DeepSight, FLTrust).
      num_clients: total clients in the federation.
      clients_per_round: N, the size of the client axis.
      attackers_per_round: the configured number of attackers per round (Multi-Krum's ``f``), or
        the expected number when attackers are sampled at random.
      num_classes: output size.
      image_shape: ``(H, W, C)``.
      normalize: ``uint8 images -> float32 model inputs``.
      server_rule: how the server applies the aggregate (``marsjax.aggregation.rule_scale``):
        ``"mean"`` (``global += server_lr * update``) or ``"sum"`` (``global += eta /
        num_clients * sum of accepted updates``, the official code). Defenses that act on the
        next global model (BackdoorIndicator plants its task through the update) need it.
      server_lr: the ``mean`` rule's step.
      eta: the ``sum`` rule's server learning rate.
      train: the benign clients' :class:`~marsjax.config.TrainConfig` (FLTrust trains its
        server update with it).
      server_data: optional ``(x uint8 [n, H, W, C], y int32 [n])`` clean data held by the server
        (FLTrust root data, BackdoorIndicator), or ``None``.
    """

    model: nn.Module
    num_clients: int
    clients_per_round: int
    attackers_per_round: int
    num_classes: int
    image_shape: tuple[int, int, int]
    normalize: Callable[[jax.Array], jax.Array]
    server_rule: str
    server_lr: float
    eta: float
    train: Any
    server_data: tuple[Any, Any] | None = None
