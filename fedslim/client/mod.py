"""``compression_mod``: fedslim's compression layer on the client, as a Flower mod.

Add it to ANY ClientApp whose train handler replies with an ``ArrayRecord`` of weights::

    from fedslim.client import compression_mod
    app = ClientApp(mods=[compression_mod])

On the way in, a message from a :class:`~fedslim.strategies.compressed.Compressed` server
is turned back into what a stock app expects: the global model under the app's arrays key
(rebuilt from the copy this node holds plus a decoded delta, when the server sent one).
On the way out, the app's weights become an encoded update: ``local - received global``
plus this node's error-feedback residual, through the pipeline the server asked for. The
held global model (:mod:`fedslim.client.held`) and the residual
(:mod:`fedslim.client.residual`) live in ``context.state`` or, spilled, in files. Messages
without fedslim's header (a stock server) pass through untouched.

Mod order: Flower runs mods first to last around the app; mods listed *before*
``compression_mod`` see the encoded reply, mods after it see plain weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedslim.client.held import (
    SCRATCH_SPARSE,
    SCRATCH_UPDATE,
    InitialState,
    Pinned,
    node_key,
    receive_global,
)
from fedslim.client.residual import StateDir, ef_files, load_residual, persist_residual
from fedslim.compression import PipelineSpec, buffers, encode_update, parse_spec
from fedslim.errors import DecodeError, EncodeError
from fedslim.flower_io import (
    COMPACT_MAX,
    array_tensor,
    content_bytes,
    fold_reply,
    payload_record,
    state_crc,
    state_record,
    to_state,
)
from fedslim.protocol import (
    DELTA,
    DOWN,
    PAYLOAD,
    STATE_EF,
    STATE_EF_META,
    STATE_LOWRANK,
    UP,
    DownlinkHeader,
    UplinkHeader,
)
from fedslim.strategies.aggregate import State, float_keys
from fedslim.task.train import make_generator

log = logging.getLogger("flwr").getChild("fedslim")


def _one_dtype(tensors: State) -> bool:
    """Whether a schema-bound payload can carry these (it has one source dtype)."""
    return len({t.dtype for t in tensors.values()}) <= 1


def _reply_key(reply: Message, head: DownlinkHeader, start: State) -> str:
    """The name of the reply's weights record, checked against the global model's names."""
    records = reply.content.array_records
    key = head.arrays_key
    if key not in records:
        if len(records) != 1:
            raise EncodeError(f"the ClientApp's reply must carry its weights as one "
                              f"ArrayRecord (ideally {key!r}); it has {sorted(records)}")
        key = next(iter(records))
    names = set(records[key].keys())
    if names != start.keys():
        missing, extra = sorted(start.keys() - names), sorted(names - start.keys())
        raise EncodeError(f"the reply's parameter names differ from the global model's "
                          f"(missing {missing[:5]}, unexpected {extra[:5]}); client and "
                          "server must build the same model")
    return key


def _local_update(reply: Message, key: str, start: State, keys: list[str]) -> State:
    """``local - start`` per float tensor, in this process's reused buffers (no model-sized
    allocation per round: each costs more than the arithmetic at 10M parameters)."""
    arrays = reply.content.array_records[key]  # (read in place from the reply's bytes)
    local = {k: array_tensor(arrays[k]) for k in keys}
    for k in keys:
        if local[k].is_complex():
            raise EncodeError(f"the reply's tensor {k!r} is {local[k].dtype}; the global "
                              "model's is real (float)")
        if local[k].shape != start[k].shape:
            raise EncodeError(f"the reply's tensor {k!r} has shape {tuple(local[k].shape)}, "
                              f"the global model's {tuple(start[k].shape)}; client and "
                              "server must build the same model")
    floats = {k: start[k] for k in keys}
    return {k: torch.sub(local[k].float(), start[k], out=v) for k, v in
            buffers.scratch(SCRATCH_UPDATE, floats).items()}


def _encode(reply: Message, context: Context, head: DownlinkHeader, start: State, key: str,
            spec: PipelineSpec, state_dir: StateDir | None, spill: Path | None) -> bytes:
    """The wire payload of this reply: its update plus the node's residual, through
    ``spec``; the residual (and PowerSGD's warm start) kept for the next round."""
    keys = float_keys(start)
    update = _local_update(reply, key, start, keys)
    slots = ef_files(state_dir, context, head)
    ef, loaded = load_residual(context, head, slots) if head.error_feedback else (None, None)
    if ef is not None:
        update = ef.apply(update, in_place=True)
    gen = make_generator(head.seed, node_key(context), head.server_round, 7)
    room = _payload_room(reply, key, spec, start, keys, len(
        _header(head, start, encode_seconds=0.0, crc=0).pack()))
    warm = context.state.array_records.get(STATE_LOWRANK)
    lowrank_state = None if spec.lowrank is None else (
        to_state(warm) if warm is not None else {})
    # Schema-bound, spec implied: the server holds the model and chose the spec, so names,
    # shapes and the spec string stay home.
    bound = _one_dtype(update)
    payload, sent = encode_update(
        update, spec, generator=gen, return_reconstruction=True, max_bytes=room,
        lowrank_state=lowrank_state, schema_bound=bound, spec_implied=bound,
        reconstruction_out=buffers.scratch(SCRATCH_SPARSE, {k: start[k] for k in keys}))
    if lowrank_state:  # PowerSGD's warm start for the next round
        context.state[STATE_LOWRANK] = ArrayRecord(lowrank_state)
    if ef is not None:  # (update: scratch buffers; the residual is made in them, then
        # written to its file or copied into the context before the next message)
        ef.record(update, sent, in_place=True)
        if spill is None or slots is None:  # (spilled: its file is the only copy)
            context.state[STATE_EF] = ArrayRecord(ef.state_dict())
            context.state[STATE_EF_META] = ConfigRecord({"stream": head.stream,
                                                         "round": head.server_round})
        persist_residual(ef, slots, loaded, head)
    return payload


def encode_reply(reply: Message, context: Context, head: DownlinkHeader, start: State,
                 state_dir: StateDir | None = None, spill: Path | None = None,
                 decode_seconds: float = 0.0) -> None:
    """Replace the reply's weights by the encoded update and add the uplink header."""
    key = _reply_key(reply, head, start)
    spec = parse_spec(head.uplink)
    t0 = time.perf_counter()
    payload = b"" if spec.is_identity else _encode(reply, context, head, start, key, spec,
                                                    state_dir, spill)
    header = _header(head, start, encode_seconds=time.perf_counter() - t0,
                     decode_seconds=decode_seconds)
    if spec.is_identity:  # plain weights, passed on as the app made them; the header rides
        reply.content[UP] = header.to_record()  # in its own small record
    else:  # the header, then the wire payload: with the metrics in one ConfigRecord when
        del reply.content[key]  # small (see fold_reply), else in one array
        data = header.pack() + payload
        if not fold_reply(reply.content, data):
            reply.content[PAYLOAD] = payload_record(data)


ENVELOPE_MARGIN = 24  # bytes: length fields in the envelope grow with the payload's size
MESSAGE_BOUND = 144  # bytes: the Message object itself (metadata, ids) at its largest
# (measured 109; run and node ids are up to 10-byte varints, the group id up to 10 digits).
# A bound, not the live size: node ids are random, and the room -- hence k -- must not
# depend on them, or the same seed would train a different model in another run.


def _payload_room(reply: Message, key: str, spec: PipelineSpec, start: State,
                  keys: list[str], header_size: int) -> int | None:
    """With a ``budget:`` uplink, what is left for the payload once the rest of the reply
    (Flower's envelope, the app's metrics, our header) is counted: so the whole reply, as
    Flower serializes it, stays within the budget. ``None`` for other pipelines."""
    if spec.topk is None or not spec.topk.is_budget:
        return None
    limit = spec.topk.budget_for(sum(start[k].numel() for k in keys))
    # The reply as it will be sent, with an empty payload (records shared, not copied);
    # within COMPACT_MAX the payload is sure to travel in the compact form.
    trial = RecordDict({k: v for k, v in reply.content.items() if k != key})
    if limit > COMPACT_MAX or not fold_reply(trial, bytes(header_size)):
        trial[PAYLOAD] = payload_record(bytes(header_size))
    envelope = content_bytes(trial) + MESSAGE_BOUND
    room = limit - envelope - ENVELOPE_MARGIN
    if room < 64:
        raise EncodeError(f"uplink budget of {limit} bytes leaves {room} for the update once "
                          f"the reply's other {envelope} bytes (Flower's envelope, the app's "
                          "metrics) are counted; raise the budget")
    return room


def make_compression_mod(initial_state: InitialState | None = None,
                         state_dir: StateDir | None = None,
                         spill: bool | Callable[[Context], bool] = False,
                         downlink: Callable[[Context], Pinned | None] | None = None) -> Mod:
    """A ``compression_mod`` with optional node-side helpers.

    ``initial_state(context)`` builds the run's round-0 model on the node, so a server with
    ``shared_init`` need not send it. ``state_dir(context)`` names a directory where the
    node keeps its error-feedback residual (one file per node, keyed by the run's lineage),
    so a resumed server run continues exactly where the interrupted one stopped.

    ``spill``: the node's model-sized state (its copy of the global model, the residual)
    lives only in ``state_dir``, not in ``context.state``. Flower's simulation engine keeps
    every node's context in the server process, so without it that process holds two
    models per node; with it, a few bytes per node.

    ``downlink(context)``: the pipelines the node was told the server uses (its delta
    spec, its keyframe spec); a downlink payload encoded with any other is rejected before
    its records are read, as the server does with replies.
    """

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        return _compression(msg, context, call_next, initial_state, state_dir,
                            spill(context) if callable(spill) else spill,
                            downlink(context) if downlink is not None else None)

    mod.__name__ = mod.__qualname__ = "compression_mod"
    return mod


def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: decompress the downlink, compress the app's train reply."""
    return _compression(msg, context, call_next, None, None, False, None)


def _spill_dir(state_dir: StateDir | None, context: Context, spill: bool) -> Path | None:
    if not spill or state_dir is None:
        return None
    directory = state_dir(context)
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("cannot spill node state to %s (kept in memory): %s", directory, exc)
        return None
    return directory


def _compression(msg: Message, context: Context, call_next: ClientAppCallable,
                 initial_state: InitialState | None, state_dir: StateDir | None,
                 spill: bool, pinned: Pinned | None) -> Message:
    header = msg.content.config_records.get(DOWN)
    if header is None:  # not from a fedslim-compressed server: stock behaviour
        return call_next(msg, context)
    try:
        head = DownlinkHeader.from_record(header)
    except Exception as exc:
        raise DecodeError(f"downlink header: {exc}") from None
    spill_dir = _spill_dir(state_dir, context, spill)
    built = [0.0]  # building the round-0 model from the seed is the app's work, not the codec's

    def build(ctx: Context) -> State:
        t = time.perf_counter()
        try:
            return initial_state(ctx)  # type: ignore[misc]
        finally:
            built[0] += time.perf_counter() - t

    t0 = time.perf_counter()
    start = receive_global(msg, context, head, build if initial_state else None, spill_dir,
                           pinned)
    decoded = time.perf_counter() - t0 - built[0]
    content = msg.content
    for key in (DOWN, DELTA):
        if key in content:
            del content[key]
    if head.arrays_key not in content.array_records:
        content[head.arrays_key] = state_record(start)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    if msg.metadata.message_type == MessageType.TRAIN:
        encode_reply(reply, context, head, start, state_dir, spill_dir, decoded)
    else:  # tell the server which global this node now holds (its deltas build on it)
        reply.content[UP] = _header(head, start, encode_seconds=0.0,
                                    decode_seconds=decoded).to_record()
    return reply


def _header(head: DownlinkHeader, start: State, encode_seconds: float,
            decode_seconds: float = 0.0, crc: int | None = None) -> UplinkHeader:
    return UplinkHeader(stream=head.stream, version=head.version,
                        server_round=head.server_round,
                        global_crc=state_crc(start) if crc is None else crc,
                        arrays_key=head.arrays_key, encode_seconds=encode_seconds,
                        decode_seconds=decode_seconds)
