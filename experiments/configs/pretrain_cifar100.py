"""The clean start of the paper's cifar100 experiments (FedAvg from scratch, no attack).

    marsjax pretrain experiments/configs/pretrain_cifar100.py

Target accuracy and round cap: ``_setup.paper_pretrain("cifar100")`` (the official runs resume a
clean model; mars_spec §2.2, §6.10). The attack experiments start from
``experiments/results/cifar100/pretrain``; ``marsjax sweep`` runs this first when it is missing.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _setup


def get_config():
    return _setup.cifar100()


def get_pretrain():
    return _setup.paper_pretrain("cifar100")
