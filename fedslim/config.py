"""Typed run configuration, parsed once from Flower's ``context.run_config`` or the CLI.

Every run-config key is declared exactly once, as a field of one of the frozen dataclasses
below, with its kebab-case key and a help text in the field metadata. ``parse_run_config``
turns a flat ``{key: value}`` mapping into a :class:`RunConfig`, raising one
:class:`~fedslim.errors.ConfigError` that names the key, the value and what is allowed.
The defaults here are the single source of truth: ``pyproject.toml``'s
``[tool.flwr.app.config]`` must list the same keys and values (a test checks it) and the
reference table in ``docs/configuration.md`` is generated from these fields.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedslim.errors import ConfigError


def _key(key: str, help: str, *, low: float | None = None, high: float | None = None,
         low_open: bool = False) -> dict[str, Any]:
    return {"key": key, "help": help, "low": low, "high": high, "low_open": low_open}


class Dataset(enum.StrEnum):
    DIGITS = "digits"
    SYNTHETIC = "synthetic"
    MNIST = "mnist"
    CIFAR10 = "cifar10"


class Partitioning(enum.StrEnum):
    IID = "iid"
    DIRICHLET = "dirichlet"
    PATHOLOGICAL = "pathological"


class Optimizer(enum.StrEnum):
    SGD = "sgd"
    ADAM = "adam"


class DevicePref(enum.StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class StrategyName(enum.StrEnum):
    FEDSLIM = "fedslim"              # compressed FedAvg (+ distillation when enabled)
    FLOWER_FEDAVG = "flower-fedavg"  # Flower's own FedAvg aggregation (reference)


class ServerOpt(enum.StrEnum):
    AVG = "avg"      # w += server-lr * mean update (FedAvg when server-lr = 1)
    AVGM = "avgm"    # server momentum (FedAvgM)
    ADAM = "adam"    # FedAdam


class Teacher(enum.StrEnum):
    ENSEMBLE = "ensemble"  # mean logits of the participating clients' models
    GLOBAL = "global"      # the aggregated global model
    BOTH = "both"          # mean of the two


class Augment(enum.StrEnum):
    NONE = "none"
    NOISE = "noise"
    SHIFT = "shift"
    NOISE_SHIFT = "noise+shift"


@dataclass(frozen=True)
class DataConfig:
    """Which data, and how it is split between server and clients."""

    dataset: Dataset = field(default=Dataset.DIGITS, metadata=_key(
        "dataset", "Data set: `digits` (embedded, scikit-learn), `synthetic`, `mnist` or "
        "`cifar10` (the last two read from `data-dir`)."))
    data_dir: str = field(default="", metadata=_key(
        "data-dir", "Directory with MNIST IDX files or CIFAR-10 binary batches."))
    partitioning: Partitioning = field(default=Partitioning.DIRICHLET, metadata=_key(
        "partitioning", "How client data is split: `iid`, `dirichlet` (label skew, "
        "`dirichlet-alpha`) or `pathological` (`classes-per-client` labels each)."))
    dirichlet_alpha: float = field(default=0.5, metadata=_key(
        "dirichlet-alpha", "Dirichlet concentration; smaller is more skewed.", low=0.0,
        low_open=True))
    classes_per_client: int = field(default=2, metadata=_key(
        "classes-per-client", "Labels per client for `pathological` partitioning.", low=1))
    test_fraction: float = field(default=0.2, metadata=_key(
        "test-fraction", "Share of the pool held by the server as the test set (reported "
        "only, never used to choose anything).", low=0.0, high=0.9, low_open=True))
    val_fraction: float = field(default=0.1, metadata=_key(
        "val-fraction", "Share held by the server as a labelled validation set (early "
        "stopping, model selection).", low=0.0, high=0.9))
    proxy_fraction: float = field(default=0.1, metadata=_key(
        "proxy-fraction", "Share held by the server as an unlabelled proxy set "
        "(distillation inputs; labels are dropped).", low=0.0, high=0.9))
    client_eval_fraction: float = field(default=0.1, metadata=_key(
        "client-eval-fraction", "Share of each client's partition kept for federated "
        "evaluation.", low=0.0, high=0.5))
    synthetic_samples: int = field(default=4000, metadata=_key(
        "synthetic-samples", "Number of samples for the `synthetic` data set.", low=20))

    def __post_init__(self) -> None:
        total = self.test_fraction + self.val_fraction + self.proxy_fraction
        if total >= 0.95:
            raise ConfigError(
                f"test-fraction + val-fraction + proxy-fraction = {total:.3f} leaves no data "
                "for clients; it must be < 0.95")
        if self.dataset in (Dataset.MNIST, Dataset.CIFAR10) and not self.data_dir:
            raise ConfigError(f"dataset={self.dataset.value!r} needs data-dir to point at "
                              "the local files (nothing is downloaded)")


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each client."""

    model: str = field(default="digits_cnn", metadata=_key(
        "model", "Global model architecture (see `fedslim.task.models.MODELS`)."))
    local_epochs: int = field(default=2, metadata=_key(
        "local-epochs", "Local epochs per round.", low=1))
    batch_size: int = field(default=16, metadata=_key(
        "batch-size", "Local mini-batch size.", low=1))
    optimizer: Optimizer = field(default=Optimizer.SGD, metadata=_key(
        "optimizer", "Local optimizer: `sgd` (with momentum) or `adam`."))
    learning_rate: float = field(default=0.05, metadata=_key(
        "learning-rate", "Local learning rate in round 1.", low=0.0, low_open=True))
    momentum: float = field(default=0.9, metadata=_key(
        "momentum", "SGD momentum.", low=0.0, high=0.999))
    weight_decay: float = field(default=0.0, metadata=_key(
        "weight-decay", "L2 weight decay.", low=0.0))
    clip_norm: float = field(default=0.0, metadata=_key(
        "clip-norm", "Gradient-norm clipping threshold; 0 disables.", low=0.0))
    lr_decay: float = field(default=1.0, metadata=_key(
        "lr-decay", "Learning rate is multiplied by this factor every round "
        "(lr_r = learning-rate * lr-decay^(r-1)).", low=0.0, high=1.0, low_open=True))
    augment: Augment = field(default=Augment.NONE, metadata=_key(
        "augment", "Input augmentation during local training: `none`, `noise`, `shift`, "
        "`noise+shift`."))
    device: DevicePref = field(default=DevicePref.AUTO, metadata=_key(
        "device", "`auto` picks cuda when available, else cpu; or force `cpu` / `cuda`."))


@dataclass(frozen=True)
class FederationConfig:
    """The federated loop on the server."""

    strategy: StrategyName = field(default=StrategyName.FEDSLIM, metadata=_key(
        "strategy", "`fedslim` (compressed FedAvg, optional distillation) or "
        "`flower-fedavg` (Flower's own FedAvg aggregation; needs uplink/downlink `none`)."))
    num_server_rounds: int = field(default=20, metadata=_key(
        "num-server-rounds", "Number of federated rounds.", low=1))
    fraction_train: float = field(default=1.0, metadata=_key(
        "fraction-train", "Fraction of nodes sampled for training each round.", low=0.0,
        high=1.0, low_open=True))
    fraction_evaluate: float = field(default=1.0, metadata=_key(
        "fraction-evaluate", "Fraction of nodes sampled for federated evaluation; 0 "
        "disables it.", low=0.0, high=1.0))
    min_train_nodes: int = field(default=2, metadata=_key(
        "min-train-nodes", "Minimum replies a round needs to update the model.", low=1))
    min_available_nodes: int = field(default=2, metadata=_key(
        "min-available-nodes", "Nodes that must be connected before round 1.", low=1))
    round_timeout: float = field(default=3600.0, metadata=_key(
        "round-timeout", "Seconds to wait for replies in a round.", low=0.0, low_open=True))
    seed: int = field(default=42, metadata=_key(
        "seed", "Seed for splits, partitions, initial model, client shuffling.", low=0))
    output_dir: str = field(default="outputs/fedslim", metadata=_key(
        "output-dir", "Where results.json, the model and checkpoints go (relative paths "
        "are resolved against the server process' working directory)."))
    resume: bool = field(default=False, metadata=_key(
        "resume", "Continue from the last complete checkpoint in output-dir."))
    progress: bool = field(default=True, metadata=_key(
        "progress", "Print a rich per-round progress line."))


def _check_spec(key: str, spec: str) -> None:
    from fedslim.compression import parse_spec  # lazy: keep config import light
    from fedslim.errors import SpecError

    try:
        parse_spec(spec)
    except SpecError as exc:
        raise ConfigError(f"run-config key {key!r}: invalid pipeline spec {spec!r}: {exc}") \
            from None


@dataclass(frozen=True)
class CompressionConfig:
    """Update compression on the wire and the server-side optimizer."""

    uplink: str = field(default="none", metadata=_key(
        "uplink", "Client-to-server pipeline spec (`none` = plain float32 arrays, exactly "
        "as stock Flower; e.g. `topk:0.01|q:4`). See docs/compression.md."))
    downlink: str = field(default="none", metadata=_key(
        "downlink", "Server-to-client pipeline for the global model *delta* (`none` = full "
        "float32 model every round). The server decodes its own payload, so clients and "
        "server hold bit-identical weights with any pipeline."))
    error_feedback: bool = field(default=True, metadata=_key(
        "error-feedback", "Clients add what compression dropped to their next update."))
    warmup_rounds: int = field(default=0, metadata=_key(
        "warmup-rounds", "DGC-style sparsity warm-up: top-k density decays exponentially "
        "from 25% to the target over this many rounds.", low=0))
    server_opt: ServerOpt = field(default=ServerOpt.AVG, metadata=_key(
        "server-opt", "How the averaged update is applied: `avg`, `avgm` (momentum) or "
        "`adam`."))
    server_lr: float = field(default=1.0, metadata=_key(
        "server-lr", "Server learning rate applied to the averaged update.", low=0.0,
        low_open=True))
    server_momentum: float = field(default=0.9, metadata=_key(
        "server-momentum", "Momentum for `avgm`; beta1 for `adam`.", low=0.0, high=0.999))
    max_update_elements: int = field(default=1 << 28, metadata=_key(
        "max-update-elements", "Decoder limit on elements per payload (rejects bombs).",
        low=1))

    def __post_init__(self) -> None:
        _check_spec("uplink", self.uplink)
        _check_spec("downlink", self.downlink)


@dataclass(frozen=True)
class DistillConfig:
    """Server-side ensemble distillation into a compact student (FedDF-style)."""

    distill: bool = field(default=False, metadata=_key(
        "distill", "Distil a compact student on the server's unlabelled proxy set."))
    student_model: str = field(default="digits_student", metadata=_key(
        "student-model", "Student architecture (<= 25% of the global model's params)."))
    teacher: Teacher = field(default=Teacher.ENSEMBLE, metadata=_key(
        "distill-teacher", "Teacher: `ensemble` of client models, `global` model, `both`."))
    every: int = field(default=1, metadata=_key(
        "distill-every", "Distil every k rounds (and always in the last round).", low=1))
    temperature: float = field(default=3.0, metadata=_key(
        "distill-temperature", "Softmax temperature for the KL loss.", low=0.0,
        low_open=True))
    steps: int = field(default=200, metadata=_key(
        "distill-steps", "Maximum optimizer steps per distillation.", low=1))
    lr: float = field(default=1e-3, metadata=_key(
        "distill-lr", "Adam learning rate of the student.", low=0.0, low_open=True))
    batch_size: int = field(default=64, metadata=_key(
        "distill-batch-size", "Proxy mini-batch size.", low=1))
    patience: int = field(default=5, metadata=_key(
        "distill-patience", "Early stopping: evaluations on the val split without a "
        "lower val cross-entropy (one evaluation every `distill-eval-every` steps).", low=1))
    eval_every: int = field(default=20, metadata=_key(
        "distill-eval-every", "Steps between validation checks.", low=1))
    augment: Augment = field(default=Augment.NOISE_SHIFT, metadata=_key(
        "distill-augment", "Augmentation of proxy inputs (teacher sees the same inputs)."))


@dataclass(frozen=True)
class RunConfig:
    """The whole run configuration: one section per concern."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FederationConfig = field(default_factory=FederationConfig)
    comp: CompressionConfig = field(default_factory=CompressionConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        if self.fed.strategy is StrategyName.FLOWER_FEDAVG and (
                self.comp.uplink != "none" or self.comp.downlink != "none"):
            raise ConfigError("strategy='flower-fedavg' sends plain arrays: it needs "
                              "uplink='none' and downlink='none'")
        if self.fed.min_available_nodes < self.fed.min_train_nodes:
            raise ConfigError(
                f"min-available-nodes={self.fed.min_available_nodes} must be >= "
                f"min-train-nodes={self.fed.min_train_nodes}")

    def to_flat(self) -> dict[str, bool | int | float | str]:
        """Return the flat ``{key: value}`` form (enums as their strings), e.g. for JSON."""
        out: dict[str, bool | int | float | str] = {}
        for section in _sections(self):
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                out[f.metadata["key"]] = value.value if isinstance(value, enum.Enum) else value
        return out


SECTION_TYPES: dict[str, type] = {
    "data": DataConfig, "train": TrainConfig, "fed": FederationConfig,
    "comp": CompressionConfig, "distill": DistillConfig}


def _sections(cfg: RunConfig) -> list[Any]:
    return [getattr(cfg, name) for name in SECTION_TYPES]


def key_table() -> list[tuple[str, str, Any, str]]:
    """(key, type name, default, help) for every key, in declaration order."""
    rows = []
    for cls in SECTION_TYPES.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            typ = hints[f.name]
            default = f.default
            if isinstance(default, enum.Enum):
                default = default.value
            tname = ("one of " + ", ".join(f"`{m.value}`" for m in typ)
                     if isinstance(typ, type) and issubclass(typ, enum.Enum) else typ.__name__)
            rows.append((f.metadata["key"], tname, default, f.metadata["help"]))
    return rows


def known_keys() -> list[str]:
    return [row[0] for row in key_table()]


def _coerce(key: str, value: Any, typ: Any, meta: Mapping[str, Any]) -> Any:
    """Convert one run-config value to the field's type, raising ConfigError on mismatch."""
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        allowed = [m.value for m in typ]
        if isinstance(value, str) and value in allowed:
            return typ(value)
        raise ConfigError(f"run-config key {key!r}: got {value!r}; allowed values: {allowed}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"run-config key {key!r}: got {value!r}; expected true or false")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"run-config key {key!r}: got {value!r}; expected an integer")
        try:
            num = int(value) if not isinstance(value, float) else value
        except ValueError:
            raise ConfigError(
                f"run-config key {key!r}: got {value!r}; expected an integer") from None
        if isinstance(num, float):
            if not num.is_integer():
                raise ConfigError(f"run-config key {key!r}: got {value!r}; expected an integer")
            num = int(num)
        value = num
    elif typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"run-config key {key!r}: got {value!r}; expected a number")
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(
                f"run-config key {key!r}: got {value!r}; expected a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"run-config key {key!r}: got {value!r}; expected a finite number")
    elif typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"run-config key {key!r}: got {value!r}; expected a string")
        return value
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta.get("low_open") and value == low)):
        op = ">" if meta.get("low_open") else ">="
        raise ConfigError(f"run-config key {key!r}: got {value!r}; must be {op} {low}")
    if high is not None and value > high:
        raise ConfigError(f"run-config key {key!r}: got {value!r}; must be <= {high}")
    return value


def parse_run_config(
    run_config: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Parse a flat run-config mapping (plus optional overrides) into a :class:`RunConfig`.

    Missing keys take the dataclass defaults, so an empty mapping (as Flower's
    ``run_simulation`` passes) yields the default configuration.

    Raises
    ------
    ConfigError
        For an unknown key (listing the known ones) or a value of the wrong type or range.
    """
    merged: dict[str, Any] = dict(run_config or {})
    merged.update(overrides or {})
    known = set(known_keys())
    unknown = sorted(k for k in merged if k not in known)
    if unknown:
        raise ConfigError(f"unknown run-config key(s) {unknown}; known keys: {sorted(known)}")
    sections: dict[str, Any] = {}
    for name, cls in SECTION_TYPES.items():
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            key = f.metadata["key"]
            if key in merged:
                kwargs[f.name] = _coerce(key, merged[key], hints[f.name], f.metadata)
        try:
            sections[name] = cls(**kwargs)
        except ConfigError:
            raise
    return RunConfig(**sections)


def parse_cli_overrides(items: list[str] | None) -> dict[str, str]:
    """Parse ``key=value`` strings (the CLI's ``-c``) into a dict; values stay strings."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        out[key.strip()] = value.strip().strip('"').strip("'")
    return out
