"""marsjax: federated learning under backdoor attack, in JAX.

One compiled program per round, clients as an array axis; MARS (arXiv:2509.20383,
:mod:`marsjax.mars`) and the baselines behind one :class:`~marsjax.defenses.Defense` interface,
attacks behind one :class:`~marsjax.attacks.Attack` interface.
"""

from marsjax import (
    aggregation,
    attacks,
    client,
    config,
    data,
    defenses,
    mars,
    metrics,
    models,
    tree,
)
from marsjax.config import (
    AttackConfig,
    ConfigError,
    DataConfig,
    DefenseConfig,
    ExperimentConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    validate,
)
from marsjax.simulation import RoundState, Simulation, build, run

__version__ = "0.1.0"

__all__ = [
    "AttackConfig",
    "ConfigError",
    "DataConfig",
    "DefenseConfig",
    "ExperimentConfig",
    "ModelConfig",
    "RoundState",
    "RunConfig",
    "Simulation",
    "TrainConfig",
    "aggregation",
    "attacks",
    "build",
    "client",
    "config",
    "data",
    "defenses",
    "mars",
    "metrics",
    "models",
    "run",
    "tree",
    "validate",
]
