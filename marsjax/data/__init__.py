"""Datasets, client partitions and triggers."""

from marsjax.data.datasets import DATASETS, Dataset, DatasetError, load_dataset, load_idx
from marsjax.data.partition import (
    Partition,
    dirichlet_partition,
    iid_partition,
    sampled_partition,
)
from marsjax.data.triggers import Trigger, apply_trigger, pattern_trigger, poison_batch

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetError",
    "Partition",
    "Trigger",
    "apply_trigger",
    "dirichlet_partition",
    "iid_partition",
    "load_dataset",
    "load_idx",
    "pattern_trigger",
    "poison_batch",
    "sampled_partition",
]
