"""Defenses behind one interface (:class:`Defense`), and their registry.

``REGISTRY`` maps a name to ``build(ctx: DefenseContext, **options) -> Defense``; ``options`` come
from ``DefenseConfig.options`` and are checked against the signature before anything compiles.

Baselines (one private module each; factories take plain hyperparameters, ``_build`` adapters fill
the defaults from the :class:`DefenseContext`):

=================  ==========================================================================
``fedavg``         no defense
``krum``           Krum (Blanchard et al., NeurIPS 2017)
``multikrum``      Multi-Krum, ``m = n - f`` (El Mhamdi et al., ICML 2018)
``median``         coordinate-wise median (Yin et al., ICML 2018)
``trimmed_mean``   coordinate-wise trimmed mean, ``f`` per side (Yin et al., ICML 2018)
``norm_clipping``  norm clipping + optional weak DP noise (Sun et al. 2019)
``flame``          FLAME (Nguyen et al., USENIX Security 2022), HDBSCAN via a host callback
``foolsgold``      FoolsGold (Fung et al., RAID 2020)
``rflbat``         RFLBAT (Wang et al. 2022)
``fldetector``     FLDetector (Zhang et al., KDD 2022)
``deepsight``      DeepSight (Rieger et al., NDSS 2022), HDBSCAN via a host callback
``fedclp``         CLP pruning of every local model, then FedAvg (Zheng et al., ECCV 2022)
``indicator``      BackdoorIndicator (Li & Dai, USENIX Security 2024)
``fltrust``        FLTrust (Cao et al., NDSS 2021), root data from ``ctx.server_data``
=================  ==========================================================================

MARS itself (``mars``, ``mars_star``) lives in :mod:`marsjax.mars` with its backdoor energy,
Wasserstein and clustering modules; it is registered here like the baselines.

The baselines' ``apply`` (and MARS's) also accept an optional ``client_ids`` keyword (``int32 [N]``,
the federation ids of the rows); FoolsGold and FLDetector use it to keep per-client history across
rounds, and fall back to a documented approximation without it.
"""

from __future__ import annotations

# clustering, energy, wasserstein and _mars: the former homes of MARS's modules, now aliases of
# marsjax.mars.* (imported so that marsjax.defenses.energy and the like stay attributes).
from marsjax.defenses import (
    _deepsight,
    _fedavg,
    _fedclp,
    _flame,
    _fldetector,
    _fltrust,
    _foolsgold,
    _indicator,
    _krum,
    _mars,
    _median,
    _norm_clipping,
    _rflbat,
    clustering,
    energy,
    wasserstein,
)
from marsjax.defenses._deepsight import deepsight
from marsjax.defenses._fedavg import fedavg
from marsjax.defenses._fedclp import fedclp
from marsjax.defenses._flame import flame
from marsjax.defenses._fldetector import fldetector
from marsjax.defenses._fltrust import fltrust
from marsjax.defenses._foolsgold import foolsgold
from marsjax.defenses._indicator import backdoor_indicator
from marsjax.defenses._krum import krum, multi_krum
from marsjax.defenses._median import median, trimmed_mean
from marsjax.defenses._norm_clipping import norm_clipping
from marsjax.defenses._rflbat import rflbat
from marsjax.defenses.base import Defense, DefenseContext, DefenseResult, EmptyState
from marsjax.mars import (
    backdoor_energy,
    concentrated_backdoor_energy,
    k_wmeans,
    kmeans,
    mars,
    wasserstein_1d,
    wasserstein_kmeans,
    wasserstein_matrix,
)

__all__ = [
    "NO_DETECTION",
    "REGISTRY",
    "Defense",
    "DefenseContext",
    "DefenseResult",
    "EmptyState",
    "backdoor_energy",
    "backdoor_indicator",
    "clustering",
    "concentrated_backdoor_energy",
    "deepsight",
    "energy",
    "fedavg",
    "fedclp",
    "flame",
    "fldetector",
    "fltrust",
    "foolsgold",
    "k_wmeans",
    "kmeans",
    "krum",
    "make",
    "mars",
    "median",
    "multi_krum",
    "norm_clipping",
    "rflbat",
    "trimmed_mean",
    "wasserstein",
    "wasserstein_1d",
    "wasserstein_kmeans",
    "wasserstein_matrix",
]

REGISTRY = {
    "fedavg": _fedavg._build,
    "krum": _krum._build_krum,
    "multikrum": _krum._build_multikrum,
    "median": _median._build_median,
    "trimmed_mean": _median._build_trimmed_mean,
    "norm_clipping": _norm_clipping._build,
    "flame": _flame._build,
    "foolsgold": _foolsgold._build,
    "rflbat": _rflbat._build,
    "fldetector": _fldetector._build,
    "deepsight": _deepsight._build,
    "fedclp": _fedclp._build,
    "indicator": _indicator._build,
    "fltrust": _fltrust._build,
    "mars": _mars._build,
    "mars_star": _mars._build_star,
}

# Defenses without detection decisions (they accept every upload and change it: FedCLP prunes
# every model): their TPR/FPR are not reported and CAD leaves them out (marsjax.metrics.cad).
NO_DETECTION = frozenset({"fedclp"})


def make(name: str, ctx: DefenseContext, **options) -> Defense:
    """Builds a registered defense."""
    if name not in REGISTRY:
        raise KeyError(f"unknown defense {name!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name](ctx, **options)
