"""How a run-config field is declared, type-checked and range-checked (used by ``config``).

A field's metadata (:func:`key`) holds its kebab-case key, help text and range;
:func:`validate_fields` runs in every config section's ``__post_init__``, so a value is
checked however the section is built (from ``context.run_config``, the CLI, or Python).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import typing
from collections.abc import Mapping
from typing import Any

from fedslim.compression.auto import AutoSpec, parse_auto
from fedslim.compression.grammar import parse_spec
from fedslim.compression.spec import PipelineSpec
from fedslim.errors import ConfigError, SpecError


def key(key: str, help: str, *, low: float | None = None, high: float | None = None,
         low_open: bool = False) -> dict[str, Any]:
    """Field metadata: the run-config key, its help text and its allowed range."""
    return {"key": key, "help": help, "low": low, "high": high, "low_open": low_open}


_HINTS: dict[type, dict[str, Any]] = {}


def validate_fields(section: Any) -> None:
    """Check (and normalise) every field of a config section against its declared type
    and range: the one place values are validated, however the object is built."""
    cls = type(section)
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    for f in dataclasses.fields(section):
        value = coerce(f.metadata["key"], getattr(section, f.name), hints[f.name], f.metadata)
        object.__setattr__(section, f.name, value)


def check_registered(key: str, name: str, registry: Mapping[str, Any], what: str) -> None:
    if name not in registry:
        close = did_you_mean(name, sorted(registry))
        hint = f" (did you mean {close}?)" if close else ""
        raise ConfigError(f"run-config key {key!r}: unknown {what} {name!r}{hint}; known: "
                          f"{', '.join(sorted(registry))}")


def did_you_mean(name: str, choices: list[str]) -> str:
    """The closest one to three of ``choices`` to a misspelled ``name``, quoted and joined
    with ``or`` (empty when none is close)."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    if len(name) >= 4:  # a fragment: 'rounds' for 'num-server-rounds'
        close += [c for c in choices if name in c and c not in close]
    return " or ".join(repr(c) for c in close[:3])

def flat(value: Any) -> bool | int | float | str:
    if value is None:
        return "auto"
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, PipelineSpec | AutoSpec):
        return str(value)
    return value


def _spec(key: str, value: Any, auto: bool = False) -> PipelineSpec | AutoSpec:
    if isinstance(value, PipelineSpec) or (auto and isinstance(value, AutoSpec)):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"run-config key {key!r}: got {value!r}; expected a pipeline "
                          "spec string such as 'topk:0.01|q:4'")
    try:
        adaptive = parse_auto(value) if auto else None
        return adaptive if adaptive is not None else parse_spec(value)
    except SpecError as exc:
        raise ConfigError(f"run-config key {key!r}: invalid pipeline spec {value!r}: "
                          f"{exc}") from None


def _choice(key: str, value: Any, typ: type[enum.Enum]) -> enum.Enum:
    allowed = [m.value for m in typ]
    if isinstance(value, typ):
        return value
    if isinstance(value, bool) and {"true", "false"} <= set(allowed):  # a TOML boolean
        value = str(value).lower()
    if isinstance(value, str) and value in allowed:
        return typ(value)
    raise ConfigError(f"run-config key {key!r}: got {value!r}; allowed values: {allowed}")


def _bool_value(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"run-config key {key!r}: got {value!r}; expected true or false")


def _number(key: str, value: Any, typ: type) -> int | float:
    what = "an integer" if typ is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"run-config key {key!r}: got {value!r}; expected {what}")
    try:
        num: int | float = float(value) if typ is float or isinstance(value, float) \
            else int(value)
    except ValueError:
        raise ConfigError(f"run-config key {key!r}: got {value!r}; expected {what}") from None
    if not math.isfinite(num):
        raise ConfigError(f"run-config key {key!r}: got {value!r}; expected a finite number")
    if typ is int:
        if isinstance(num, float) and not num.is_integer():
            raise ConfigError(f"run-config key {key!r}: got {value!r}; expected an integer")
        num = int(num)
    return num


def coerce(key: str, value: Any, typ: Any, meta: Mapping[str, Any]) -> Any:
    """Convert one run-config value to the field's type, raising ConfigError on mismatch."""
    if typ == PipelineSpec | AutoSpec | None:  # None is spelled "auto": decided elsewhere
        return None if value is None or value == "auto" else _spec(key, value, auto=True)
    if typ == PipelineSpec | AutoSpec:
        return _spec(key, value, auto=True)
    if typ is PipelineSpec:
        return _spec(key, value)
    if typ == float | None:  # a number, or "auto" (None): a default that depends on others
        if value is None or value == "auto":
            return None
        typ = float
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        return _choice(key, value, typ)
    if typ is bool:
        return _bool_value(key, value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"run-config key {key!r}: got {value!r}; expected a string")
        return value
    value = _number(key, value, typ)
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta.get("low_open") and value == low)):
        op = ">" if meta.get("low_open") else ">="
        raise ConfigError(f"run-config key {key!r}: got {value!r}; must be {op} {low}")
    if high is not None and value > high:
        raise ConfigError(f"run-config key {key!r}: got {value!r}; must be <= {high}")
    return value


CLIENT_PREFIX = "client."


def typed_value(value: Any) -> bool | int | float | str:
    """A CLI string typed as TOML would (``5`` -> 5, ``0.1`` -> 0.1, ``true``), else as is."""
    if not isinstance(value, str):
        return value
    import tomllib

    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value
    return parsed if isinstance(parsed, bool | int | float | str) else value


def parse_client_keys(items: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """``{"client.lr": "0.01"}`` -> ``{"lr": 0.01}``; names and value types checked."""
    out: dict[str, bool | int | float | str] = {}
    for k, v in items.items():
        name = k[len(CLIENT_PREFIX):]
        if not name or not all(part.strip() for part in name.split(".")):
            raise ConfigError(f"run-config key {k!r}: expected {CLIENT_PREFIX}<name>")
        value = typed_value(v)
        if not isinstance(value, bool | int | float | str) or (
                isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(f"run-config key {k!r}: got {v!r}; a client setting must be a "
                              "finite number, a bool or a string")
        out[name] = value
    return out


def parse_cli_overrides(items: list[str] | None) -> dict[str, str]:
    """Parse ``key=value`` strings (the CLI's ``-c``) into a dict; values stay strings."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        out[key.strip()] = value.strip().strip('"').strip("'")
    return out
