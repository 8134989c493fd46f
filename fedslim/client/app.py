"""fedslim's ClientApp: a plain Flower app (weights in, weights out) plus ``compression_mod``.

The train and evaluate handlers are written exactly as in Flower's PyTorch quickstart:
they read the global model from ``msg.content["arrays"]`` and the server's settings from
``msg.content["config"]``, and reply with an ``ArrayRecord`` of weights and a
``MetricRecord`` with ``num-examples``. Compression is not their business: the
:func:`~fedslim.client.mod.compression_mod` around them decodes the downlink and encodes
the update. The model and the data come from the run config.

``app`` is what ``pyproject.toml`` points Flower at; ``make_client_app(overrides)`` builds
the same app with run-config overrides baked in (used by ``fedslim simulate``, because
Flower's in-process simulation passes an empty ``run_config``).
"""

from __future__ import annotations

import resource
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedslim.client.held import Pinned
from fedslim.client.mod import make_compression_mod
from fedslim.compression.auto import resolve
from fedslim.config import RunConfig, parse_run_config
from fedslim.errors import UpdateRejected
from fedslim.flower_io import to_state
from fedslim.outdir import expand
from fedslim.protocol import (
    ARRAYS,
    CONFIG,
    HELLO,
    METRICS,
    NUM_PARTITIONS,
    PARTITION_ID,
    SERVER_ROUND,
    MetricValue,
    answer_hello,
)
from fedslim.task.data import client_data, load_splits
from fedslim.task.finetune import parse_trainable, training_scope
from fedslim.task.models import build_model, seeded_model
from fedslim.task.prune import mask_gradients, zero_masks
from fedslim.task.train import evaluate, select_device, train_local


def _node(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config[PARTITION_ID]), int(context.node_config[NUM_PARTITIONS])
    except KeyError as exc:
        raise UpdateRejected(f"node_config lacks {exc.args[0]!r}; start the SuperNode with "
                             "--node-config 'partition-id=<i> num-partitions=<n>'") from None


class ClientRuntime:
    """What one ClientApp call needs: config, this node's data and a model."""

    def __init__(self, cfg: RunConfig, context: Context) -> None:
        self.cfg = cfg
        self.partition_id, self.num_partitions = _node(context)
        splits = load_splits(cfg.data, cfg.fed.seed)
        self.train_data, self.eval_data = client_data(
            cfg.data, cfg.fed.seed, self.partition_id, self.num_partitions)
        self.device = select_device(cfg.train.device)
        self.model = build_model(cfg.train.model, splits.input_shape, splits.num_classes)

    def load_global(self, msg: Message) -> dict[str, torch.Tensor]:
        """Load the message's global weights into the model (names and shapes checked)."""
        if ARRAYS not in msg.content.array_records:
            raise UpdateRejected(f"message carries no {ARRAYS!r} record")
        state = to_state(msg.content.array_records[ARRAYS])
        expected = self.model.state_dict()
        if state.keys() != expected.keys():
            missing = sorted(expected.keys() - state.keys())
            extra = sorted(state.keys() - expected.keys())
            raise UpdateRejected(f"the server's model differs from model={self.cfg.train.model!r}"
                                 f" (missing {missing[:5]}, unexpected {extra[:5]}); client "
                                 "and server must use the same model definition")
        for k, v in state.items():
            if v.shape != expected[k].shape:
                raise UpdateRejected(f"global tensor {k!r} has shape {tuple(v.shape)}, "
                                     f"model={self.cfg.train.model!r} expects "
                                     f"{tuple(expected[k].shape)}")
        self.model.load_state_dict(state)
        return state


def _config(msg: Message) -> ConfigRecord:
    return msg.content.config_records.get(CONFIG, ConfigRecord())


def _number(conf: ConfigRecord, key: str, default: float) -> float:
    value = conf.get(key, default)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else default


def make_client_app(overrides: Mapping[str, Any] | None = None,
                    mods: list[Mod] | None = None,
                    inner_mods: list[Mod] | None = None) -> ClientApp:
    """Build the ClientApp; ``overrides`` win over ``context.run_config``.

    ``mods`` are extra Flower client mods placed outside ``compression_mod`` (they see
    encoded replies); ``inner_mods`` go inside it (they see plain weights).
    """
    def initial_state(context: Context) -> dict[str, torch.Tensor]:
        cfg = parse_run_config(context.run_config, overrides)
        splits = load_splits(cfg.data, cfg.fed.seed)
        model = seeded_model(cfg.train.model, cfg.fed.seed, splits.input_shape,
                             splits.num_classes)
        return model.state_dict()

    def state_dir(context: Context) -> Path | None:
        cfg = parse_run_config(context.run_config, overrides)
        out = expand(cfg.fed.output_dir, name=f"run-{context.run_id}")
        return Path(out).expanduser() / "client-state"

    def spill(context: Context) -> bool:
        return parse_run_config(context.run_config, overrides).comp.spill_client_state

    def downlink(context: Context) -> Pinned:
        comp = parse_run_config(context.run_config, overrides).comp
        return Pinned(delta=resolve(comp.downlink_spec), keyframe=comp.keyframe)

    client_app = ClientApp(mods=[*(mods or []),
                                 make_compression_mod(initial_state, state_dir,
                                                      spill=spill, downlink=downlink),
                                 *(inner_mods or [])])

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        rt = ClientRuntime(parse_run_config(context.run_config, overrides), context)
        held = rt.load_global(msg)
        conf = _config(msg)
        hooks = mask_gradients(rt.model, zero_masks(held)) if rt.cfg.train.sparse_training \
            else []
        server_round = int(_number(conf, SERVER_ROUND, 1))
        seed_parts = (rt.cfg.fed.seed, rt.partition_id)
        try:
            with training_scope(rt.model, parse_trainable(rt.cfg.train.trainable),
                                server_round, seed_parts):
                stats = train_local(rt.model, rt.train_data, rt.cfg.train,
                                    server_round=server_round, seed_parts=seed_parts,
                                    device=rt.device,
                                    proximal_mu=_number(conf, "proximal-mu", 0.0))
        finally:
            for hook in hooks:
                hook.remove()
        metrics: dict[str, MetricValue] = {
            "num-examples": stats.num_examples, "train-loss": stats.loss,
            "train-seconds": stats.seconds, "train-steps": stats.steps,
            PARTITION_ID: rt.partition_id}
        local = {k: v.detach().cpu() for k, v in rt.model.state_dict().items()}
        content = RecordDict({ARRAYS: ArrayRecord(local), METRICS: MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @client_app.query(HELLO)
    def hello(msg: Message, context: Context) -> Message:
        """The server asks each node once for its partition id (stable sampling order)."""
        return answer_hello(msg, context.node_config.get(PARTITION_ID))

    @client_app.evaluate()
    def evaluate_handler(msg: Message, context: Context) -> Message:
        rt = ClientRuntime(parse_run_config(context.run_config, overrides), context)
        rt.load_global(msg)
        ev = evaluate(rt.model, rt.eval_data, rt.device)
        n = ev.num_examples
        metrics: dict[str, MetricValue] = {
            "num-examples": n, "eval-loss": ev.loss if n else 0.0,
            "eval-accuracy": ev.accuracy if n else 0.0, PARTITION_ID: rt.partition_id,
            # this ClientApp process's peak memory (evaluate replies only: they are not
            # part of the uplink ratio, and one per round is enough)
            "peak-rss-mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        return Message(content=RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    return client_app


app = make_client_app()
