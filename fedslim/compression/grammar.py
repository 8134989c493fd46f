"""The spec-string grammar: ``parse_spec("topk:0.01|q:4")`` -> :class:`PipelineSpec`.

Grammar (whitespace around separators is ignored; the canonical form has none)::

    spec   := "none" | stage ("|" stage)*
    stage  := NAME [":" arg ("," arg)*]
    arg    := VALUE | KEY "=" VALUE

Stages must appear in pipeline order -- selection, values, positions, ans, zstd -- and at most
once each, because the wire format applies them in that order whatever the text says;
rejecting other orders keeps a spec from suggesting a different pipeline than it runs. The
``pass`` option may appear anywhere (it is printed last).
Every stage name is registered once in :data:`STAGES`; unknown names, keys and values raise a
single :class:`~fedslim.errors.SpecError` that quotes the spec and lists what is accepted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum, IntEnum
from functools import lru_cache
from typing import Any, TypeVar

from fedslim.compression.spec import (
    DEFAULT_SAMPLED_TOL,
    CastConfig,
    EntropyConfig,
    LowRankConfig,
    PassthroughConfig,
    PipelineSpec,
    PositionCoding,
    Precision,
    QuantizeConfig,
    Rounding,
    ScaleStat,
    Scope,
    SelectMode,
    SignConfig,
    TopKConfig,
    ZstdConfig,
)
from fedslim.errors import SpecError

MAX_SPEC_LENGTH = 512
_INT = re.compile(r"^[0-9]+$")
_E = TypeVar("_E", bound=Enum)


class Slot(IntEnum):
    """Pipeline position of a stage; stages must be written in increasing slot order."""

    SELECT = 0
    VALUES = 1
    POSITIONS = 2
    ENTROPY = 3
    LOSSLESS = 4
    PASSTHROUGH = 5


@dataclass
class _Args:
    """The arguments of one stage, consumed by its parser; leftovers are an error."""

    stage: str
    positional: list[str]
    keys: dict[str, str] = field(default_factory=dict)

    def first(self, what: str, required: bool) -> str | None:
        if len(self.positional) > 1:
            raise SpecError(f"stage {self.stage!r} takes one positional argument ({what}), "
                            f"got {self.positional}")
        if not self.positional:
            if required:
                raise SpecError(f"stage {self.stage!r} needs a {what}, "
                                f"e.g. '{_EXAMPLES[self.stage]}'")
            return None
        return self.positional.pop()

    def key(self, name: str) -> str | None:
        return self.keys.pop(name, None)

    def done(self, known: tuple[str, ...] = ()) -> None:
        if self.positional:
            raise SpecError(f"stage {self.stage!r} takes no positional argument, "
                            f"got {self.positional}")
        if self.keys:
            accepted = ", ".join(known) if known else "none"
            raise SpecError(f"stage {self.stage!r} has unknown option(s) {sorted(self.keys)}; "
                            f"accepted: {accepted}")


def _int(stage: str, what: str, text: str) -> int:
    if not _INT.match(text):
        raise SpecError(f"stage {stage!r}: {what} must be a non-negative integer, got {text!r}")
    return int(text)


def _float(stage: str, what: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SpecError(f"stage {stage!r}: {what} must be a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise SpecError(f"stage {stage!r}: {what} must be finite, got {text!r}")
    return value


def _enum(stage: str, key: str, cls: type[_E], text: str | None, default: _E) -> _E:
    if text is None:
        return default
    for member in cls:
        if member.value == text:
            return member
    choices = "|".join(str(m.value) for m in cls)
    raise SpecError(f"stage {stage!r}: {key} must be one of {choices}, got {text!r}")


def _parse_topk(a: _Args) -> TopKConfig:
    count_text = a.key("k")
    amount = a.first("fraction or count", required=count_text is None)
    fraction: float | None = None
    count: int | None = None
    if count_text is not None:
        if amount is not None:
            raise SpecError(f"stage {a.stage!r}: give a fraction or k=<count>, not both")
        count = _int(a.stage, "k (values kept per tensor)", count_text)
    elif amount is not None and _INT.match(amount):
        # 'topk:2' once meant "keep 2 values"; people wrote it meaning 2%. Refuse to guess.
        raise SpecError(f"topk:{amount} is ambiguous: write topk:{amount}% (keep {amount}% = "
                        f"fraction {int(amount) / 100:g}), topk:{int(amount) / 100:g}, or "
                        f"topk:k={amount} (keep {amount} values per tensor)")
    elif amount is not None and amount.endswith("%"):
        fraction = _float(a.stage, "percentage", amount[:-1]) / 100.0
    else:
        fraction = _float(a.stage, "fraction", amount or "")
    mode = _enum(a.stage, "mode", SelectMode, a.key("mode"), SelectMode.EXACT)
    scope = _enum(a.stage, "scope", Scope, a.key("scope"), Scope.TENSOR)
    tol_text = a.key("tol")
    tol = DEFAULT_SAMPLED_TOL if tol_text is None else _float(a.stage, "tol", tol_text)
    a.done(("k", "mode", "scope", "tol"))
    return TopKConfig(fraction=fraction, count=count, mode=mode, scope=scope, tol=tol)


_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*(b|kb|kib|mb|mib)?$", re.IGNORECASE)
_UNITS = {None: 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2}


def _parse_budget(a: _Args) -> TopKConfig:
    text = a.first("size (e.g. 4KB, 4096, 2KiB) or ratio (e.g. x200)", required=True) or ""
    a.done()
    if text[:1] in ("x", "X"):
        return TopKConfig(ratio=_float(a.stage, "ratio", text[1:]), scope=Scope.GLOBAL)
    match = _SIZE.match(text)
    if match is None:
        raise SpecError(f"stage 'budget': size must look like 4KB, 4096 (bytes), 2KiB or "
                        f"x200 (a ratio), got {text!r}")
    unit = match.group(2).lower() if match.group(2) else None
    size = float(match.group(1)) * _UNITS[unit]
    if not size.is_integer():
        raise SpecError(f"stage 'budget': {text!r} is not a whole number of bytes")
    return TopKConfig(budget=int(size), scope=Scope.GLOBAL)


def _parse_energy(a: _Args) -> TopKConfig:
    text = a.first("fraction of the update's squared norm (e.g. 0.6 or 60%)",
                   required=True) or ""
    value = (_float(a.stage, "percentage", text[:-1]) / 100.0 if text.endswith("%")
             else _float(a.stage, "fraction", text))
    scope = _enum(a.stage, "scope", Scope, a.key("scope"), Scope.TENSOR)
    floor_text = a.key("floor")
    floor = 0.0 if floor_text is None else _float(a.stage, "floor", floor_text)
    a.done(("scope", "floor"))
    return TopKConfig(energy=value, scope=scope, floor=floor)


def _parse_lowrank(a: _Args) -> LowRankConfig:
    rank = _int(a.stage, "rank", a.first("rank", required=True) or "")
    a.done()
    return LowRankConfig(rank)


def _parse_q(a: _Args) -> QuantizeConfig:
    bits = _int(a.stage, "bits", a.first("bit width", required=True) or "")
    rounding = _enum(a.stage, "round", Rounding, a.key("round"), Rounding.NEAREST)
    block_text = a.key("block")
    block = 0 if block_text is None else _int(a.stage, "block", block_text)
    scale = _enum(a.stage, "scale", ScaleStat, a.key("scale"), ScaleStat.MAX)
    a.done(("round", "block", "scale"))
    return QuantizeConfig(bits=bits, rounding=rounding, block=block, scale=scale)


def _parse_sign(a: _Args) -> SignConfig:
    block_text = a.key("block")
    a.done(("block",))
    return SignConfig(block=0 if block_text is None else _int(a.stage, "block", block_text))


def _parse_cast(precision: Precision) -> Callable[[_Args], CastConfig]:
    def parse(a: _Args) -> CastConfig:
        a.done()
        return CastConfig(precision)

    return parse


def _parse_positions(coding: PositionCoding) -> Callable[[_Args], PositionCoding]:
    def parse(a: _Args) -> PositionCoding:
        a.done()
        return coding

    return parse


def _parse_zstd(a: _Args) -> ZstdConfig:
    level = a.first("level", required=False)
    a.done()
    return ZstdConfig() if level is None else ZstdConfig(_int(a.stage, "level", level))


def _parse_ans(a: _Args) -> EntropyConfig:
    a.done()
    return EntropyConfig()


def _parse_pass(a: _Args) -> PassthroughConfig:
    below = _int(a.stage, "threshold", a.first("element threshold", required=True) or "")
    precision = _enum(a.stage, "dtype", Precision, a.key("dtype"), Precision.FP32)
    a.done(("dtype",))
    return PassthroughConfig(below=below, precision=precision)


StageParser = Callable[[_Args], object]
_FIELD = {Slot.SELECT: "topk", Slot.VALUES: "values", Slot.POSITIONS: "positions",
          Slot.ENTROPY: "entropy", Slot.LOSSLESS: "zstd", Slot.PASSTHROUGH: "passthrough"}
STAGES: dict[str, tuple[Slot, StageParser]] = {}
_EXAMPLES: dict[str, str] = {}
_FIELD_OF: dict[str, str] = {}  # stages stored in another field than their slot's


def register_stage(name: str, slot: Slot, parser: StageParser, example: str,
                   field_name: str | None = None) -> None:
    """Add a stage name to the grammar; registering a name twice is an error."""
    if name in STAGES:
        raise SpecError(f"compression stage {name!r} is already registered")
    STAGES[name] = (slot, parser)
    _EXAMPLES[name] = example
    if field_name is not None:
        _FIELD_OF[name] = field_name


register_stage("topk", Slot.SELECT, _parse_topk, "topk:0.01")
register_stage("budget", Slot.SELECT, _parse_budget, "budget:4KB")
register_stage("energy", Slot.SELECT, _parse_energy, "energy:0.6")
register_stage("lowrank", Slot.SELECT, _parse_lowrank, "lowrank:4", field_name="lowrank")
register_stage("q", Slot.VALUES, _parse_q, "q:4")
register_stage("sign", Slot.VALUES, _parse_sign, "sign")
for _p in Precision:
    register_stage(_p.value, Slot.VALUES, _parse_cast(_p), _p.value)
for _c in PositionCoding:
    register_stage(_c.value, Slot.POSITIONS, _parse_positions(_c), _c.value)
register_stage("rice", Slot.POSITIONS, _parse_positions(PositionCoding.GOLOMB), "rice")
register_stage("ans", Slot.ENTROPY, _parse_ans, "ans")
register_stage("zstd", Slot.LOSSLESS, _parse_zstd, "zstd:3")
register_stage("pass", Slot.PASSTHROUGH, _parse_pass, "pass:256")


def _split_stage(text: str) -> tuple[str, _Args]:
    name, _, rest = text.partition(":")
    name = name.strip()
    args = _Args(stage=name, positional=[])
    if not _:
        return name, args
    for raw in rest.split(","):
        item = raw.strip()
        if not item:
            raise SpecError(f"stage {name!r} has an empty argument")
        key, eq, value = item.partition("=")
        if not eq:
            args.positional.append(item)
            continue
        key, value = key.strip(), value.strip()
        if not key or not value:
            raise SpecError(f"stage {name!r}: malformed option {item!r} (want key=value)")
        if key in args.keys:
            raise SpecError(f"stage {name!r}: option {key!r} given twice")
        args.keys[key] = value
    return name, args


def _build(text: str) -> PipelineSpec:
    if len(text) > MAX_SPEC_LENGTH:
        raise SpecError(f"spec is {len(text)} characters; at most {MAX_SPEC_LENGTH} allowed")
    if not text.isascii():
        raise SpecError("spec must be ASCII")
    parts = [p.strip() for p in text.split("|")]
    if parts == ["none"]:
        return PipelineSpec()
    spec = PipelineSpec()
    last: tuple[Slot, str] | None = None
    seen: dict[Slot, str] = {}
    for part in parts:
        if not part:
            raise SpecError("empty stage (two '|' in a row, or a leading/trailing '|')")
        name, args = _split_stage(part)
        if name == "none":
            raise SpecError("'none' must be the whole spec, not one stage of several")
        if name not in STAGES:
            raise SpecError(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}")
        slot, parser = STAGES[name]
        if slot in seen:
            raise SpecError(f"stage {name!r} conflicts with {seen[slot]!r}: one "
                            f"{slot.name.lower()} stage at most")
        if slot is not Slot.PASSTHROUGH:  # an option more than a stage: allowed anywhere
            if last is not None and slot < last[0]:
                raise SpecError(f"stage {name!r} must come before {last[1]!r}; order is "
                                "topk|budget|energy|lowrank, q|sign|fp16|bf16|fp32, "
                                "auto|bitmap|golomb, ans, zstd")
            last = (slot, name)
        seen[slot] = name
        change: dict[str, Any] = {_FIELD_OF.get(name, _FIELD[slot]): parser(args)}
        spec = replace(spec, **change)
    return spec


def parse_spec(text: str | PipelineSpec) -> PipelineSpec:
    """Parse a pipeline spec string; a :class:`PipelineSpec` is returned unchanged.

    ``str(parse_spec(s))`` is the canonical form of ``s`` (defaults dropped), and
    ``parse_spec(str(spec)) == spec`` for every spec.

    Raises
    ------
    SpecError
        With the offending spec quoted and what was expected.
    """
    if isinstance(text, PipelineSpec):
        return text
    if not isinstance(text, str):
        raise SpecError(f"a compression spec must be a string, got {type(text).__name__}")
    return _parse_cached(text)


@lru_cache(maxsize=256)
def _parse_cached(text: str) -> PipelineSpec:
    # specs are immutable, and a client parses the same one every round (and the decoder
    # once per payload), so caching is safe; errors are not cached
    try:
        return _build(text)
    except SpecError as exc:
        raise SpecError(f"invalid compression spec {text!r}: {exc}") from None


__all__ = ["STAGES", "Slot", "parse_spec", "register_stage"]
