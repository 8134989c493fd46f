"""Plug-ins: the user's modules that register models, datasets, partitioners, strategies.

A plug-in is a plain Python module that calls ``register_model`` / ``register_dataset`` /
``register_partitioner`` / ``register_strategy`` at import time. Two ways to name one:

* the ``plugins`` run-config key: comma-separated module names, e.g.
  ``-c plugins=mypkg.models,mypkg.data``;
* a Python entry point in the group ``fedslim.plugins`` of an installed package, e.g.
  ``[project.entry-points."fedslim.plugins"] mypkg = "mypkg.fedslim_plugin"``.

Every process that resolves a name imports them first, because every process parses the
run config (the CLI, the ServerApp, each ClientApp under Ray, a SuperNode in a container):
:func:`fedslim.config.parse_run_config` calls :func:`load_plugins` before it validates any
name. Modules are looked up on ``sys.path``: installed packages, the Flower app's directory
(Flower puts it there for the ServerApp and ClientApp processes) or, for ``fedslim
simulate``, the current directory.
"""

from __future__ import annotations

import importlib
import re
import sys
from importlib.metadata import entry_points

from fedslim.errors import ConfigError

ENTRY_POINT_GROUP = "fedslim.plugins"
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_loaded: set[str] = set()
_entry_points_loaded = False


def parse_plugin_names(text: str) -> list[str]:
    """``"a.b, c"`` -> ``["a.b", "c"]``; a malformed name is a ConfigError."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if not _MODULE.match(n)]
    if bad:
        raise ConfigError(f"run-config key 'plugins': {bad} are not module names; expected "
                          "comma-separated dotted names such as 'mypkg.models,mypkg.data'")
    return names


def load_plugins(text: str = "") -> None:
    """Import the entry-point plug-ins (once per process) and the named modules.

    Raises
    ------
    ConfigError
        Naming the module and the import error, if a module cannot be imported.
    """
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                ep.load()
            except Exception as exc:
                raise ConfigError(f"plug-in entry point {ep.name!r} ({ep.value}) in group "
                                  f"{ENTRY_POINT_GROUP!r} failed to import: {exc}") from None
    for name in parse_plugin_names(text):
        if name in _loaded:
            continue
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"run-config key 'plugins': cannot import {name!r}: {exc} "
                              f"(searched sys.path: {sys.path[:3]}...)") from None
        except Exception as exc:  # the module itself raised while registering
            raise ConfigError(f"run-config key 'plugins': importing {name!r} raised "
                              f"{type(exc).__name__}: {exc}") from None
        _loaded.add(name)
