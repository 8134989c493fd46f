"""The fedslim ClientApp (Flower Message API).

``app`` is what ``pyproject.toml`` points Flower at; ``make_client_app(overrides)`` builds
the same app with run-config overrides baked in (used by ``fedslim simulate``, because
Flower's in-process simulation passes an empty ``run_config``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedslim.config import RunConfig, parse_run_config
from fedslim.errors import UpdateRejected
from fedslim.task.data import ArrayData, Splits, client_data, load_splits
from fedslim.task.models import build_model
from fedslim.task.train import evaluate, select_device, train_local

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"


def _node(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise UpdateRejected(f"node_config lacks {exc.args[0]!r}; start the SuperNode with "
                             "--node-config 'partition-id=<i> num-partitions=<n>'") from None


def _load_global(model: torch.nn.Module, msg: Message) -> None:
    """Load the broadcast global weights into ``model``, checking names and shapes."""
    record = msg.content.array_records.get(ARRAYS_KEY)
    if record is None:
        raise UpdateRejected(f"message has no ArrayRecord {ARRAYS_KEY!r}")
    state = record.to_torch_state_dict()
    expected = model.state_dict()
    if set(state) != set(expected):
        raise UpdateRejected(f"global arrays {sorted(state)} do not match the model's "
                             f"{sorted(expected)}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise UpdateRejected(f"global array {k!r} has shape {tuple(v.shape)}, model "
                                 f"expects {tuple(expected[k].shape)}")
    model.load_state_dict(state)


class ClientRuntime:
    """What one ClientApp call needs: config, this node's data and a model."""

    def __init__(self, cfg: RunConfig, context: Context) -> None:
        self.cfg = cfg
        self.partition_id, self.num_partitions = _node(context)
        self.splits: Splits = load_splits(cfg.data, cfg.fed.seed)
        self.train_data, self.eval_data = client_data(
            cfg.data, cfg.fed.seed, self.partition_id, self.num_partitions)
        self.device = select_device(cfg.train.device)
        self.model = build_model(cfg.train.model, self.splits.input_shape[0],
                                 self.splits.num_classes)

    def eval_on(self, data: ArrayData) -> dict[str, float]:
        ev = evaluate(self.model, data, self.device)
        n = ev.num_examples
        return {"num-examples": n, "eval-loss": ev.loss if n else 0.0,
                "eval-accuracy": ev.accuracy if n else 0.0,
                "partition-id": self.partition_id}


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """Build the ClientApp; ``overrides`` win over ``context.run_config``."""
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        rt = ClientRuntime(parse_run_config(context.run_config, overrides), context)
        _load_global(rt.model, msg)
        server_round = int(msg.content[CONFIG_KEY]["server-round"])
        stats = train_local(rt.model, rt.train_data, rt.cfg.train, server_round=server_round,
                            seed_parts=(rt.cfg.fed.seed, rt.partition_id), device=rt.device)
        metrics = MetricRecord({
            "num-examples": stats.num_examples,
            "train-loss": stats.loss,
            "train-seconds": stats.seconds,
            "train-steps": stats.steps,
            "partition-id": rt.partition_id,
        })
        state = {k: v.detach().cpu() for k, v in rt.model.state_dict().items()}
        content = RecordDict({ARRAYS_KEY: ArrayRecord(state), METRICS_KEY: metrics})
        return Message(content=content, reply_to=msg)

    @client_app.evaluate()
    def evaluate_handler(msg: Message, context: Context) -> Message:
        rt = ClientRuntime(parse_run_config(context.run_config, overrides), context)
        _load_global(rt.model, msg)
        content = RecordDict({METRICS_KEY: MetricRecord(rt.eval_on(rt.eval_data))})
        return Message(content=content, reply_to=msg)

    return client_app


app = make_client_app()
