"""The appendix sweeps (Tables 7, 13-19) build the grids they claim, without training anything.

Each sweep file's ``get_config()`` validates, and ``get_sweep()`` expands to valid runs in the
official MNIST setting (20 clients, 4 attackers, every client every round), 3 seeds per point,
with the attacks and defenses its table needs: the right attack (and its options) in every run,
MARS at the paper's epsilon with ``layers="all"`` exactly in the "mars_all" rows (Table 17), the
partial-layer attack's ``convs`` per column, 100 rounds for the Byzantine tables, the three CBE
distances for Table 7. The README's attack table lists every registered attack.
"""

from __future__ import annotations

import pathlib
import re

import pytest

from marsjax import attacks
from marsjax.cli import load_config
from marsjax.config import validate
from marsjax.sweep import expand, load_sweep

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "experiments" / "configs"

# file -> (attack labels -> attack name, rounds)
APPENDIX = {
    "appendix_table13_dyn": ({"dyn": "dyn", "clean": "none"}, 30),
    "appendix_table14_a3fl": ({"a3fl": "a3fl"}, 30),
    "appendix_table15_chameleon": ({"chameleon": "chameleon", "clean": "none"}, 30),
    "appendix_table16_semantic": ({"semantic": "semantic"}, 30),
    "appendix_table17_partial": (
        {
            "fc_only": "partial",
            "1conv_fc": "partial",
            "2convs_fc": "partial",
            "all_layers": "partial",
        },
        30,
    ),
    "appendix_table18_lfa": ({"lfa": "lfa", "clean": "none"}, 100),
    "appendix_table19_lie": (
        {"lie": "lie", "ipm": "ipm", "minmax": "minmax", "minsum": "minsum"},
        100,
    ),
}
PRESENT = [n for n in APPENDIX if (CONFIGS / f"{n}.py").exists()]


@pytest.mark.parametrize("name", PRESENT)
def test_appendix_sweep_builds_its_grid(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    rel = f"experiments/configs/{name}.py"
    cfg = validate(load_config(rel))
    assert cfg.data.name == "mnist" and cfg.data.num_clients == 20
    labels, rounds = APPENDIX[name]
    assert cfg.attack.name in set(labels.values())
    runs = expand(load_sweep(rel))
    defenses = {"mars", "fedavg", "multikrum", "flame"}
    if name == "appendix_table17_partial":
        defenses.add("mars_all")
    assert {r.labels["defense"] for r in runs} == defenses
    assert {r.labels["attack"] for r in runs} == set(labels)
    assert len(runs) == 3 * len(defenses) * len(labels)
    for r in runs:
        c = r.config
        assert c.run.seed in (0, 1, 2) and c.run.rounds == rounds
        assert c.data.num_clients == 20 and c.run.clients_per_round == 20
        assert c.attack.num_attackers == 4 and c.attack.target_label == 8
        assert c.attack.name == labels[r.labels["attack"]]
        d = r.labels["defense"]
        assert c.defense.name == ("mars" if d == "mars_all" else d)
        if c.defense.name == "mars":
            assert c.defense.options["epsilon"] == 0.03
            assert (c.defense.options.get("layers") == "all") == (d == "mars_all")
        if c.attack.name == "dyn":
            assert c.attack.options["threedfed_options"] == {"constants": "mnist"}
            assert c.attack.options["mra_options"] == {"scale": 5.0}
        if c.attack.name == "partial":
            convs = {"fc_only": 0, "1conv_fc": 1, "2convs_fc": 2, "all_layers": None}
            assert c.attack.options["convs"] == convs[r.labels["attack"]]


def test_all_appendix_sweeps_are_committed():
    assert PRESENT == list(APPENDIX)


def test_table7_sweeps_the_cbe_distance(monkeypatch):
    monkeypatch.chdir(ROOT)
    runs = expand(load_sweep("experiments/configs/table7_distance.py"))
    assert len(runs) == 9
    got = {(r.config.defense.options["distance"], r.seed) for r in runs}
    assert got == {(d, s) for d in ("wasserstein", "euclidean", "cosine") for s in (0, 1, 2)}
    for r in runs:
        assert r.config.defense.name == "mars" and r.config.attack.name == "cerp"
        assert r.config.defense.options["epsilon"] == 0.03
    assert (
        validate(load_config("experiments/configs/table7_distance.py")).defense.options["distance"]
        == "euclidean"
    )


def test_readme_attack_table_lists_every_registered_attack():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| attack | what it does |") :].split("\n\n", 1)[0]
    listed = set()
    for line in table.splitlines()[2:]:
        listed |= set(re.findall(r"`([a-z0-9_]+)`", line.split("|")[1]))
    assert listed == set(attacks.REGISTRY), sorted(set(attacks.REGISTRY) ^ listed)
