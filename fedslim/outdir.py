"""Where a run writes: a fresh directory per run by default, never an earlier run's by accident.

``output-dir`` may hold ``{run}``: :func:`expand` replaces it by a new name per run (the
start time where one process decides for the whole run; ``run-<run id>`` where every
process of a ``flwr run`` expands it itself), or, with ``resume=true``, by the newest run
in that place that left a checkpoint. :func:`check_fresh` refuses a directory that holds
an earlier run's results unless ``resume`` or ``overwrite`` says what to do with them.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedslim.errors import ConfigError
from fedslim.protocol import CHECKPOINT_FILE, RESULTS_FILE

RUN = "{run}"
KEY = "run-config key 'output-dir' (--output-dir)"


def _newest_with_checkpoint(pattern: Path) -> Path | None:
    """The run under ``pattern`` (``{run}`` in its last part) whose checkpoint is newest."""
    found = [p.parent for p in pattern.parent.glob(pattern.name.replace(RUN, "*") + "/"
                                                   + CHECKPOINT_FILE)]
    return max(found, key=lambda p: (p / CHECKPOINT_FILE).stat().st_mtime, default=None)


def expand(raw: str, resume: bool = False, name: str | None = None) -> str:
    """``raw`` with ``{run}`` replaced (``raw`` itself without one).

    ``name`` is the run's name, used as is (default: the UTC start time, ``-2``, ``-3``...
    appended when taken); with ``resume`` the newest existing run with a checkpoint wins.

    Raises
    ------
    ConfigError
        If ``{run}`` is anywhere but in the last path component.
    """
    if RUN not in raw:
        return raw
    pattern = Path(raw).expanduser()
    if RUN in str(pattern.parent) or pattern.name.count(RUN) != 1:
        raise ConfigError(f"{KEY}: {raw!r}: {RUN} may appear once, in the last part of the "
                          "path (e.g. outputs/fedslim/{run})")
    if resume:
        newest = _newest_with_checkpoint(pattern)
        if newest is not None:
            return str(newest)
    if name is not None:  # the run's own name: the same in every process that asks
        return str(pattern.with_name(pattern.name.replace(RUN, name)))
    base = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    candidate, n = base, 1
    while pattern.with_name(pattern.name.replace(RUN, candidate)).exists():
        n += 1
        candidate = f"{base}-{n}"
    return str(pattern.with_name(pattern.name.replace(RUN, candidate)))


def check_fresh(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start afresh over an earlier run's results (one line, what to do)."""
    if resume or overwrite or not (out / RESULTS_FILE).exists():
        return
    raise ConfigError(f"{KEY}: {str(out)!r} holds an earlier run's {RESULTS_FILE}; use "
                      "another directory (the default outputs/fedslim/{run} is new per "
                      "run), -c resume=true to continue that run, or -c overwrite=true to "
                      "replace it")
