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

from fedslim.compression.auto import DOWNLINK_AUTO, UPLINK_AUTO, AutoSpec, compresses
from fedslim.compression.grammar import parse_spec
from fedslim.compression.spec import PipelineSpec
from fedslim.config_enums import (
    Augment,
    DevicePref,
    ErrorFeedbackMode,
    Layout,
    Normalize,
    Optimizer,
    ServerOpt,
    Teacher,
)
from fedslim.config_fields import (
    CLIENT_PREFIX,
    check_registered,
    flat,
    key,
    parse_cli_overrides,
    parse_client_keys,
    typed_value,
    validate_fields,
)
from fedslim.errors import ConfigError
from fedslim.plugins import load_plugins


@dataclass(frozen=True)
class DataConfig:
    """Which data, and how it is split between server and clients."""

    dataset: str = field(default="digits", metadata=key(
        "dataset", "Data set: `digits` (embedded, scikit-learn), `synthetic`, `npz` (your "
        "arrays, any shape), `mnist` or `cifar10` (files in `data-dir`), or one a plug-in "
        "registers (see docs/extending.md)."))
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
        "synthetic-samples", "Number of samples for the `synthetic` data set.", low=20))

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
    augment: Augment = field(default=Augment.NONE, metadata=key(
        "augment", "Input augmentation during local training: `none`, `noise`, `shift`, "
        "`noise+shift`."))
    device: DevicePref = field(default=DevicePref.AUTO, metadata=key(
        "device", "`auto` picks cuda when available, else cpu; or force `cpu` / `cuda`."))

    def __post_init__(self) -> None:
        validate_fields(self)
        from fedslim.task.models import MODELS  # lazy: keep `import fedslim.config` light

        check_registered("model", self.model, MODELS, "model")


@dataclass(frozen=True)
class FederationConfig:
    """The federated loop on the server."""

    strategy: str = field(default="fedslim", metadata=key(
        "strategy", "Aggregation strategy, wrapped in fedslim's compression layer: "
        "`fedslim` (FedAvg with seeded sampling, float64 averaging and `server-opt`), or "
        "Flower's own `fedavg`, `fedavgm`, `fedadam`, `fedprox`, `fedtrimmedavg`, `krum`, "
        "`fedmedian` (see `fedslim.strategies.registry`)."))
    num_server_rounds: int = field(default=20, metadata=key(
        "num-server-rounds", "Number of federated rounds.", low=1))
    fraction_train: float = field(default=1.0, metadata=key(
        "fraction-train", "Fraction of nodes sampled for training each round.", low=0.0,
        high=1.0, low_open=True))
    fraction_evaluate: float = field(default=1.0, metadata=key(
        "fraction-evaluate", "Fraction of nodes sampled for federated evaluation; 0 "
        "disables it.", low=0.0, high=1.0))
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
    output_dir: str = field(default="outputs/fedslim", metadata=key(
        "output-dir", "Where results.json, the model and checkpoints go (relative paths "
        "are resolved against the server process' working directory)."))
    resume: bool = field(default=False, metadata=key(
        "resume", "Continue from the last complete checkpoint in output-dir."))
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
        "malicious-nodes", "Number of malicious nodes Krum assumes (`strategy=krum`).",
        low=0))

    def __post_init__(self) -> None:
        validate_fields(self)
        from fedslim.strategies.registry import STRATEGIES  # no Flower import at module level

        check_registered("strategy", self.strategy, STRATEGIES, "strategy")


KEYFRAME_SPEC = parse_spec("q:8|ans")
ADAM_SERVER_LR = 0.1  # Flower's FedAdam default eta


@dataclass(frozen=True)
class CompressionConfig:
    """Update compression on the wire and the server-side optimizer."""

    uplink: PipelineSpec | AutoSpec = field(default=UPLINK_AUTO, metadata=key(
        "uplink", "Client-to-server pipeline: `auto` (= `" + str(UPLINK_AUTO.spec) + "`: "
        "each tensor keeps the fewest values holding " + f"{UPLINK_AUTO.energy:.0%}" + " of "
        "its update's energy, so the bytes follow the model; `auto:energy=0.6,bits=4` "
        "changes the level; see docs/compression.md), `none` (plain float32 arrays, exactly "
        "as stock Flower), or a fixed spec (e.g. `topk:0.01|q:4`, "
        "`budget:x250|q:4|ans|pass:0`, `lowrank:4|q:8`)."))
    downlink: PipelineSpec | AutoSpec | None = field(default=None, metadata=key(
        "downlink", "Server-to-client pipeline for the global model's steps: `auto` (`none` "
        "when `uplink` is `none`, else the pipeline of `uplink=auto`), `none` (the full "
        "float32 model every round), or a spec. The server decodes its own payload, so "
        "clients and server hold bit-identical weights with any pipeline."))
    stream_aggregation: bool = field(default=True, metadata=key(
        "stream-aggregation", "The server validates each reply, keeps it as sent and folds "
        "its decoded update into a running sum one at a time (memory O(model), not O(clients "
        "x model)); with fedslim's own strategy only (stock strategies need every reply at "
        "once). false decodes all replies up front, as before."))
    bind_replies: bool = field(default=True, metadata=key(
        "bind-replies", "Every reply must carry the header binding it to the round and "
        "version it answers (replay protection, CRC of the node's copy), also with uplink "
        "and downlink `none`; false lets ClientApps without compression_mod take part."))
    shared_init: bool = field(default=True, metadata=key(
        "shared-init", "With a compressing `downlink`, nodes build the seeded round-0 model "
        "themselves (checked by CRC) instead of downloading it. fedslim's ClientApp can; "
        "set false for a ClientApp whose compression_mod has no `initial_state`."))
    keyframe_every: int = field(default=0, metadata=key(
        "keyframe-every", "Every this many versions, the global model the downlink sends is "
        "a keyframe: its drift from the round-0 model through the `keyframe` pipeline, which "
        "nodes too far behind for a catch-up chain get instead of the full float32 model. "
        "For low participation (measured: at fraction-train 0.01 total traffic 2.0x -> "
        "10.5x below FedAvg with 16; at 0.1 about neutral): no chain crosses a keyframe, so "
        "every node older than the newest one downloads it, not a short chain. "
        "Needs a compressing `downlink` and `shared-init`. 0: none.", low=0, high=32))
    keyframe: PipelineSpec = field(default=KEYFRAME_SPEC, metadata=key(
        "keyframe", "Pipeline for keyframes (see `keyframe-every`); what it rounds off joins "
        "the downlink's residual and is sent in the following steps."))
    error_feedback: ErrorFeedbackMode = field(default=ErrorFeedbackMode.AUTO, metadata=key(
        "error-feedback", "Clients add what compression dropped to their next update: "
        "`true`, `false`, or `auto` = true when fraction-train >= 0.1, false below (measured "
        "to help at 100% and 10% per round, no better at 1%, where it still costs a "
        "model-sized residual per client)."))
    spill_client_state: bool = field(default=True, metadata=key(
        "spill-client-state", "fedslim's ClientApp keeps its copy of the global model and "
        "its residual in files under output-dir/client-state instead of Flower's node "
        "context (which the simulation engine holds in the server process for every node: "
        "two models per node)."))
    ef_reset_after: int = field(default=0, metadata=key(
        "ef-reset-after", "A client that last trained more than this many rounds ago drops "
        "its error-feedback residual instead of adding it (0: never).", low=0, high=63))
    warmup_rounds: int = field(default=0, metadata=key(
        "warmup-rounds", "DGC-style sparsity warm-up: top-k density decays exponentially "
        "from 25% to the target over this many rounds.", low=0))
    server_opt: ServerOpt = field(default=ServerOpt.AVG, metadata=key(
        "server-opt", "How the averaged update is applied: `avg`, `avgm` (momentum) or "
        "`adam`."))
    server_lr: float | None = field(default=None, metadata=key(
        "server-lr", "Server learning rate applied to the averaged update: `auto` = 1.0 for "
        "`avg` / `avgm` and FedAvgM, 0.1 for Adam (`server-opt=adam`, `strategy=fedadam`: "
        "Flower's FedAdam default; 1.0 drives the digits CNN to chance), or a number.",
        low=0.0, low_open=True))
    server_momentum: float = field(default=0.9, metadata=key(
        "server-momentum", "Momentum for `avgm`; beta1 for `adam`.", low=0.0, high=0.999))
    defence_clip_ratio: float = field(default=3.0, metadata=key(
        "defence-clip-ratio", "Server defence: an update whose L2 norm exceeds this many "
        "times the round's median update norm is scaled down to it (needs 3+ replies); 0 "
        "disables.", low=0.0))
    defence_reject_ratio: float = field(default=10.0, metadata=key(
        "defence-reject-ratio", "Server defence: a reply whose update L2 norm, or whose "
        "num-examples, exceeds this many times the round's median is rejected as hostile "
        "(needs 3+ replies); 0 disables.", low=0.0))
    defence_max_norm: float = field(default=0.0, metadata=key(
        "defence-max-norm", "Server defence: a fixed bound on every update's L2 norm "
        "(combined with the ratio: the smaller wins); 0 = none.", low=0.0))
    defence_weight_ratio: float = field(default=2.0, metadata=key(
        "defence-weight-ratio", "Server defence: a reply's num-examples above this many "
        "times the round's median is lowered to it; 0 disables.", low=0.0))

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.keyframe_every and (not compresses(self.downlink_spec) or not self.shared_init):
            raise ConfigError(
                f"keyframe-every={self.keyframe_every} needs a compressing downlink and "
                f"shared-init=true (downlink={self.downlink_spec}, shared-init="
                f"{str(self.shared_init).lower()})")
        if self.warmup_rounds and not isinstance(self.uplink, PipelineSpec):
            raise ConfigError(f"warmup-rounds={self.warmup_rounds} decays a topk fraction; "
                              f"uplink={self.uplink} sets its own level (use warmup-rounds=0)")

    def server_lr_for(self, adam: bool) -> float:
        """``server-lr`` with ``auto`` resolved: 0.1 for an Adam server step, else 1.0."""
        if self.server_lr is not None:
            return self.server_lr
        return ADAM_SERVER_LR if adam else 1.0

    @property
    def downlink_spec(self) -> PipelineSpec | AutoSpec:
        """``downlink`` with ``auto`` resolved against ``uplink``."""
        if self.downlink is not None:
            return self.downlink
        return DOWNLINK_AUTO if compresses(self.uplink) else PipelineSpec()


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
        raise ConfigError(f"unknown run-config key(s) {unknown}; known keys: {sorted(known)} "
                          f"(and {CLIENT_PREFIX}<name> for settings forwarded to clients)")
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
