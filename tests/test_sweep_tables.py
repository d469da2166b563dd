"""Sweep tables from hand-made run folders: mean ± std over seeds and the commits of the cells."""

import json

import numpy as np
import pytest

from marsjax import cli
from marsjax import sweep as sweep_lib


def _folder(tmp_path, commits, dirty=None):
    """A 1 x 1 sweep (mars x 3dfed) with one run per seed; run i has ACC 90+i, ASR 10+2i, TPR
    100-10i, FPR i, and the commit ``commits[i]`` (``None``: a run without provenance)."""
    out = tmp_path / "sw"
    runs = []
    for i, commit in enumerate(commits):
        rid = f"mars__3dfed__s{i}"
        d = out / "runs" / rid
        d.mkdir(parents=True)
        acc, asr, tpr, fpr = 90.0 + i, 10.0 + 2 * i, 100.0 - 10 * i, float(i)
        summary = {
            "acc": acc,
            "asr": asr,
            "tpr": tpr,
            "fpr": fpr,
            "cad": (acc + 100 - asr + tpr + 100 - fpr) / 4,
            "rounds": 3,
            "wall_s": 1.0,
        }
        if commit is not None:
            summary.update({"commit": commit, "dirty": bool(dirty and dirty[i])})
        (d / "summary.json").write_text(json.dumps(summary))
        (d / "metrics.jsonl").write_text("")
        runs.append(
            {
                "id": rid,
                "labels": {"defense.name": "mars", "attack.name": "3dfed"},
                "seed": i,
                "dir": f"runs/{rid}",
                "attack": "3dfed",
                "defense": "mars",
            }
        )
    index = {
        "name": "t",
        "description": "",
        "rows": ["defense.name"],
        "cols": "attack.name",
        "axes": {"defense.name": ["mars"], "attack.name": ["3dfed"]},
        "seeds": list(range(len(commits))),
        "no_detection": [],
        "runs": runs,
    }
    (out / "sweep.json").write_text(json.dumps(index))
    return out


def test_cells_show_mean_and_std_over_seeds(tmp_path):
    out = _folder(tmp_path, ["a" * 40] * 3)
    sweep_lib.write_outputs(out)
    md = (out / "table.md").read_text()
    # ACC 90, 91, 92: mean 91, population std sqrt(2/3) = 0.82; TPR 100, 90, 80: 90 ± 8.16
    cads = [(90 + i + 100 - (10 + 2 * i) + 100 - 10 * i + 100 - i) / 4 for i in range(3)]
    cell = (
        f"91.00±0.82 / 12.00±1.63 / 90.00±8.16 / 1.00±0.82 / "
        f"{np.mean(cads):.2f}±{np.std(cads):.2f} (3 seeds)"
    )
    assert cell in md
    assert f"Every finished run was made at commit {'a' * 10}." in md
    assert "aaaaaaaaaa" in (out / "table.csv").read_text()


def test_mixed_commits_are_refused_unless_allowed(tmp_path):
    out = _folder(tmp_path, ["a" * 40, "b" * 40, None])
    with pytest.raises(
        sweep_lib.MixedCommitsError, match=r"aaaaaaaaaa: 1 runs.*bbbbbbbbbb.*unrecorded"
    ):
        sweep_lib.write_outputs(out)
    assert not (out / "table.md").exists()
    assert cli.main(["plot", str(out)]) != 0  # one clear line, no table
    assert cli.main(["plot", str(out), "--allow-mixed-commits"]) == 0
    md = (out / "table.md").read_text()
    assert "made by 3 different code versions" in md
    assert "aaaaaaaaaa, bbbbbbbbbb, unrecorded" in md  # the cell's commits


def test_a_dirty_tree_is_its_own_version(tmp_path):
    out = _folder(tmp_path, ["a" * 40] * 2, dirty=[False, True])
    with pytest.raises(sweep_lib.MixedCommitsError, match=r"aaaaaaaaaa\+dirty"):
        sweep_lib.write_outputs(out)
