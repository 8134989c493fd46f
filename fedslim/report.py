"""The results schema: one typed record per round, one for the run, and their one loader.

``results.json`` is written from :class:`RunResults` and read back with
:func:`load_results`; the CLI, the benchmarks and the deploy launcher all use it, so a
field is renamed in one place. The strategy stack's parts report into a
:class:`RoundCollector` (byte ledger, rejects, aggregated client metrics, distillation);
the ServerApp closes each round with the central metrics and gets a :class:`RoundReport`.

No Flower import here: the schema is plain data (JSON has no NaN, so non-finite floats are
written as ``null`` and read back as NaN).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fedslim.errors import FedslimError


class ResultsError(FedslimError, ValueError):
    """A results.json file is missing, unreadable or not in fedslim's schema."""


@dataclass
class EvalMetrics:
    accuracy: float
    loss: float


@dataclass
class Central:
    """The server's own evaluation of the global model (test is reported, val selects)."""

    test: EvalMetrics
    val: EvalMetrics


@dataclass
class Reject:
    """A reply the server did not use: which node, which phase, and why."""

    node: int
    phase: str                   # "train" or "evaluate"
    reason: str
    partition: int | None = None


@dataclass
class Defence:
    """What a server-side defence did to one reply (or to the round, node 0)."""

    node: int
    action: str                  # "weight-capped", "norm-clipped", "aggregate-dropped"
    detail: str
    partition: int | None = None


@dataclass
class NodeBytes:
    uplink_bytes: int = 0
    downlink_bytes: int = 0


@dataclass
class CommReport:
    """Bytes (as Flower serialized them) and codec times of one round, both directions."""

    uplink_bytes: int = 0            # train replies
    uplink_eval_bytes: int = 0       # evaluate replies
    downlink_bytes: int = 0          # train instructions
    downlink_eval_bytes: int = 0     # evaluate instructions
    uplink_none_bytes: int = 0       # the same train replies with plain float32 arrays
    downlink_none_bytes: int = 0     # the instructions as the wrapped strategy made them
    full_model_messages: int = 0
    delta_messages: int = 0
    current_messages: int = 0        # "you hold this version already": no arrays at all
    init_messages: int = 0           # "build the seeded round-0 model yourself" (+ chain)
    key_messages: int = 0            # round-0 model + the last keyframe (+ chain)
    encode_seconds: float = 0.0      # clients' encode time, summed
    decode_seconds: float = 0.0      # server's decode + validation time
    node_decode_seconds: float = 0.0  # clients' downlink decode time (as they report it)
    per_node: dict[str, NodeBytes] = field(default_factory=dict)
    uplink_ratio: float | None = None
    total_ratio: float = 0.0  # all traffic, both directions, vs plain float32 (0: unknown)
    kept_per_tensor: dict[str, float] = field(default_factory=dict)  # mean over replies
    kept_replies: int = 0            # compressed replies behind kept_per_tensor

    @property
    def total_bytes(self) -> int:
        return (self.uplink_bytes + self.uplink_eval_bytes + self.downlink_bytes
                + self.downlink_eval_bytes)

    @property
    def total_none_bytes(self) -> int:
        """What the same messages cost with plain float32 arrays (evaluate replies carry
        no model: as they are)."""
        return self.uplink_none_bytes + self.uplink_eval_bytes + self.downlink_none_bytes


def ratio(plain: int, actual: int) -> float | None:
    """``plain / actual``; None when nothing was measured (either side 0: e.g. results
    written before downlink-none bytes were recorded)."""
    return plain / actual if actual and plain else None


@dataclass
class CommTotals:
    """Cumulative :class:`CommReport` figures over the rounds recorded so far."""

    uplink_bytes: int = 0
    uplink_eval_bytes: int = 0
    downlink_bytes: int = 0
    downlink_eval_bytes: int = 0
    uplink_none_bytes: int = 0
    downlink_none_bytes: int = 0
    encode_seconds: float = 0.0
    decode_seconds: float = 0.0
    node_decode_seconds: float = 0.0
    total_bytes: int = 0
    total_none_bytes: int = 0
    rejected_replies: int = 0
    uplink_ratio: float | None = None
    total_ratio: float = 0.0  # 0: not measured (results written before it was)

    @classmethod
    def of(cls, rounds: list[RoundReport]) -> CommTotals | None:
        rows = [r.comm for r in rounds if r.comm is not None]
        if not rows:
            return None
        tot = cls(rejected_replies=sum(len(r.rejects) for r in rounds))
        for name in ("uplink_bytes", "uplink_eval_bytes", "downlink_bytes",
                     "downlink_eval_bytes", "uplink_none_bytes", "downlink_none_bytes",
                     "encode_seconds", "decode_seconds", "node_decode_seconds"):
            setattr(tot, name, sum(getattr(r, name) for r in rows))
        tot.total_bytes = sum(r.total_bytes for r in rows)
        tot.total_none_bytes = sum(r.total_none_bytes for r in rows)
        tot.uplink_ratio = ratio(tot.uplink_none_bytes, tot.uplink_bytes)
        if all(r.downlink_none_bytes for r in rows):  # (older results: not recorded)
            tot.total_ratio = ratio(tot.total_none_bytes, tot.total_bytes) or 0.0
        return tot


@dataclass
class DistillReport:
    round: int
    teacher: str
    teacher_models: int
    teacher_test_accuracy: float
    global_test_accuracy: float
    student_test_accuracy: float
    student_val_accuracy: float
    student_val_loss: float
    student_params: int
    global_params: int
    student_bytes: int
    global_bytes: int
    kl_before: float
    kl_after: float
    steps: int
    best_step: int
    stopped_early: bool
    distill_seconds: float


@dataclass
class Resources:
    """Where a round's time went, and memory (this machine's view).

    ``client_train_seconds``, ``client_encode_seconds`` (uplink) and
    ``client_decode_seconds`` (downlink, of the clients that trained) are summed over the clients
    (they run in parallel); ``wait_seconds`` is the round's wall time the server spent
    neither decoding, aggregating nor evaluating: transfer, and waiting for the clients.
    """

    client_train_seconds: float = 0.0
    client_encode_seconds: float = 0.0
    client_decode_seconds: float = 0.0
    server_decode_seconds: float = 0.0
    server_aggregate_seconds: float = 0.0
    server_evaluate_seconds: float = 0.0
    wait_seconds: float = 0.0
    server_peak_rss_mb: float = 0.0
    client_peak_rss_mb: float | None = None   # mean over the clients that evaluated


@dataclass
class RoundReport:
    round: int
    round_seconds: float = 0.0
    central: Central | None = None
    train: dict[str, float] = field(default_factory=dict)
    federated_evaluate: dict[str, float] = field(default_factory=dict)
    aggregated: bool = False         # the round produced a new global model
    replies: int = 0                 # train replies aggregated
    failures: int = 0                # train replies rejected or failed, and silent nodes
    silent: int = 0                  # nodes sent a train message that never answered
    evaluate_replies: int = 0
    evaluate_failures: int = 0
    rejects: list[Reject] = field(default_factory=list)
    defences: list[Defence] = field(default_factory=list)
    comm: CommReport | None = None
    comm_cumulative: CommTotals | None = None
    distill: DistillReport | None = None
    resources: Resources | None = None


@dataclass
class StudentReport:
    model: str
    params: int
    param_fraction_of_global: float
    file: str
    file_bytes: int
    test_accuracy: float
    val_accuracy: float
    int8_file: str
    int8_file_bytes: int
    int8_test_accuracy: float


@dataclass
class Confusion:
    """Where the final global model errs on the test split (rows: true class, columns:
    predicted class)."""

    matrix: list[list[int]]
    per_class_accuracy: list[float]  # NaN for a class absent from the test split
    most_confused: list[list[int]]   # [true, predicted, count], largest first (<= 5)


@dataclass
class ClientAccuracy:
    """The global model on each client's own evaluation split (the last round's
    federated evaluation): how evenly it serves the federation."""

    round: int
    clients: int
    mean: float
    min: float
    p10: float
    median: float
    max: float


@dataclass
class FinalReport:
    test_accuracy: float
    test_loss: float
    val_accuracy: float
    val_loss: float
    rounds_completed: int
    fl_seconds: float
    model_file: str
    model_file_bytes: int
    rounds_aggregated: int = 0
    comm: CommTotals | None = None
    student: StudentReport | None = None
    error: str | None = None         # set when the run ended without a usable model
    confusion: Confusion | None = None
    client_accuracy: ClientAccuracy | None = None
    best: BestRound | None = None    # the round with the best validation accuracy
    stopped_early: str | None = None  # why the federation stopped before its last round


@dataclass
class BestRound:
    round: int
    val_accuracy: float
    test_accuracy: float
    model_file: str | None = None    # with early stopping: that round's model


@dataclass
class RunResults:
    fedslim_version: str
    config: dict[str, Any]
    started_at: str
    wall_seconds: float
    resumed_from_round: int | None = None
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    rounds: list[RoundReport] = field(default_factory=list)
    final: FinalReport | None = None

    def to_json(self) -> str:
        return json.dumps(_finite(dataclasses.asdict(self)), indent=2) + "\n"


class RoundCollector:
    """Where the strategy stack's parts report what happened in the open round.

    The outermost wrapper opens a round (:meth:`open`); parts add to it; the ServerApp
    closes it with the central metrics (:meth:`close`), or the next :meth:`open` does.
    Closed rounds are in :attr:`history`.
    """

    def __init__(self) -> None:
        self.current: RoundReport | None = None
        self.history: list[RoundReport] = []

    def open(self, server_round: int) -> RoundReport:
        if self.current is not None and self.current.round != server_round:
            self.close()
        if self.current is None:
            self.current = RoundReport(round=server_round)
        return self.current

    def close(self, central: Central | None = None, round_seconds: float = 0.0
              ) -> RoundReport | None:
        report, self.current = self.current, None
        if report is None:
            return None
        report.central = central
        report.round_seconds = round_seconds
        self.history = [r for r in self.history if r.round != report.round] + [report]
        report.comm_cumulative = CommTotals.of(self.history)
        return report


# --------------------------------------------------------------------------- (de)serialization
T = TypeVar("T")


def _finite(x: Any) -> Any:
    """JSON has no NaN/Inf: map them to None, recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _build(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return math.nan if args == [float] else None
        return _build(args[0], value, where)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_dict(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        return [_build(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        return {k: _build(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        return math.nan if value is None else float(value)
    return value


def from_dict(cls: type[T], data: Any, where: str = "results") -> T:
    """Build dataclass ``cls`` from parsed JSON; unknown keys are ignored."""
    if not isinstance(data, dict):
        raise ResultsError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            kwargs[f.name] = _build(hints[f.name], data[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ResultsError(f"{where}: missing field {f.name!r}")
    return cls(**kwargs)


def load_results(path: str | Path) -> RunResults:
    """Read a ``results.json`` (a file or the output directory holding it).

    Raises
    ------
    ResultsError
        If the file is missing, is not JSON, or does not follow the schema.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ResultsError(f"{p}: no such file") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{p}: unreadable results: {exc}") from None
    try:
        return from_dict(RunResults, data, str(p))
    except (TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, ResultsError):
            raise
        raise ResultsError(f"{p}: not in fedslim's results schema: {exc}") from None
