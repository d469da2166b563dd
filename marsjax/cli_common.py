"""What every ``marsjax`` subcommand shares: loading a config, and turning errors into one line.

:func:`load_config` reads a preset or a config file; :func:`run_command` calls a subcommand and
maps every expected failure to one ``marsjax: ...`` line on stderr and an exit status (2: bad
config, data, checkpoint or path; 1: a broken output pipe), never a traceback. Both
:mod:`marsjax.cli` and :mod:`marsjax.cli_experiments` use it (neither imports the other for it).
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence

from marsjax.config import (
    PRESETS,
    ConfigError,
    ExperimentConfig,
    _suggest,
    call_file_function,
    override,
    parse_overrides,
    preset_with,
)

__all__ = ["TraceError", "factory_error", "load_config", "run_command"]


def load_config(spec: str, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """A preset name or a ``.py`` file with ``get_config()``, then dotted overrides.

    On a preset, ``defense.name`` / ``attack.name`` overrides pick the preset made for that
    defense / attack (:func:`marsjax.config.preset_with`: its own options for it); elsewhere a
    changed name resets the section's options (:func:`marsjax.config.override`).
    """
    changes = parse_overrides(overrides)
    if spec.endswith(".py"):
        cfg = call_file_function(spec, "get_config")
    elif spec in PRESETS:
        cfg, changes = preset_with(spec, changes)
    else:
        hint = _suggest(spec, sorted(PRESETS))
        raise ConfigError(
            f"config {spec!r} is neither a .py file nor a preset"
            + (f" (did you mean {hint!r}?)" if hint else "")
            + f"; presets: {sorted(PRESETS)}"
        )
    if not isinstance(cfg, ExperimentConfig):
        raise ConfigError(f"{spec}: get_config() must return an ExperimentConfig")
    return override(cfg, changes)


class TraceError(Exception):
    """The config validates but the experiment does not build or trace."""


def factory_error(e: BaseException) -> ConfigError | None:
    """A ConfigError naming the fields when ``e`` is an attack or defense factory rejecting its
    options or the rest of the config (a ValueError or TypeError raised inside ``make``)."""
    if not isinstance(e, (ValueError, TypeError)):
        return None
    for frame, _ in traceback.walk_tb(e.__traceback__):
        module = frame.f_globals.get("__name__")
        if frame.f_code.co_name == "make" and module in ("marsjax.attacks", "marsjax.defenses"):
            section = module.rsplit(".", 1)[1][:-1]
            name, options = frame.f_locals.get("name"), frame.f_locals.get("options")
            return ConfigError(
                f"{section}.name={name!r} with {section}.options={options!r} is invalid: the "
                f"{section} rejects this config: {e}"
            )
    return None


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    text = str(message).strip().splitlines()
    print(f"marsjax: warning: {text[0] if text else category.__name__}", file=sys.stderr)


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so that the interpreter's last flush does
    not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def run_command(fn: Callable[[], int]) -> int:
    """Calls ``fn`` and returns its exit status; an expected failure prints one line instead.

    2: a config, dataset, checkpoint or file-system error, or a factory rejecting its options;
    1: the output pipe closed early (``marsjax sweep FILE --list | head``), silently. Python
    warnings print as one ``marsjax: warning:`` line each.
    """
    from marsjax.data.datasets import DatasetError

    warnings.showwarning = _one_line_warning
    try:
        status = fn()
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
        return status
    except BrokenPipeError:
        _silence_stdout()
        return 1
    except ConfigError as e:
        print(f"marsjax: config error: {e}", file=sys.stderr)
        return 2
    except DatasetError as e:
        print(f"marsjax: dataset error: {e}", file=sys.stderr)
        return 2
    except TraceError as e:
        print(f"marsjax: the config validates but the experiment {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"marsjax: error:{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:
        from marsjax.checkpoint import CheckpointError

        if isinstance(e, CheckpointError):
            print(f"marsjax: checkpoint error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, ImportError):
            print(f"marsjax: {e}", file=sys.stderr)
            return 2
        factory = factory_error(e)
        if factory is not None:
            print(f"marsjax: config error: {factory}", file=sys.stderr)
            return 2
        raise
