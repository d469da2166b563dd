"""MARS, the headline defense (Wan et al., NeurIPS 2025, arXiv:2509.20383), in one place.

=================================  =============================================================
:mod:`marsjax.mars.energy`         backdoor energy per convolution channel, CBE (the top-kappa
                                   part), the layer layout (which BatchNorm scales which conv)
:mod:`marsjax.mars.wasserstein`    the 1-D Wasserstein distance and the W1 matrix of CBE vectors
:mod:`marsjax.mars.clustering`     k-means and K-WMeans (2-means on the W1 matrix's rows)
:mod:`marsjax.mars.defense`        the MARS and MARS* defenses (:func:`mars`): one jit-able round
=================================  =============================================================

The baselines stay in :mod:`marsjax.defenses`, whose registry names MARS as ``mars`` and
``mars_star``. The former module paths (``marsjax.defenses.energy``, ``.wasserstein``,
``.clustering``, ``._mars``) still import: each is an alias of the module here.
"""

from marsjax.mars import clustering, defense, energy, wasserstein
from marsjax.mars.clustering import KMeansResult, k_wmeans, kmeans, wasserstein_kmeans
from marsjax.mars.defense import (
    MarsDecision,
    MarsState,
    mars,
    mars_cbe,
    mars_select,
    model_energy_layout,
)
from marsjax.mars.energy import (
    AmbiguousLayoutError,
    EnergyLayout,
    backdoor_energy,
    concentrated_backdoor_energy,
    energy_layout,
    module_call_order,
)
from marsjax.mars.wasserstein import wasserstein_1d, wasserstein_matrix, wasserstein_to_rows

__all__ = [
    "AmbiguousLayoutError",
    "EnergyLayout",
    "KMeansResult",
    "MarsDecision",
    "MarsState",
    "backdoor_energy",
    "clustering",
    "concentrated_backdoor_energy",
    "defense",
    "energy",
    "energy_layout",
    "k_wmeans",
    "kmeans",
    "mars",
    "mars_cbe",
    "mars_select",
    "model_energy_layout",
    "module_call_order",
    "wasserstein",
    "wasserstein_1d",
    "wasserstein_kmeans",
    "wasserstein_matrix",
    "wasserstein_to_rows",
]
