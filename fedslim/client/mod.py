"""``compression_mod``: fedslim's compression layer on the client, as a Flower mod.

Add it to ANY ClientApp whose train handler replies with an ``ArrayRecord`` of weights::

    from fedslim.client import compression_mod
    app = ClientApp(mods=[compression_mod])

On the way in, a message from a :class:`~fedslim.strategies.compressed.Compressed` server
is turned back into what a stock app expects: the global model under the app's arrays key
(rebuilt from the copy this node holds plus a decoded delta, when the server sent one).
On the way out, the app's weights become an encoded update: ``local - received global``
plus this node's error-feedback residual, through the pipeline the server asked for. The
residual and the held global model live in ``context.state``. Messages without fedslim's
header (a stock server) pass through untouched.

Mod order: Flower runs mods first to last around the app; mods listed *before*
``compression_mod`` see the encoded reply, mods after it see plain weights.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from safetensors import safe_open
from safetensors.torch import load_file

from fedslim.compression import (
    ErrorFeedback,
    PipelineSpec,
    buffers,
    decode_update,
    encode_update,
    parse_spec,
)
from fedslim.errors import DecodeError, EncodeError
from fedslim.flower_io import (
    COMPACT_MAX,
    apply_delta,
    array_tensor,
    chain_from_record,
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
    INIT_FAILED,
    KEY_BASE,
    PARTITION_ID,
    PAYLOAD,
    STATE_EF,
    STATE_EF_META,
    STATE_GLOBAL,
    STATE_LOWRANK,
    STATE_META,
    UP,
    DownlinkHeader,
    UplinkHeader,
)
from fedslim.server.storage import overwrite_model
from fedslim.strategies.aggregate import State, float_keys
from fedslim.task.train import make_generator

log = logging.getLogger("flwr").getChild("fedslim")

MAX_CHAIN = 256  # catch-up steps a node accepts in one message (the server keeps <= 32)
# Roles of the model-sized buffers a node reuses from round to round (buffers.scratch):
# the global model this message brings (alive until the reply is encoded), a sparse
# tensor made dense (the downlink delta, then the uplink's reconstruction), the update.
SCRATCH_GLOBAL, SCRATCH_SPARSE, SCRATCH_UPDATE = "node-global", "node-sparse", "node-update"


def _global_file(spill: Path, context: Context, slot: int) -> Path:
    """One of the node's two slots for its held copy: each write goes to the slot the
    context does not point at, so the current copy (possibly still mapped) is never
    overwritten and a torn write leaves a token mismatch, never a wrong model."""
    return spill / f"global-{_node_key(context)}.{slot}.safetensors"


def _held(context: Context, stream: int, spill: Path | None = None
          ) -> tuple[int, State] | None:
    """The global version this node holds and its weights (from ``context.state`` or, when
    it was spilled, from the file whose token the context remembers)."""
    meta = context.state.config_records.get(STATE_META)
    if meta is None or meta.get("stream") != stream:
        return None
    version, token, slot = meta.get("version"), meta.get("file-token"), meta.get("slot", 0)
    if not isinstance(version, int) or slot not in (0, 1):
        return None
    if token is None:
        if STATE_GLOBAL not in context.state:
            return None
        return version, to_state(context.state.array_records[STATE_GLOBAL])
    if spill is None:
        return None
    path = _global_file(spill, context, 1 if slot == 1 else 0)
    try:
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("token") != str(token):
                return None
        return version, load_file(str(path))
    except Exception as exc:  # a lost copy: the server's message will say what is missing
        log.warning("cannot read the held global model %s: %s", path, exc)
        return None


def _keep_global(context: Context, head: DownlinkHeader, state: State,
                 spill: Path | None) -> None:
    meta: dict[str, int] = {"stream": head.stream, "version": head.version}
    spilled = False
    if spill is not None:
        old = context.state.config_records.get(STATE_META)
        slot = 0 if old is None or old.get("slot") != 0 else 1  # the one not pointed at
        try:
            token = secrets.randbits(62)
            # In place (the slot's cached pages are reused), never into the current slot;
            # lost on a power cut or torn: the token no longer matches, the server resends.
            overwrite_model(_global_file(spill, context, slot), state, {"token": str(token)})
            meta["file-token"], meta["slot"], spilled = token, slot, True
        except OSError as exc:  # no room on disk: keep it in memory instead
            log.warning("cannot spill the global model to %s: %s", spill, exc)
    if spilled:
        if STATE_GLOBAL in context.state:
            del context.state[STATE_GLOBAL]
    else:
        context.state[STATE_GLOBAL] = state_record(state)
    context.state[STATE_META] = ConfigRecord(meta)  # type: ignore[arg-type]


InitialState = Callable[[Context], State]


def _base_state(context: Context, head: DownlinkHeader,
                initial_state: InitialState | None, spill: Path | None) -> State:
    """The version the message builds on: held, or (``init_crc``) built here."""
    if head.init_crc:
        if initial_state is None:
            raise DecodeError(f"downlink: {INIT_FAILED}: the server asks this node to build "
                              "it, but compression_mod has no initial_state")
        state = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
                 for k, v in initial_state(context).items()}
        if state_crc(state) != head.init_crc:
            raise DecodeError(f"downlink: {INIT_FAILED}: the one built here differs from the "
                              "server's (CRC mismatch): different model, seed or device")
        return state
    held = _held(context, head.stream, spill)
    if held is None or held[0] != head.base:
        raise DecodeError(f"downlink: message builds on global version {head.base} but "
                          f"this node holds {None if held is None else held[0]}; the "
                          "server must send the full model")
    return held[1]


def receive_global(msg: Message, context: Context, head: DownlinkHeader,
                   initial_state: InitialState | None = None,
                   spill: Path | None = None) -> State:
    """The global model this message brings the node to (remembered if ``head.keep``).

    Raises
    ------
    DecodeError
        If the message needs a version this node does not hold (or cannot build), or its
        delta is malformed.
    """
    content = msg.content
    if head.base == -1:  # the full model
        if head.arrays_key not in content.array_records:
            raise DecodeError(f"downlink: no {head.arrays_key!r} record and no base version")
        state = to_state(content.array_records[head.arrays_key])
    else:
        state = _base_state(context, head, initial_state, spill)
        key = head.base == KEY_BASE
        if key and DELTA not in content.array_records:
            raise DecodeError(f"downlink: a keyframe for version {head.version} without a "
                              f"{DELTA!r} record")
        # a keyframe chain: the keyframe, then one step per version since it
        steps = len(content.array_records[DELTA]) if key else head.version - head.base
        if not (1 if key else 0) <= steps <= min(MAX_CHAIN, head.version):
            raise DecodeError(f"downlink: a catch-up of {steps} steps to version "
                              f"{head.version} (allowed: {1 if key else 0} to "
                              f"{min(MAX_CHAIN, head.version)})")
        if steps:
            if DELTA not in content.array_records:
                raise DecodeError(f"downlink: version {head.base} -> {head.version} without "
                                  f"a {DELTA!r} record")
            keys = float_keys(state)
            limit = max(sum(state[k].numel() for k in keys), 1)
            schema = {k: tuple(state[k].shape) for k in keys}
            # This process's reused buffers: the delta densified into one set, the new
            # global added into another (in place from the second step of a chain on).
            floats = {k: state[k] for k in keys}
            sparse, into = buffers.scratch(SCRATCH_SPARSE, floats), \
                buffers.scratch(SCRATCH_GLOBAL, floats)
            for payload in chain_from_record(content.array_records[DELTA], steps, "downlink"):
                delta = decode_update(payload, max_elements=limit, schema=schema,
                                      out=sparse).tensors
                for k, v in delta.items():
                    if k not in state or v.shape != state[k].shape:
                        raise DecodeError(f"downlink: delta tensor {k!r} does not fit the "
                                          "held model")
                state = apply_delta(state, delta, into)  # step by step, as the server did
    if head.keep and not (head.base >= 0 and not head.init_crc and head.version == head.base):
        _keep_global(context, head, state, spill)  # (the held copy is this version already)
    return state


def _one_dtype(tensors: State) -> bool:
    """Whether a schema-bound payload can carry these (it has one source dtype)."""
    return len({t.dtype for t in tensors.values()}) <= 1


def _node_key(context: Context) -> int:
    pid = context.node_config.get(PARTITION_ID)
    return pid if isinstance(pid, int) and not isinstance(pid, bool) else int(context.node_id)


StateDir = Callable[[Context], Path | None]


def _ef_files(state_dir: StateDir | None, context: Context, head: DownlinkHeader
              ) -> tuple[Path, Path] | None:
    """The node's two residual slots (see :func:`_error_feedback`)."""
    if state_dir is None or not head.lineage:
        return None
    directory = state_dir(context)
    if directory is None:
        return None
    key = _node_key(context)
    return directory / f"ef-{key}.0.safetensors", directory / f"ef-{key}.1.safetensors"


_ROUND_WIDTH = 20  # a residual file's round, padded: the final header has the length of
# the placeholder (-1, "being written") it replaces once the data is in


def _file_round(path: Path, lineage: int) -> int | None:
    """The round a residual file was written after, if it belongs to ``lineage``."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            info = fh.metadata() or {}
        written = int(info["round"]) if info.get("lineage") == str(lineage) else None
        return None if written is None or written < 0 else written
    except Exception as exc:  # a damaged file is a lost residual, not a failed round
        log.warning("ignoring error-feedback file %s: %s", path, exc)
        return None


def _error_feedback(context: Context, head: DownlinkHeader,
                    slots: tuple[Path, Path] | None) -> tuple[ErrorFeedback, Path | None]:
    """This node's residual: from ``context.state`` (same server stream), else from its
    file (same run lineage, the newest written before this round: the server resumed),
    else zero; and the slot it was read from.

    Two slots are kept: the newest residual and the one before. A node can finish round r
    (and write its residual) while the server dies before recording round r; the resumed
    server repeats round r, which must start from the residual written after round r - 1.
    The new residual is written into the slot *not* read (whose tensors are still mapped).
    """
    meta = context.state.config_records.get(STATE_EF_META)
    rec = context.state.array_records.get(STATE_EF)
    if rec is not None and meta is not None and meta.get("stream") == head.stream:
        last = meta.get("round")
        if _fresh(head, last if isinstance(last, int) else None):
            return ErrorFeedback.from_state(to_state(rec)), None
        return ErrorFeedback(), None
    if slots is not None:
        found = [(r, f) for f in slots if f.is_file()
                 and (r := _file_round(f, head.lineage)) is not None and r < head.server_round]
        if found and _fresh(head, max(found)[0]):
            newest = max(found)[1]
            try:
                return ErrorFeedback.from_state(load_file(str(newest)), copy=False), newest
            except Exception as exc:
                log.warning("ignoring error-feedback file %s: %s", newest, exc)
    return ErrorFeedback(), None  # a new run (old residuals do not apply), or stale


def _fresh(head: DownlinkHeader, last_round: int | None) -> bool:
    """Whether a residual written after ``last_round`` may still be used this round."""
    if not head.ef_reset_after or last_round is None:
        return True
    return head.server_round - last_round <= head.ef_reset_after


def _persist(ef: ErrorFeedback, slots: tuple[Path, Path] | None, loaded: Path | None,
             head: DownlinkHeader) -> None:
    """Write the residual into the slot it was not read from (or the older one), in place
    (the slot's cached pages are reused): the round goes in last, so a process killed
    mid-write leaves a file marked "being written" that no round will read. Lost on a
    power cut (no fsync): the residual restarts at zero."""
    if slots is None:
        return
    if loaded is None:  # nothing read this round: overwrite the older (or a missing) slot
        rounds = [(_file_round(f, head.lineage) if f.is_file() else None) for f in slots]
        older = [-1 if r is None else r for r in rounds]
        target = slots[0] if older[0] <= older[1] else slots[1]
    else:
        target = slots[1] if loaded == slots[0] else slots[0]
    lineage = str(head.lineage)
    try:
        overwrite_model(target, ef.residuals(),
                        {"lineage": lineage, "round": f"{-1:>{_ROUND_WIDTH}}"},
                        {"lineage": lineage, "round": f"{head.server_round:>{_ROUND_WIDTH}}"})
    except OSError as exc:  # no place to keep it: resuming will start it from zero
        log.warning("cannot persist the error-feedback residual to %s: %s", target, exc)


def encode_reply(reply: Message, context: Context, head: DownlinkHeader, start: State,
                 state_dir: StateDir | None = None, spill: Path | None = None,
                 decode_seconds: float = 0.0) -> None:
    """Replace the reply's weights by the encoded update and add the uplink header."""
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
    spec = parse_spec(head.uplink)
    keys = float_keys(start)
    t0 = time.perf_counter()
    payload = b""
    if not spec.is_identity:  # (plain replies are passed on as the app made them)
        arrays = records[key]  # (read in place from the reply's bytes: no copy)
        local = {k: array_tensor(arrays[k]) for k in keys}
        for k in keys:
            if local[k].is_complex():
                raise EncodeError(f"the reply's tensor {k!r} is {local[k].dtype}; the "
                                  "global model's is real (float)")
            if local[k].shape != start[k].shape:
                raise EncodeError(f"the reply's tensor {k!r} has shape "
                                  f"{tuple(local[k].shape)}, the global model's "
                                  f"{tuple(start[k].shape)}; client and server must build "
                                  "the same model")
        # Into this process's reused buffers, the residual added in place: no model-sized
        # allocation per round (each costs more than the arithmetic at 10M parameters).
        floats = {k: start[k] for k in keys}
        update = {k: torch.sub(local[k].float(), start[k], out=v) for k, v in
                  buffers.scratch(SCRATCH_UPDATE, floats).items()}
        slots = _ef_files(state_dir, context, head)
        ef, loaded = _error_feedback(context, head, slots) if head.error_feedback \
            else (None, None)
        if ef is not None:
            update = ef.apply(update, in_place=True)
        gen = make_generator(head.seed, _node_key(context), head.server_round, 7)
        room = _payload_room(reply, key, spec, start, keys, len(
            _header(head, start, encode_seconds=0.0, crc=0).pack()))
        warm = context.state.array_records.get(STATE_LOWRANK)
        lowrank_state = None if spec.lowrank is None else (
            to_state(warm) if warm is not None else {})
        # Schema-bound, spec implied: the server holds the model and chose the spec, so
        # names, shapes and the spec string stay home.
        bound = _one_dtype(update)
        payload, sent = encode_update(update, spec, generator=gen, return_reconstruction=True,
                                      max_bytes=room, lowrank_state=lowrank_state,
                                      schema_bound=bound, spec_implied=bound,
                                      reconstruction_out=buffers.scratch(SCRATCH_SPARSE,
                                                                         floats))
        if lowrank_state:  # PowerSGD's warm start for the next round
            context.state[STATE_LOWRANK] = ArrayRecord(lowrank_state)
        if ef is not None:  # (update: scratch buffers; the residual is made in them, then
            # written to its file or copied into the context before the next message)
            ef.record(update, sent, in_place=True)
            if spill is None or slots is None:  # (spilled: its file is the only copy)
                context.state[STATE_EF] = ArrayRecord(ef.state_dict())
                context.state[STATE_EF_META] = ConfigRecord({"stream": head.stream,
                                                             "round": head.server_round})
            _persist(ef, slots, loaded, head)
    header = _header(head, start, encode_seconds=time.perf_counter() - t0,
                     decode_seconds=decode_seconds)
    if spec.is_identity:  # plain weights: the header rides in its own small record
        reply.content[UP] = header.to_record()
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
                         spill: bool | Callable[[Context], bool] = False) -> Mod:
    """A ``compression_mod`` with optional node-side helpers.

    ``initial_state(context)`` builds the run's round-0 model on the node, so a server with
    ``shared_init`` need not send it. ``state_dir(context)`` names a directory where the
    node keeps its error-feedback residual (one file per node, keyed by the run's lineage),
    so a resumed server run continues exactly where the interrupted one stopped.

    ``spill``: the node's model-sized state (its copy of the global model, the residual)
    lives only in ``state_dir``, not in ``context.state``. Flower's simulation engine keeps
    every node's context in the server process, so without it that process holds two
    models per node; with it, a few bytes per node.
    """

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        return _compression(msg, context, call_next, initial_state, state_dir,
                            spill(context) if callable(spill) else spill)

    mod.__name__ = mod.__qualname__ = "compression_mod"
    return mod


def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: decompress the downlink, compress the app's train reply."""
    return _compression(msg, context, call_next, None, None, False)


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
                 spill: bool) -> Message:
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
    start = receive_global(msg, context, head, build if initial_state else None, spill_dir)
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
