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
import functools
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedslim.compression.auto import AutoSpec
from fedslim.compression.spec import PipelineSpec
from fedslim.config_compression import CompressionConfig
from fedslim.config_enums import (
    Augment,
    DevicePref,
    Layout,
    Normalize,
    Optimizer,
    ServerOpt,
    Teacher,
)
from fedslim.config_fields import (
    CLIENT_PREFIX,
    check_registered,
    did_you_mean,
    flat,
    key,
    parse_cli_overrides,
    parse_client_keys,
    typed_value,
    validate_fields,
)
from fedslim.errors import ConfigError
from fedslim.plugins import load_plugins
from fedslim.task.finetune import parse_trainable


@dataclass(frozen=True)
class DataConfig:
    """Which data, and how it is split between server and clients."""

    dataset: str = field(default="digits", metadata=key(
        "dataset", "Data set: `digits` (embedded, scikit-learn), `digits32` (the same as "
        "3x32x32 images), `synthetic`, `synthetic32`, `motifs` (generated 1-D sequences), "
        "`npz` (your arrays, any shape), `mnist` or `cifar10` (files in `data-dir`), or one a "
        "plug-in registers (see docs/extending.md)."))
    data_dir: str = field(default="", metadata=key(
        "data-dir", "Directory with the data set's files: `train.npz` (+ `test.npz`) for "
        "`npz`, MNIST IDX files, CIFAR-10 binary batches."))
    normalize: Normalize = field(default=Normalize.NONE, metadata=key(
        "normalize", "`none`, or `standardize`: per-feature mean/std computed on the "
        "clients' (training) split, applied to every split."))
    layout: Layout = field(default=Layout.AS_IS, metadata=key(
        "layout", "`as-is`, or `channels-last`: the data set's examples are (..., C) and "
        "are transposed to (C, ...) (npz)."))
    keep_test_split: bool = field(default=True, metadata=key(
        "keep-test-split", "Use a data set's own test split (e.g. `test.npz`) as the "
        "server's test set; `false` pools it with the rest and re-splits."))
    partitioning: str = field(default="dirichlet", metadata=key(
        "partitioning", "How client data is split: `iid`, `dirichlet` (label skew, "
        "`dirichlet-alpha`), `pathological` (`classes-per-client` labels each), or one a "
        "plug-in registers."))
    dirichlet_alpha: float = field(default=0.5, metadata=key(
        "dirichlet-alpha", "Dirichlet concentration; smaller is more skewed.", low=0.0,
        low_open=True))
    classes_per_client: int = field(default=2, metadata=key(
        "classes-per-client", "Labels per client for `pathological` partitioning.", low=1))
    test_fraction: float = field(default=0.2, metadata=key(
        "test-fraction", "Share of the pool held by the server as the test set (reported "
        "only, never used to choose anything).", low=0.0, high=0.9, low_open=True))
    val_fraction: float = field(default=0.1, metadata=key(
        "val-fraction", "Share held by the server as a labelled validation set (early "
        "stopping, model selection).", low=0.0, high=0.9))
    proxy_fraction: float = field(default=0.1, metadata=key(
        "proxy-fraction", "Share held by the server as an unlabelled proxy set "
        "(distillation inputs; labels are dropped).", low=0.0, high=0.9))
    client_eval_fraction: float = field(default=0.1, metadata=key(
        "client-eval-fraction", "Share of each client's partition kept for federated "
        "evaluation.", low=0.0, high=0.5))
    synthetic_samples: int = field(default=4000, metadata=key(
        "synthetic-samples", "Number of samples of the generated data sets (`synthetic`, "
        "`synthetic32`, `motifs`).", low=20))

    def __post_init__(self) -> None:
        validate_fields(self)
        total = self.test_fraction + self.val_fraction + self.proxy_fraction
        if total >= 0.95:
            raise ConfigError(
                f"test-fraction + val-fraction + proxy-fraction = {total:.3f} leaves no data "
                "for clients; it must be < 0.95")
        from fedslim.task.data import PARTITIONERS  # lazy: registries import this module
        from fedslim.task.datasets import DATASETS

        check_registered("dataset", self.dataset, DATASETS, "dataset")
        check_registered("partitioning", self.partitioning, PARTITIONERS, "partitioner")
        if DATASETS[self.dataset].needs_data_dir and not self.data_dir:
            raise ConfigError(f"dataset={self.dataset!r} needs data-dir to point at the "
                              "local files (nothing is downloaded)")


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each client."""

    model: str = field(default="digits_cnn", metadata=key(
        "model", "Global model architecture (see `fedslim.task.models.MODELS`)."))
    local_epochs: int = field(default=2, metadata=key(
        "local-epochs", "Local epochs per round.", low=1))
    batch_size: int = field(default=16, metadata=key(
        "batch-size", "Local mini-batch size.", low=1))
    optimizer: Optimizer = field(default=Optimizer.SGD, metadata=key(
        "optimizer", "Local optimizer: `sgd` (with momentum) or `adam`."))
    learning_rate: float = field(default=0.05, metadata=key(
        "learning-rate", "Local learning rate in round 1.", low=0.0, low_open=True))
    momentum: float = field(default=0.9, metadata=key(
        "momentum", "SGD momentum.", low=0.0, high=0.999))
    weight_decay: float = field(default=0.0, metadata=key(
        "weight-decay", "L2 weight decay.", low=0.0))
    clip_norm: float = field(default=0.0, metadata=key(
        "clip-norm", "Gradient-norm clipping threshold; 0 disables.", low=0.0))
    lr_decay: float = field(default=1.0, metadata=key(
        "lr-decay", "Learning rate is multiplied by this factor every round "
        "(lr_r = learning-rate * lr-decay^(r-1)).", low=0.0, high=1.0, low_open=True))
    trainable: str = field(default="all", metadata=key(
        "trainable", "What clients train (fine-tuning, e.g. from `init-from`): `all`, "
        "`head` (the last layer), `schedule:N` (layer-wise unfreezing from the top, one "
        "more layer every N rounds) or `lora:R` (each weight as W0 + B A with rank-R "
        "factors, merged after local training). Frozen weights' updates are zero: a "
        "compressing uplink sends only their headers."))
    sparse_training: bool = field(default=False, metadata=key(
        "sparse-training", "Weights (float, ndim >= 2) that are exactly zero in the global "
        "model stay zero: clients mask their gradients, the server the aggregate -- "
        "recovery rounds for a pruned model (`init-from`); zeros never cost bytes in a "
        "sparse uplink."))
    augment: Augment = field(default=Augment.NONE, metadata=key(
        "augment", "Input augmentation during local training: `none`, `noise`, `shift`, "
        "`noise+shift`."))
    device: DevicePref = field(default=DevicePref.AUTO, metadata=key(
        "device", "`auto` picks cuda when available, else cpu; or force `cpu` / `cuda`."))

    def __post_init__(self) -> None:
        validate_fields(self)
        from fedslim.task.models import MODELS  # lazy: keep `import fedslim.config` light

        check_registered("model", self.model, MODELS, "model")
        if parse_trainable(self.trainable).kind == "lora" and self.sparse_training:
            raise ConfigError("run-config keys 'trainable' and 'sparse-training': lora's "
                              "merged factors would fill the pruned weights; use one of them")


@dataclass(frozen=True)
class FederationConfig:
    """The federated loop on the server."""

    strategy: str = field(default="fedslim", metadata=key(
        "strategy", "Aggregation strategy, wrapped in fedslim's compression layer: "
        "`fedslim` (FedAvg with seeded sampling, float64 averaging and `server-opt`), or "
        "Flower's own `fedavg`, `fedavgm`, `fedadam`, `fedprox`, `fedtrimmedavg`, `krum`, "
        "`multikrum`, `fedmedian` (see `fedslim.strategies.registry`)."))
    num_server_rounds: int = field(default=20, metadata=key(
        "num-server-rounds", "Number of federated rounds.", low=1))
    fraction_train: float = field(default=1.0, metadata=key(
        "fraction-train", "Fraction of nodes sampled for training each round.", low=0.0,
        high=1.0, low_open=True))
    fraction_evaluate: float = field(default=1.0, metadata=key(
        "fraction-evaluate", "Fraction of nodes sampled for federated evaluation; 0 "
        "disables it.", low=0.0, high=1.0))
    init_from: str = field(default="", metadata=key(
        "init-from", "A safetensors file whose weights start the federation instead of the "
        "seeded initial model: a run's model.safetensors or a file from `fedslim export` "
        "(pruned / int8 files are decoded); its names and shapes must match `model`."))
    early_stop_patience: int = field(default=0, metadata=key(
        "early-stop-patience", "Stop the federation after this many rounds without a gain "
        "in the server's validation accuracy above `early-stop-min-delta` (0: never); the "
        "best round's model is kept in output-dir/best-model.safetensors.", low=0))
    early_stop_min_delta: float = field(default=0.0, metadata=key(
        "early-stop-min-delta", "The validation-accuracy gain (a fraction, e.g. 0.002) that "
        "counts as an improvement for `early-stop-patience`.", low=0.0, high=1.0))
    min_train_nodes: int = field(default=2, metadata=key(
        "min-train-nodes", "Minimum replies a round needs to update the model.", low=1))
    min_available_nodes: int = field(default=2, metadata=key(
        "min-available-nodes", "Nodes that must be connected before round 1.", low=1))
    round_timeout: float = field(default=3600.0, metadata=key(
        "round-timeout", "Seconds to wait for replies in a round.", low=0.0, low_open=True))
    node_timeout: float = field(default=300.0, metadata=key(
        "node-timeout", "Seconds to wait for `min-available-nodes` connected nodes before "
        "a round; the run ends with an error after that.", low=0.0, low_open=True))
    seed: int = field(default=42, metadata=key(
        "seed", "Seed for splits, partitions, initial model, client shuffling.", low=0))
    output_dir: str = field(default="outputs/fedslim/{run}", metadata=key(
        "output-dir", "Where results.json, the model and checkpoints go (relative paths "
        "are resolved against the server process' working directory). `{run}` is replaced "
        "by a fresh name per run (`fedslim simulate` and `fedslim.deploy`: the start time, "
        "e.g. 20261203-154501; `flwr run`: run-<run id>); with `resume=true`, by the newest "
        "run there that has a checkpoint. A directory holding an earlier run's results is "
        "refused unless `resume` or `overwrite` is true."))
    resume: bool = field(default=False, metadata=key(
        "resume", "Continue from the last complete checkpoint in output-dir."))
    overwrite: bool = field(default=False, metadata=key(
        "overwrite", "Start afresh in an output-dir that holds an earlier run's results, "
        "replacing them (without it such a directory is refused before anything starts)."))
    plugins: str = field(default="", metadata=key(
        "plugins", "Comma-separated modules to import first in every process (CLI, "
        "ServerApp, each ClientApp): they register your models, data sets, partitioners "
        "and strategies. Installed packages can use the `fedslim.plugins` entry point "
        "instead."))
    progress: bool = field(default=True, metadata=key(
        "progress", "Print one progress line per round and a summary at the end."))
    verbose: bool = field(default=False, metadata=key(
        "verbose", "Show Flower's and Ray's log lines on the console (otherwise they go "
        "to `output-dir`/flower.log)."))
    proximal_mu: float = field(default=0.01, metadata=key(
        "proximal-mu", "FedProx proximal term weight (`strategy=fedprox`; the client adds "
        "mu/2 * ||w - w_global||^2 to its loss when the server sends `proximal-mu`).",
        low=0.0))
    trimmed_beta: float = field(default=0.2, metadata=key(
        "trimmed-beta", "Fraction trimmed from each end (`strategy=fedtrimmedavg`).",
        low=0.0, high=0.49))
    malicious_nodes: int = field(default=0, metadata=key(
        "malicious-nodes", "Number of malicious nodes Krum assumes (`strategy=krum` / "
        "`multikrum`; multikrum averages the round's replies minus this many).",
        low=0))

    def __post_init__(self) -> None:
        validate_fields(self)
        from fedslim.strategies.registry import STRATEGIES  # no Flower import at module level

        check_registered("strategy", self.strategy, STRATEGIES, "strategy")


@dataclass(frozen=True)
class DistillConfig:
    """Server-side ensemble distillation into a compact student (FedDF-style)."""

    distill: bool = field(default=False, metadata=key(
        "distill", "Distil a compact student on the server's unlabelled proxy set."))
    student_model: str = field(default="digits_student", metadata=key(
        "student-model", "Student architecture (<= 25% of the global model's params)."))
    teacher: Teacher = field(default=Teacher.ENSEMBLE, metadata=key(
        "distill-teacher", "Teacher: `ensemble` of client models, `global` model, `both`."))
    every: int = field(default=1, metadata=key(
        "distill-every", "Distil every k rounds (and always in the last round).", low=1))
    temperature: float = field(default=3.0, metadata=key(
        "distill-temperature", "Softmax temperature for the KL loss.", low=0.0,
        low_open=True))
    steps: int = field(default=200, metadata=key(
        "distill-steps", "Maximum optimizer steps per distillation.", low=1))
    lr: float = field(default=1e-3, metadata=key(
        "distill-lr", "Adam learning rate of the student.", low=0.0, low_open=True))
    batch_size: int = field(default=64, metadata=key(
        "distill-batch-size", "Proxy mini-batch size.", low=1))
    patience: int = field(default=5, metadata=key(
        "distill-patience", "Early stopping: evaluations on the val split without a "
        "lower val cross-entropy (one evaluation every `distill-eval-every` steps).", low=1))
    eval_every: int = field(default=20, metadata=key(
        "distill-eval-every", "Steps between validation checks.", low=1))
    augment: Augment = field(default=Augment.NOISE_SHIFT, metadata=key(
        "distill-augment", "Augmentation of proxy inputs (teacher sees the same inputs)."))
    max_teachers: int = field(default=10, metadata=key(
        "distill-max-teachers", "The `ensemble` teacher uses at most this many of the "
        "round's client models (a seeded sample when more replied): the server holds this "
        "many models, however many clients answer.", low=1))

    def __post_init__(self) -> None:
        validate_fields(self)
        from fedslim.task.models import MODELS

        check_registered("student-model", self.student_model, MODELS, "model")


@dataclass(frozen=True)
class RunConfig:
    """The whole run configuration: one section per concern."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FederationConfig = field(default_factory=FederationConfig)
    comp: CompressionConfig = field(default_factory=CompressionConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # ``client.<name>`` keys: forwarded to every ClientApp in the train / evaluate
    # ConfigRecord as ``<name>`` (e.g. ``-c client.lr=0.01`` -> ``config["lr"]``).
    client: Mapping[str, bool | int | float | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.comp.defence_trust_ratio > 0 and self.data.val_fraction <= 0:
            raise ConfigError(
                f"defence-trust-ratio={self.comp.defence_trust_ratio:g} trains the server's "
                "reference update on the validation split, but val-fraction=0; set "
                "val-fraction > 0 or defence-trust-ratio=0")
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
                out[f.metadata["key"]] = flat(value)
        out.update({CLIENT_PREFIX + k: v for k, v in sorted(self.client.items())})
        return out


SECTION_TYPES: dict[str, type] = {
    "data": DataConfig, "train": TrainConfig, "fed": FederationConfig,
    "comp": CompressionConfig, "distill": DistillConfig}


def _sections(cfg: RunConfig) -> list[Any]:
    return [getattr(cfg, name) for name in SECTION_TYPES]


@functools.cache
def _key_rows() -> tuple[tuple[str, str, Any, str], ...]:
    rows = []
    for cls in SECTION_TYPES.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            typ = hints[f.name]
            default = flat(f.default)
            if isinstance(typ, type) and issubclass(typ, enum.Enum):
                tname = "one of " + ", ".join(f"`{m.value}`" for m in typ)
            elif typ is PipelineSpec:
                tname = "pipeline spec"
            elif typ in (PipelineSpec | AutoSpec, PipelineSpec | AutoSpec | None):
                tname = "`auto` or pipeline spec"
            elif typ == float | None:
                tname = "`auto` or float"
            else:
                tname = typ.__name__
            rows.append((f.metadata["key"], tname, default, f.metadata["help"]))
    return tuple(rows)


def key_table() -> list[tuple[str, str, Any, str]]:
    """(key, type name, default, help) for every key, in declaration order."""
    return list(_key_rows())  # the sections are fixed: built once per process


def known_keys() -> list[str]:
    return [row[0] for row in _key_rows()]


def unknown_keys_message(unknown: list[str], known: list[str]) -> str:
    """One line: each unknown key with its closest known keys (``did you mean``) -- never
    the whole list of ~70 keys -- and where that list is."""
    parts = []
    for name in unknown:
        close = did_you_mean(name, known)
        parts.append(f"unknown run-config key {name!r}"
                     + (f" (did you mean {close}?)" if close else ""))
    return ("; ".join(parts) + f"; every key: `fedslim config` or docs/configuration.md "
            f"({CLIENT_PREFIX}<name> forwards a setting to the clients)")


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
    client = parse_client_keys({k: merged.pop(k) for k in list(merged)
                                if k.startswith(CLIENT_PREFIX)})
    known = set(known_keys())
    unknown = sorted(k for k in merged if k not in known)
    if unknown:
        raise ConfigError(unknown_keys_message(unknown, sorted(known)))
    # Plug-ins register names (models, data sets, ...) that the sections check below.
    load_plugins(str(merged.get("plugins", "")))
    sections: dict[str, Any] = {}
    for name, cls in SECTION_TYPES.items():
        kwargs = {f.name: merged[f.metadata["key"]] for f in dataclasses.fields(cls)
                  if f.metadata["key"] in merged}
        sections[name] = cls(**kwargs)  # each section validates its own fields
    return RunConfig(**sections, client=client)


__all__ = ["CLIENT_PREFIX", "SECTION_TYPES", "Augment", "CompressionConfig", "DataConfig",
           "DevicePref", "DistillConfig", "FederationConfig", "Layout", "Normalize",
           "Optimizer", "RunConfig", "ServerOpt", "Teacher", "TrainConfig", "key_table",
           "known_keys", "parse_cli_overrides", "parse_client_keys", "parse_run_config",
           "typed_value"]
