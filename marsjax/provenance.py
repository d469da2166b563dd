"""Where a result came from: the code's git commit, whether the tree was dirty, the versions of
the packages that compute it, the machine and the command that ran it.

Every results folder written by :func:`marsjax.simulation.run` records this (``summary.json``
and ``config.json`` carry ``commit`` and ``provenance``), so a number in a table can be traced
to the code that made it; :mod:`marsjax.sweep` uses the commits to refuse tables that silently
mix runs made by different code.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import pathlib
import platform
import shlex
import subprocess
import sys
from typing import Any

__all__ = ["PACKAGES", "PROVENANCE_KEYS", "git_state", "provenance", "with_provenance"]

_CODE_PATHS = (".", ":(exclude)experiments/results", ":(exclude)benchmarks/results")
PROVENANCE_KEYS = ("commit", "dirty", "provenance")
PACKAGES = (
    "marsjax",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "ott-jax",
    "numpy",
    "scipy",
    "scikit-learn",
)


def _git(args: list[str], cwd: pathlib.Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout marsjax is imported from.

    ``dirty`` means a tracked file differs from the commit. Untracked files and the results
    folders (``experiments/results``, ``benchmarks/results``: a rerun replaces committed results
    there) do not count. Both are ``None`` when marsjax is not imported from a git checkout (an
    installed wheel).
    """
    src = pathlib.Path(__file__).resolve().parent.parent
    commit = _git(["rev-parse", "HEAD"], src)
    if not commit:
        return {"commit": None, "dirty": None}
    status = _git(["status", "--porcelain", "--untracked-files=no", "--", *_CODE_PATHS], src)
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(command: list[str] | None = None) -> dict[str, Any]:
    """What produced a result, as a JSON-able dict.

    Args:
      command: the command line (default: this process's ``sys.argv``, with the program name
        shortened to its base name, so that no machine path is recorded).
    """
    argv = list(sys.argv if command is None else command)
    if argv:
        argv[0] = pathlib.Path(argv[0]).name
    cwd = str(pathlib.Path.cwd())
    argv = [a.replace(cwd + "/", "") for a in argv]  # paths relative to where it ran
    try:
        import jax

        d = jax.devices()[0]
        device = {
            "backend": jax.default_backend(),
            "kind": d.device_kind,
            "count": jax.device_count(),
        }
    except Exception as e:  # noqa: BLE001 - provenance must never stop a run
        device = {"error": f"{type(e).__name__}: {e}"}
    return {
        **git_state(),
        "versions": _versions(),
        "command": shlex.join(argv),
        "machine": {"platform": platform.platform(), "processor": platform.machine()},
        "device": device,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def with_provenance(record: dict[str, Any], prov: dict[str, Any] | None = None) -> dict[str, Any]:
    """``record`` with ``commit``, ``dirty`` and the whole ``provenance`` added (a new dict)."""
    prov = provenance() if prov is None else prov
    return {**record, "commit": prov["commit"], "dirty": prov["dirty"], "provenance": prov}
