"""marsjax.sweep: a 2x2 grid end to end, its tables against the runs' files, resuming, batching."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from marsjax import sweep as sweep_lib
from marsjax.config import ConfigError, get_preset, override
from marsjax.data import load_dataset
from marsjax.metrics import cad


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _tiny_base():
    """The digits demo federation, shrunk: 20 clients, 6 per round (2 attackers), 2 rounds."""
    return override(
        get_preset("demo"),
        {
            "data.num_clients": 20,
            "attack.num_attackers": 4,
            "attack.attackers_per_round": 2,
            "run.clients_per_round": 6,
            "run.rounds": 2,
            "run.eval_every": 1,
            "train.local_steps": 2,
        },
    )


def _grid(tmp_path, **kw):
    return sweep_lib.Sweep(
        name="tiny",
        base=_tiny_base(),
        axes={"attack.name": ["none", "badnets"], "defense.name": ["multikrum", "fedclp"]},
        attack_options={"badnets": {"scale": 3.0}},
        out_dir=str(tmp_path / "grid"),
        **kw,
    )


def test_expand_labels_options_and_errors(tmp_path):
    sw = sweep_lib.Sweep(
        name="x",
        base=override(_tiny_base(), {"defense.name": "mars", "defense.options": {"epsilon": 0.2}}),
        axes={
            "defense.name": ["fedavg", "mars"],
            "defense.options.kappa": [0.05, 0.5],
            "ratio": {"10%": {"attack.num_attackers": 2}, "20%": {"attack.num_attackers": 4}},
        },
        defense_options={"mars": {"epsilon": 0.1}},
        seeds=[0, 3],
        out_dir=str(tmp_path / "x"),
    )
    with pytest.raises(
        ConfigError, match=r"run fedavg__kappa=0.05__10-__s0: defense.options.kappa"
    ):
        sweep_lib.expand(sw)  # fedavg takes no kappa: the run and the field are named
    sw = sweep_lib.Sweep(
        name="x",
        base=sw.base,
        axes={
            "defense.name": ["mars"],
            **{k: v for k, v in sw.axes.items() if k != "defense.name"},
        },
        defense_options=sw.defense_options,
        seeds=[0, 3],
        out_dir=str(tmp_path / "x"),
    )
    runs = sweep_lib.expand(sw, pretrained="somewhere")
    assert len(runs) == 2 * 2 * 2
    r = runs[-1]
    assert r.id == "mars__kappa=0.5__20-__s3"
    assert r.labels == {"defense.name": "mars", "defense.options.kappa": "0.5", "ratio": "20%"}
    c = r.config
    # the name axis replaced the options (epsilon 0.1, not the base's 0.2), then kappa was set
    assert c.defense.options == {"epsilon": 0.1, "kappa": 0.5}
    assert c.attack.num_attackers == 4 and c.run.seed == 3
    assert c.run.init_checkpoint == "somewhere"
    assert c.run.out_dir == (tmp_path / "x" / "runs" / r.id).as_posix()
    with pytest.raises(ConfigError, match="needs a dotted config path"):
        sweep_lib.Sweep(name="y", base=_tiny_base(), axes={"eps": [1, 2]})


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_by_two_sweep_end_to_end(tmp_path, digits):
    sw = _grid(tmp_path)
    res = sweep_lib.run_sweep(sw, dataset=digits, log=lambda s: None)
    assert not res.failed and len(res.ran) == 4
    out = tmp_path / "grid"
    for name in ("table.md", "table.csv", "heatmap_cad.png", "sweep.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "curves_badnets.png").exists()

    index = json.loads((out / "sweep.json").read_text())
    assert index["runs"][0]["dir"] == "runs/none__multikrum__s0"  # relative
    table_md = (out / "table.md").read_text()
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert len(rows) == 4
    for row in rows:
        run_dir = out / "runs" / row["id"]
        summary = json.loads((run_dir / "summary.json").read_text())
        records = _metrics(run_dir / "metrics.jsonl")
        assert len(records) == 2
        # ACC/ASR: the last round's evaluation; TPR/FPR: means over the attack rounds
        assert float(row["acc"]) == pytest.approx(records[-1]["acc"], abs=1e-3)
        assert float(row["asr"]) == pytest.approx(records[-1]["asr"], abs=1e-3)
        attack_rounds = [r for r in records if r["attack_active"]] or records
        fpr = np.mean([r["fpr"] for r in attack_rounds])
        if row["defense.name"] == "fedclp":  # no detection: no TPR/FPR, CAD of ACC and ASR
            assert row["tpr"] == row["fpr"] == ""
            expect_cad = cad(records[-1]["acc"], records[-1]["asr"])
        else:
            assert float(row["fpr"]) == pytest.approx(fpr, abs=1e-3)
            assert float(row["fpr"]) == pytest.approx(summary["fpr"], abs=1e-3)
            if row["attack.name"] == "none":
                assert row["tpr"] == ""  # never an attacking client
                expect_cad = summary["cad"]
            else:
                tpr = np.mean([r["tpr"] for r in attack_rounds])
                assert float(row["tpr"]) == pytest.approx(tpr, abs=1e-3)
                expect_cad = cad(records[-1]["acc"], records[-1]["asr"], tpr, fpr)
        assert float(row["cad"]) == pytest.approx(expect_cad, abs=1e-3)
        # the wide table's cell is the same numbers
        cells = [
            f"{float(row['acc']):.2f}",
            f"{float(row['asr']):.2f}",
            "–" if row["tpr"] == "" else f"{float(row['tpr']):.2f}",
            "–" if row["fpr"] == "" else f"{float(row['fpr']):.2f}",
            f"{float(row['cad']):.2f}",
        ]
        assert "/".join(cells) in table_md
    header = next(line for line in table_md.splitlines() if line.startswith("| defense"))
    assert header.split("|")[2:4] == [" none ", " badnets "]
    # badnets ran, and Multi-Krum flagged someone in some round (the numbers are not all 0)
    mk = next(r for r in rows if r["id"] == "badnets__multikrum__s0")
    assert float(mk["tpr"]) + float(mk["fpr"]) > 0

    # `marsjax plot DIR` rebuilds the tables and plots from the run folders alone
    from marsjax import cli

    (out / "table.md").unlink()
    (out / "heatmap_cad.png").unlink()
    assert cli.main(["plot", str(out)]) == 0
    assert (out / "table.md").read_text() == table_md and (out / "heatmap_cad.png").exists()

    # Resume: a rerun runs nothing; a changed config is refused unless redo_changed
    again = sweep_lib.run_sweep(sw, dataset=digits, log=lambda s: None)
    assert again.ran == [] and len(again.skipped) == 4
    changed = _grid(tmp_path, seeds=None)
    changed = sweep_lib.Sweep(
        **{**changed.__dict__, "base": override(changed.base, {"train.lr": 0.01})}
    )
    with pytest.raises(ConfigError, match=r"another config .*train\.lr"):
        sweep_lib.run_sweep(changed, dataset=digits, log=lambda s: None)
    # A deleted summary (an interrupted run without checkpoints) reruns that run only
    (out / "runs" / "none__fedclp__s0" / "summary.json").unlink()
    third = sweep_lib.run_sweep(sw, dataset=digits, log=lambda s: None)
    assert third.ran == ["none__fedclp__s0"]
    assert len(_metrics(out / "runs" / "none__fedclp__s0" / "metrics.jsonl")) == 2  # not appended


# 3DFed on a federation where it needs every decision to be reproduced: its indicator positions are
# the smallest entries of an update, so they follow the last bit of the training's float rounding.
# Under the old vmapped batch (batched convolutions) the positions, then MARS's accepted set of
# epsilon=0.1, left the separate run's in round 2 (0-based).
_3DFED_BATCH = {
    "attack.name": "3dfed",
    "attack.options": {"poison_steps": 30, "use_decoys": False, "use_masks": False},
    "attack.num_attackers": 8,
    "attack.attackers_per_round": 4,
    "run.clients_per_round": 10,
    "run.rounds": 3,
    "run.eval_every": 3,
    "train.local_steps": 4,
    "defense.name": "mars",
}


def _same(a, b, rel=1e-6):
    """Equal numbers (or lists of them), ``None`` (a non-finite value) only with ``None``."""
    if isinstance(a, list) or isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, rel) for x, y in zip(a, b))
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


@pytest.mark.slow
def test_batched_variants_take_the_decisions_of_separate_runs(tmp_path, digits):
    """The epsilon axis runs as one compiled program with the decisions of separate runs."""
    from marsjax import simulation

    base = override(_tiny_base(), _3DFED_BATCH)
    sw = sweep_lib.Sweep(
        name="eps",
        base=base,
        axes={"defense.options.epsilon": [0.1, 1000.0]},
        batch_axis="defense.options.epsilon",
        out_dir=str(tmp_path / "eps"),
    )
    res = sweep_lib.run_sweep(sw, dataset=digits, log=lambda s: None)
    assert res.batched == [["epsilon=0.1__s0", "epsilon=1000__s0"]]
    _, rows = sweep_lib.collect(tmp_path / "eps")
    by_eps = {float(r["labels"]["defense.options.epsilon"]): r for r in rows}
    # the variants decide differently: epsilon 1000 never declares an attack, 0.1 does
    assert all(min(rec["accepted"]) == 1.0 for rec in by_eps[1000.0]["records"])
    assert any(min(rec["accepted"]) == 0.0 for rec in by_eps[0.1]["records"])
    for eps, row in by_eps.items():
        cfg = override(base, {"defense.options.epsilon": eps, "run.out_dir": None})
        alone = simulation.run(cfg, dataset=digits, progress=False)
        assert len(row["records"]) == len(alone["records"]) == 3
        for k in ("client_ids", "is_attacking", "accepted"):  # the decisions: exactly
            got = [rec[k] for rec in row["records"]]
            assert got == [rec[k] for rec in alone["records"]], (eps, k)
        # the numbers: to float tolerance (in fact bit for bit: it is the same program)
        for rnd, (a, b) in enumerate(zip(row["records"], alone["records"])):
            where = f"epsilon={eps} round {rnd}"
            for k in ("scores", "tpr", "fpr", "train_loss", "num_flagged", "acc", "asr"):
                assert _same(a.get(k), b.get(k)), (where, k, a.get(k), b.get(k))
        for k in ("acc", "asr", "tpr", "fpr", "cad"):
            v = alone["summary"][k]
            v = None if v is None or not math.isfinite(v) else v
            assert _same(row[k], v), (eps, k, row[k], v)
    # a batched run records its provenance like a single one
    from marsjax import provenance

    for row in rows:
        run_dir = tmp_path / "eps" / "runs" / row["id"]
        for name in ("config.json", "summary.json"):
            rec = json.loads((run_dir / name).read_text())
            assert rec["commit"] == provenance.git_state()["commit"], name
            assert rec["provenance"]["versions"]["jax"], name
