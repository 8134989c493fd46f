"""The fedslim ClientApp (Flower Message API).

Train: take the global model (full float32 arrays, or a compressed delta applied to the
copy kept in ``context.state``), train locally, reply with either the plain float32 weights
(``uplink=none``, exactly stock Flower) or the encoded update ``local - global`` plus the
error-feedback residual (kept in ``context.state`` between the rounds this node joins).

``app`` is what ``pyproject.toml`` points Flower at; ``make_client_app(overrides)`` builds
the same app with run-config overrides baked in (used by ``fedslim simulate``, because
Flower's in-process simulation passes an empty ``run_config``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedslim.compression import ErrorFeedback, decode_update, encode_update, parse_spec
from fedslim.config import RunConfig, parse_run_config
from fedslim.errors import UpdateRejected
from fedslim.flower_io import (
    ARRAYS_KEY,
    CONFIG_KEY,
    DELTA_KEY,
    METRICS_KEY,
    PAYLOAD_KEY,
    apply_delta,
    payload_from_record,
    payload_record,
    state_crc,
)
from fedslim.task.data import client_data, load_splits
from fedslim.task.models import build_model
from fedslim.task.train import evaluate, make_generator, select_device, train_local

STATE_GLOBAL = "fedslim.global"    # ArrayRecord: the last global model this node holds
STATE_META = "fedslim.meta"        # ConfigRecord: {"version": int}
STATE_EF = "fedslim.ef"            # ArrayRecord: error-feedback residuals


def _node(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise UpdateRejected(f"node_config lacks {exc.args[0]!r}; start the SuperNode with "
                             "--node-config 'partition-id=<i> num-partitions=<n>'") from None


def _check_names_shapes(state: Mapping[str, torch.Tensor], model: torch.nn.Module,
                        what: str) -> None:
    expected = model.state_dict()
    if set(state) != set(expected):
        raise UpdateRejected(f"{what} {sorted(state)[:5]}... do not match the model's "
                             f"{sorted(expected)[:5]}...")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise UpdateRejected(f"{what}: {k!r} has shape {tuple(v.shape)}, model expects "
                                 f"{tuple(expected[k].shape)}")


def receive_global(msg: Message, context: Context, model: torch.nn.Module,
                   cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The global weights this message carries, loaded into ``model`` (and remembered)."""
    content = msg.content
    conf = content.config_records.get(CONFIG_KEY, ConfigRecord())
    if ARRAYS_KEY in content.array_records:
        state = content.array_records[ARRAYS_KEY].to_torch_state_dict()
    elif "base-version" in conf:
        # Delta from the version this node holds, or (no delta) "you hold it already".
        base = int(conf["base-version"])  # type: ignore[arg-type]
        meta = context.state.config_records.get(STATE_META)
        have = int(meta["version"]) if meta else None  # type: ignore[arg-type]
        if have != base or STATE_GLOBAL not in context.state.array_records:
            raise UpdateRejected(f"message builds on global version {base} but this node "
                                 f"holds {have}; the server must send the full model")
        state = context.state.array_records[STATE_GLOBAL].to_torch_state_dict()
        if DELTA_KEY in content.array_records:
            payload = payload_from_record(content.array_records[DELTA_KEY], "downlink")
            delta = decode_update(payload, max_elements=cfg.comp.max_update_elements).tensors
            state = apply_delta(state, delta)
    else:
        raise UpdateRejected(f"message carries neither {ARRAYS_KEY!r} nor a base version")
    _check_names_shapes(state, model, "global arrays")
    if "global-version" in conf and cfg.comp.downlink != "none":
        context.state[STATE_GLOBAL] = ArrayRecord(state)
        context.state[STATE_META] = ConfigRecord({"version": int(conf["global-version"])})  # type: ignore[arg-type]
    model.load_state_dict(state)
    return state


def encode_reply(update: dict[str, torch.Tensor], context: Context, cfg: RunConfig,
                 server_round: int, seed_parts: tuple[int, ...]
                 ) -> tuple[ArrayRecord, dict[str, float]]:
    """Encode ``update`` with the uplink pipeline (plus error feedback); return the record."""
    spec = parse_spec(cfg.comp.uplink).at_round(server_round, cfg.comp.warmup_rounds)
    t0 = time.perf_counter()
    ef = None
    if cfg.comp.error_feedback:
        prev = context.state.array_records.get(STATE_EF)
        ef = ErrorFeedback.from_state(prev.to_torch_state_dict()) if prev else ErrorFeedback()
        update = ef.apply(update)
    gen = make_generator(*seed_parts, server_round, 7)
    payload, sent = encode_update(update, spec, generator=gen, return_reconstruction=True)
    if ef is not None:
        ef.record(update, sent)
        context.state[STATE_EF] = ArrayRecord(ef.state_dict())
    seconds = time.perf_counter() - t0
    raw = sum(v.numel() * 4 for v in update.values())
    return payload_record(payload), {"raw-bytes": raw, "encoded-bytes": len(payload),
                                     "encode-seconds": seconds}


class ClientRuntime:
    """What one ClientApp call needs: config, this node's data and a model."""

    def __init__(self, cfg: RunConfig, context: Context) -> None:
        self.cfg = cfg
        self.partition_id, self.num_partitions = _node(context)
        splits = load_splits(cfg.data, cfg.fed.seed)
        self.train_data, self.eval_data = client_data(
            cfg.data, cfg.fed.seed, self.partition_id, self.num_partitions)
        self.device = select_device(cfg.train.device)
        self.model = build_model(cfg.train.model, splits.input_shape[0], splits.num_classes)


def make_client_app(overrides: Mapping[str, Any] | None = None,
                    mods: list[Any] | None = None) -> ClientApp:
    """Build the ClientApp; ``overrides`` win over ``context.run_config``.

    ``mods`` are Flower client mods (e.g. ``flwr.clientapp.mod.message_size_mod``).
    """
    client_app = ClientApp(mods=mods or [])

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        rt = ClientRuntime(parse_run_config(context.run_config, overrides), context)
        cfg = rt.cfg
        start = receive_global(msg, context, rt.model, cfg)
        server_round = int(msg.content[CONFIG_KEY]["server-round"])  # type: ignore[arg-type]
        seed_parts = (cfg.fed.seed, rt.partition_id)
        stats = train_local(rt.model, rt.train_data, cfg.train, server_round=server_round,
                            seed_parts=seed_parts, device=rt.device)
        metrics: dict[str, Any] = {
            "num-examples": stats.num_examples, "train-loss": stats.loss,
            "train-seconds": stats.seconds, "train-steps": stats.steps,
            "partition-id": rt.partition_id,
            "global-crc": state_crc(start),
        }
        local = {k: v.detach().cpu() for k, v in rt.model.state_dict().items()}
        if cfg.comp.uplink == "none":
            record = ArrayRecord(local)  # exactly what stock Flower sends
            key = ARRAYS_KEY
        else:
            update = {k: local[k].float() - start[k].float() for k in local
                      if local[k].is_floating_point()}
            record, extra = encode_reply(update, context, cfg, server_round, seed_parts)
            metrics.update(extra)
            key = PAYLOAD_KEY
        content = RecordDict({key: record, METRICS_KEY: MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @client_app.evaluate()
    def evaluate_handler(msg: Message, context: Context) -> Message:
        rt = ClientRuntime(parse_run_config(context.run_config, overrides), context)
        receive_global(msg, context, rt.model, rt.cfg)
        ev = evaluate(rt.model, rt.eval_data, rt.device)
        n = ev.num_examples
        metrics = {"num-examples": n, "eval-loss": ev.loss if n else 0.0,
                   "eval-accuracy": ev.accuracy if n else 0.0,
                   "partition-id": rt.partition_id}
        return Message(content=RecordDict({METRICS_KEY: MetricRecord(metrics)}),
                       reply_to=msg)

    return client_app


app = make_client_app()
