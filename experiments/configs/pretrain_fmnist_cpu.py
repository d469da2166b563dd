"""The clean start of the CPU-scale experiments: FedAvg on Fashion-MNIST to 85% (at most 60 rounds).

    marsjax pretrain experiments/configs/pretrain_fmnist_cpu.py

(``marsjax sweep`` on a CPU-scale sweep runs this first when its result is missing.)
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _setup


def get_config():
    return _setup.fmnist_cpu()


def get_pretrain():
    return _setup.cpu_pretrain()
