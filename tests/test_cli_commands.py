"""The ``marsjax`` command as a user types it: every check runs the real command in a subprocess
and looks at its exit status and what it prints (issue 15: defects 1-9, ``--seeds``, the CSV and
TensorBoard outputs, log lines off a terminal, ``--version``, ``run --help``).

Runs are tiny (the bundled ``digits`` data, an MLP, 1-2 rounds); checks that need no run use
``marsjax validate`` or fail before anything compiles.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from marsjax import attacks, defenses

TINY = ["--set", "run.rounds=2", "--set", "model.name=mlp"]
_SCRIPT = pathlib.Path(sys.executable).with_name("marsjax")
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "marsjax"]


def marsjax(*args, cwd, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    if "stdout" not in kwargs and "stderr" not in kwargs:
        kwargs["capture_output"] = True
    return subprocess.run(
        [*COMMAND, *map(str, args)], check=False, cwd=cwd, env=env, text=True, timeout=600, **kwargs
    )


def one_error_line(p: subprocess.CompletedProcess) -> str:
    """The failure was said in one ``marsjax:`` line, without a traceback."""
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 1 and lines[0].startswith("marsjax: "), p.stderr
    return lines[0]


def validated(p: subprocess.CompletedProcess) -> dict:
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


# ------------------------------------------------------------------------------------------------
# Defect 1: a changed defense (or attack) name starts from its own options


def test_set_defense_name_on_a_preset_resets_or_takes_the_presets_options(tmp_path):
    cfg = validated(
        marsjax("validate", "quickstart", "--set", "defense.name=deepsight", cwd=tmp_path)
    )
    assert cfg["defense"] == {"name": "deepsight", "options": {}}
    # the preset's own options for MARS*, as --defenses gives them (checked in the run below)
    cfg = validated(
        marsjax("validate", "quickstart", "--set", "defense.name=mars_star", cwd=tmp_path)
    )
    assert cfg["defense"] == {"name": "mars_star", "options": {"epsilon": 0.1}}
    cfg = validated(
        marsjax(
            "validate",
            "quickstart",
            "--set",
            "defense.options.kappa=0.2",
            "--set",
            "defense.name=mars_star",
            cwd=tmp_path,
        )
    )
    assert cfg["defense"]["options"] == {"epsilon": 0.1, "kappa": 0.2}
    # demo's BadNets scale does not follow the attack to MRA
    cfg = validated(marsjax("validate", "demo", "--set", "attack.name=mra", cwd=tmp_path))
    assert cfg["attack"]["name"] == "mra" and cfg["attack"]["options"] == {}
    # a config file: a changed name resets the options
    (tmp_path / "c.py").write_text(
        "from marsjax.config import get_preset\n\n"
        "def get_config():\n    return get_preset('quickstart')\n"
    )
    cfg = validated(marsjax("validate", "c.py", "--set", "defense.name=fedavg", cwd=tmp_path))
    assert cfg["defense"] == {"name": "fedavg", "options": {}}


# ------------------------------------------------------------------------------------------------
# Defect 2: --out on a folder holding another run


def _fake_run(folder: pathlib.Path) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"name": "old"}\n')
    (folder / "metrics.jsonl").write_text('{"round": 0, "old": true}\n' * 5)


def test_out_on_a_folder_holding_a_run_is_refused(tmp_path):
    _fake_run(tmp_path / "old")
    line = one_error_line(marsjax("run", "demo", *TINY, "--out", "old", cwd=tmp_path))
    assert "already holds a run" in line and "--overwrite" in line and "--resume old" in line
    assert (tmp_path / "old" / "config.json").read_text() == '{"name": "old"}\n'
    assert len((tmp_path / "old" / "metrics.jsonl").read_text().splitlines()) == 5
    # no checkpoint there: nothing to resume, and the run is not overwritten either
    line = one_error_line(marsjax("run", "demo", *TINY, "--resume", "old", cwd=tmp_path))
    assert "nothing to resume" in line or "without checkpoints" in line
    assert len((tmp_path / "old" / "metrics.jsonl").read_text().splitlines()) == 5


# ------------------------------------------------------------------------------------------------
# Defect 3: one line instead of a traceback


def test_config_files_that_do_not_load_say_which_file_and_line(tmp_path):
    (tmp_path / "syntax.py").write_text("def get_config(:\n    pass\n")
    (tmp_path / "imports.py").write_text("import marsjax_no_such_module\n")
    (tmp_path / "raises.py").write_text("def get_config():\n    raise RuntimeError('boom')\n")
    (tmp_path / "sweep_syntax.py").write_text("def get_sweep(:\n")
    (tmp_path / "pyproject.toml").write_text("")
    for cmd in (["validate", "syntax.py"], ["run", "syntax.py"]):
        line = one_error_line(marsjax(*cmd, cwd=tmp_path))
        assert "syntax.py" in line and "line 1" in line and "SyntaxError" in line
    line = one_error_line(marsjax("sweep", "sweep_syntax.py", "--list", cwd=tmp_path))
    assert "sweep_syntax.py" in line and "SyntaxError" in line
    line = one_error_line(marsjax("validate", "imports.py", cwd=tmp_path))
    assert "imports.py" in line and "marsjax_no_such_module" in line and "line 1" in line
    line = one_error_line(marsjax("run", "raises.py", cwd=tmp_path))
    assert "raises.py" in line and "RuntimeError: boom" in line and "line 2" in line


def test_out_under_a_file_is_refused_before_running(tmp_path):
    (tmp_path / "afile").write_text("x")
    line = one_error_line(marsjax("run", "demo", *TINY, "--out", "afile/run", cwd=tmp_path))
    assert "afile/run" in line and "cannot write" in line
    line = one_error_line(marsjax("run", "demo", *TINY, "--out", "afile", cwd=tmp_path))
    assert "is a file" in line


def _tiny_sweep_project(root: pathlib.Path) -> pathlib.Path:
    """A project folder (pyproject.toml) with a sweep file in configs/: 2 defenses x 2 attacks x
    2 seeds, results in results/tiny (relative to the project)."""
    (root / "configs").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    spec = root / "configs" / "tiny.py"
    spec.write_text(
        "from marsjax.config import get_preset, override\n"
        "from marsjax.sweep import Sweep\n\n\n"
        "def get_sweep():\n"
        "    base = override(get_preset('demo'), {'run.rounds': 2, 'model.name': 'mlp'})\n"
        "    return Sweep(\n"
        "        name='tiny', base=base, seeds=[0, 1], out_dir='results/tiny',\n"
        "        axes={'defense.name': ['fedavg', 'mars'], 'attack.name': ['badnets', 'mra']},\n"
        "    )\n"
    )
    return spec


def test_sweep_list_into_a_closed_pipe_is_quiet(tmp_path):
    spec = _tiny_sweep_project(tmp_path / "proj")
    read, write = os.pipe()
    os.close(read)  # the reader (say `head`) is gone before anything is written
    try:
        p = marsjax("sweep", spec, "--list", cwd=tmp_path, stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)
    assert p.returncode == 1
    assert p.stderr == "", p.stderr


# ------------------------------------------------------------------------------------------------
# Defect 4: a missing data folder


def test_missing_data_dir_says_the_folder_is_missing(tmp_path):
    p = marsjax(
        "validate",
        "quickstart",
        "--set",
        "data.name=fashion_mnist",
        "--set",
        f"data.data_dir={tmp_path / 'nonexistent'}",
        "--data",
        cwd=tmp_path,
    )
    line = [x for x in p.stderr.splitlines() if x.startswith("marsjax:")]
    assert p.returncode == 2 and len(line) == 1, p.stderr
    assert "does not exist" in line[0] and "--set data.data_dir=DIR" in line[0]
    assert "--data-dir" not in p.stderr and "TFRECORD" not in p.stderr
    assert "Traceback" not in p.stderr


# ------------------------------------------------------------------------------------------------
# Defect 5 (and 3's corrupt checkpoint metadata): resuming past unreadable checkpoints


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A finished 2-round run with checkpoints after rounds 1 and 2."""
    root = tmp_path_factory.mktemp("ckpt")
    p = marsjax(
        "run", "demo", *TINY, "--checkpoint-every", "1", "--out", "run", "--quiet", cwd=root
    )
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in (root / "run" / "checkpoints").iterdir()) == ["1", "2"]
    return root / "run"


def test_resume_past_a_corrupt_checkpoint_says_so_in_one_line(checkpointed, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(checkpointed, run)
    for f in (run / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "ocdbt" in str(f):
            f.write_bytes(b"\0" * 7)
    p = marsjax("run", "--resume", "run", "--quiet", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, p.stderr
    assert "resuming run from its checkpoint of round 1" in lines[0]
    assert "skipped the unreadable checkpoint of round 2" in lines[0]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]


def test_resume_with_every_checkpoint_meta_corrupt_is_one_line(checkpointed, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(checkpointed, run)
    for step in ("1", "2"):
        (run / "checkpoints" / step / "meta" / "metadata").write_text("{not json")
    line = one_error_line(marsjax("run", "--resume", "run", "--quiet", cwd=tmp_path))
    assert line.startswith("marsjax: checkpoint error:") and "no readable checkpoint" in line
    line = one_error_line(marsjax("run", "demo", *TINY, "--resume", "run", cwd=tmp_path))
    assert "no readable checkpoint" in line


# ------------------------------------------------------------------------------------------------
# Defects 6 and 7: sweeps from any folder; --only applied and checked


def _finish_one_run(spec: pathlib.Path) -> str:
    """Writes the files of a finished run for the first point of the sweep (as the library sees
    it from the project folder), and the sweep's index; returns the run's id."""
    from marsjax import sweep as sweep_lib
    from marsjax.config import to_dict
    from marsjax.sweep.runfiles import _write_index

    cwd = os.getcwd()
    os.chdir(spec.parent.parent)
    try:
        sweep = sweep_lib.load_sweep(spec)
        runs = sweep_lib.expand(sweep)
        _write_index(sweep, runs)
        run = runs[0]
        run.out_dir.mkdir(parents=True)
        (run.out_dir / "config.json").write_text(json.dumps(to_dict(run.config)))
        rec = {"round": 1, "acc": 80.0, "asr": 30.0, "tpr": 50.0, "fpr": 10.0}
        (run.out_dir / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
        summary = {k: rec[k] for k in ("acc", "asr", "tpr", "fpr")}
        (run.out_dir / "summary.json").write_text(json.dumps({**summary, "cad": 72.5}))
    finally:
        os.chdir(cwd)
    return run.id


def test_sweep_and_plot_find_the_runs_from_another_folder(tmp_path):
    spec = _tiny_sweep_project(tmp_path / "proj")
    done_id = _finish_one_run(spec)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = marsjax("sweep", spec, "--list", cwd=elsewhere)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 8
    done = [x for x in lines if x.startswith("done")]
    assert len(done) == 1 and done[0].endswith(f"proj/results/tiny/runs/{done_id}")
    # the listed paths read from the working directory
    assert (elsewhere / done[0].split()[1]).resolve() == (
        tmp_path / "proj" / "results" / "tiny" / "runs" / done_id
    )
    # another results folder: nothing done there
    p = marsjax("sweep", spec, "--list", "--results", "other", cwd=elsewhere)
    assert p.returncode == 0 and all(x.startswith("todo") for x in p.stdout.splitlines())
    assert all("other/runs/" in x for x in p.stdout.splitlines())
    p = marsjax("plot", spec, cwd=elsewhere)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "proj" / "results" / "tiny" / "table.md").is_file()
    assert not (elsewhere / "results").exists()


def test_sweep_list_applies_only_and_rejects_unknown_labels(tmp_path):
    spec = _tiny_sweep_project(tmp_path / "proj")
    p = marsjax("sweep", spec, "--list", "--only", "defense.name=mars", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 4 and all("/runs/mars__" in x for x in lines)
    p = marsjax(
        "sweep", spec, "--list", "--only", "seed=1", "--only", "attack.name=mra", cwd=tmp_path
    )
    assert sorted(x.split("/")[-1] for x in p.stdout.splitlines()) == [
        "fedavg__mra__s1",
        "mars__mra__s1",
    ]
    line = one_error_line(
        marsjax("sweep", spec, "--list", "--only", "defense.name=marss", cwd=tmp_path)
    )
    assert "marss" in line and "did you mean defense.name=mars" in line
    line = one_error_line(
        marsjax("sweep", spec, "--list", "--only", "defence.name=mars", cwd=tmp_path)
    )
    assert "not an axis" in line and "did you mean defense.name" in line
    line = one_error_line(marsjax("sweep", spec, "--list", "--only", "seed=7", cwd=tmp_path))
    assert "seed=7" in line and "no such label" in line


# ------------------------------------------------------------------------------------------------
# Defect 8: one CAD rule


def _table_rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in attacks.REGISTRY and cells[1] in defenses.REGISTRY:
            rows[cells[1]] = cells
    return rows


def test_cad_leaves_out_undefined_terms_in_run(tmp_path):
    p = marsjax(
        "run",
        "demo",
        "--set",
        "attack.name=none",
        "--set",
        "attack.options={}",
        "--set",
        "run.rounds=1",
        "--set",
        "model.name=mlp",
        "--defenses",
        "fedavg,fedclp",
        "--quiet",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    rows = _table_rows(p.stdout)
    acc, asr, tpr, fpr, cad = rows["fedavg"][2:]
    assert tpr == "–"  # no attacker: TPR undefined, and left out of CAD
    assert float(cad) == pytest.approx(
        (float(acc) + 100 - float(asr) + 100 - float(fpr)) / 3, abs=0.01
    )
    acc, asr, tpr, fpr, cad = rows["fedclp"][2:]
    assert tpr == fpr == "–"  # no detection decisions
    assert float(cad) == pytest.approx((float(acc) + 100 - float(asr)) / 2, abs=0.01)
    assert "over the defined terms" in p.stdout


def test_sweep_tables_use_the_same_cad_rule(tmp_path):
    from marsjax import metrics, sweep

    records = {
        ("fedclp", "mra"): [
            {"round": 0, "attack_active": True, "tpr": 0.0, "fpr": 0.0, "acc": 80.0, "asr": 30.0}
        ],
        ("fedavg", "none"): [
            {"round": 0, "attack_active": False, "tpr": None, "fpr": 10.0, "acc": 80.0, "asr": 30.0}
        ],
    }
    index = {"name": "t", "axes": {}, "cols": "attack.name", "rows": ["defense.name"], "runs": []}
    summaries = {}
    for (defense, attack), recs in records.items():
        summaries[defense] = metrics.summarize(
            recs, attack_active=attack != "none", detects=defense not in defenses.NO_DETECTION
        )
        d = tmp_path / "runs" / defense
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(summaries[defense]))
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        index["runs"].append(
            {"id": defense, "labels": {}, "seed": 0, "attack": attack, "defense": defense}
            | {"dir": f"runs/{defense}"}
        )
    (tmp_path / "sweep.json").write_text(json.dumps(index))
    _, rows = sweep.collect(tmp_path)
    by = {r["defense"]: r for r in rows}
    assert by["fedclp"]["cad"] == pytest.approx(summaries["fedclp"]["cad"]) == (80 + 70) / 2
    assert by["fedclp"]["tpr"] is None and math.isnan(summaries["fedclp"]["tpr"])
    assert by["fedavg"]["cad"] == pytest.approx(summaries["fedavg"]["cad"])
    assert by["fedavg"]["cad"] == pytest.approx((80 + 70 + 90) / 3)


# ------------------------------------------------------------------------------------------------
# Defect 9: option types and names, case-insensitively


def test_bad_option_value_and_names_are_explained(tmp_path):
    line = one_error_line(
        marsjax("validate", "quickstart", "--set", "defense.options.epsilon=abc", cwd=tmp_path)
    )
    assert "defense.options.epsilon='abc'" in line and "must be a number" in line
    assert "not supported" not in line
    line = one_error_line(
        marsjax("validate", "quickstart", "--set", "attack.name=MRA", cwd=tmp_path)
    )
    assert "did you mean 'mra'" in line
    line = one_error_line(
        marsjax("validate", "quickstart", "--set", "defense.name=MultiKrum", cwd=tmp_path)
    )
    assert "did you mean 'multikrum'" in line
    line = one_error_line(marsjax("validate", "QuickStart", cwd=tmp_path))
    assert "did you mean 'quickstart'" in line


# ------------------------------------------------------------------------------------------------
# --seeds, --defenses, --overwrite, metrics.csv, TensorBoard, log lines


def _tfrecords(path: pathlib.Path) -> list[bytes]:
    """The records of a TFRecord file (length, its CRC, data, its CRC)."""
    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        out.append(data[i + 12 : i + 12 + n])
        i += 12 + n + 4
    return out


def _scalars(event_file: pathlib.Path) -> dict[str, dict[int, float]]:
    from tensorboardX.proto import event_pb2

    got: dict[str, dict[int, float]] = {}
    for raw in _tfrecords(event_file):
        ev = event_pb2.Event.FromString(raw)
        for v in ev.summary.value:
            got.setdefault(v.tag, {})[ev.step] = v.simple_value
    return got


def test_seeds_defenses_csv_tensorboard_and_overwrite(tmp_path):
    pytest.importorskip("tensorboardX")
    _fake_run(tmp_path / "out" / "fedavg" / "s0")
    args = ["run", "quickstart", *TINY, "--defenses", "fedavg,mars_star", "--seeds", "0,1"]
    args += ["--out", "out", "--tensorboard", "tb"]
    line = one_error_line(marsjax(*args, cwd=tmp_path))
    assert "out/fedavg/s0" in line and "already holds a run" in line and "--resume out" in line
    p = marsjax(*args, "--overwrite", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "out"

    # --defenses NAME is --set defense.name=NAME: the preset's epsilon for MARS*
    cfg = json.loads((out / "mars_star" / "s1" / "config.json").read_text())
    assert cfg["defense"] == {"name": "mars_star", "options": {"epsilon": 0.1}}
    assert cfg["run"]["seed"] == 1

    # --overwrite started the folder afresh: only this run's rounds
    records = {}
    for d in ("fedavg", "mars_star"):
        for s in ("s0", "s1"):
            lines = (out / d / s / "metrics.jsonl").read_text().splitlines()
            records[d, s] = [json.loads(x) for x in lines]
            assert [r["round"] for r in records[d, s]] == [0, 1]
    assert "old" not in (out / "fedavg" / "s0" / "metrics.jsonl").read_text()

    # metrics.csv: a row per round, the jsonl's scalars
    import csv

    with open(out / "fedavg" / "s1" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [0, 1]
    last = records["fedavg", "s1"][-1]
    assert float(rows[-1]["acc"]) == pytest.approx(last["acc"])
    assert float(rows[-1]["tpr"]) == pytest.approx(last["tpr"])
    assert rows[0]["acc"] == ""  # round 0 was not evaluated (demo: eval_every 5, last round)

    # mean ± std over the seeds, in the output and in summary_seeds.json
    groups = {g["defense"]: g for g in json.loads((out / "summary_seeds.json").read_text())}
    accs = [
        json.loads((out / "mars_star" / s / "summary.json").read_text())["acc"]
        for s in ("s0", "s1")
    ]
    assert groups["mars_star"]["seeds"] == [0, 1]
    assert groups["mars_star"]["mean"]["acc"] == pytest.approx(np.mean(accs))
    assert groups["mars_star"]["std"]["acc"] == pytest.approx(np.std(accs))
    assert f"{np.mean(accs):.2f} ± {np.std(accs):.2f}" in p.stdout

    # TensorBoard event files, read back: the same numbers at the same rounds
    events = list((tmp_path / "tb" / "mars_star" / "s0").glob("events.out.tfevents.*"))
    assert len(events) == 1
    got = _scalars(events[0])
    recs = records["mars_star", "s0"]
    assert got["eval/acc"] == {1: pytest.approx(recs[1]["acc"], rel=1e-6)}
    assert got["detection/tpr"] == {r["round"]: pytest.approx(r["tpr"]) for r in recs}

    # stderr is not a terminal: log lines, no carriage-return progress bar
    assert "\r" not in p.stderr
    assert "quickstart[mars_star,s1]: round 2/2, ACC" in p.stderr


# ------------------------------------------------------------------------------------------------
# --version, help, curves.png


def test_version_and_help(tmp_path):
    import importlib.metadata

    p = marsjax("--version", cwd=tmp_path)
    assert (
        p.returncode == 0 and p.stdout.strip() == f"marsjax {importlib.metadata.version('marsjax')}"
    )
    p = marsjax("--help", cwd=tmp_path)
    assert p.returncode == 0 and "``" not in p.stdout and ":mod:" not in p.stdout
    p = marsjax("run", "--help", cwd=tmp_path)
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    for name in [*attacks.REGISTRY, *defenses.REGISTRY]:
        if not name.startswith("_"):
            assert f" {name}," in text or f" {name} " in text, name


def test_curves_title_and_rounds(monkeypatch, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from marsjax import report
    from marsjax.config import get_preset

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    records = [
        {"round": 0, "tpr": 50.0, "fpr": 0.0},
        {"round": 1, "tpr": 100.0, "fpr": 0.0, "acc": 90.0, "asr": 10.0},
    ]
    cfg = get_preset("quickstart")
    report.plot_curves(records, tmp_path / "curves.png", title=report.curves_title(cfg))
    (fig,) = figures
    title = fig._suptitle.get_text()
    assert "mra" in title and "mars" in title and "quickstart" in title
    acc_line = fig.axes[0].lines[0]
    tpr_line = fig.axes[1].lines[0]
    assert list(acc_line.get_xdata()) == [1]  # the round of the evaluated record, as in jsonl
    assert list(tpr_line.get_xdata()) == [0, 1]
    close(fig)
