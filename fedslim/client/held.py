"""The node's copy of the global model: where it is kept and how a downlink message updates it.

A message from a :class:`~fedslim.strategies.compressed.Compressed` server brings the node
to a global version: the full model, nothing (it holds that version already), a catch-up
chain of compressed steps from the version it holds, or (``init_crc``) a chain from the
run's seeded round-0 model, which the node builds itself. The version held lives in
``context.state`` or, spilled, in one of two files per node (see :func:`_global_file`).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message
from safetensors import safe_open
from safetensors.torch import load_file

from fedslim.compression import PipelineSpec, buffers, decode_update
from fedslim.errors import DecodeError
from fedslim.flower_io import apply_delta, chain_from_record, state_crc, state_record, to_state
from fedslim.protocol import (
    DELTA,
    INIT_FAILED,
    KEY_BASE,
    PARTITION_ID,
    STATE_GLOBAL,
    STATE_META,
    DownlinkHeader,
)
from fedslim.server.storage import overwrite_model
from fedslim.strategies.aggregate import State, float_keys

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
    return spill / f"global-{node_key(context)}.{slot}.safetensors"


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


@dataclass(frozen=True)
class Pinned:
    """The downlink pipelines a node accepts: deltas, and a keyframe chain's keyframe."""

    delta: PipelineSpec
    keyframe: PipelineSpec


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
                   spill: Path | None = None, pinned: Pinned | None = None) -> State:
    """The global model this message brings the node to (remembered if ``head.keep``).

    Every delta is decoded against the held model's names and shapes and its size; with
    ``pinned``, also against the pipeline the node was told (a keyframe chain's first
    payload: the keyframe spec).

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
            chain = chain_from_record(content.array_records[DELTA], steps, "downlink")
            for i, payload in enumerate(chain):
                expected = None if pinned is None else (
                    pinned.keyframe if key and i == 0 else pinned.delta)
                delta = decode_update(payload, max_elements=limit, schema=schema,
                                      expected_spec=expected, out=sparse).tensors
                for k, v in delta.items():
                    if k not in state or v.shape != state[k].shape:
                        raise DecodeError(f"downlink: delta tensor {k!r} does not fit the "
                                          "held model")
                state = apply_delta(state, delta, into)  # step by step, as the server did
    if head.keep and not (head.base >= 0 and not head.init_crc and head.version == head.base):
        _keep_global(context, head, state, spill)  # (the held copy is this version already)
    return state


def node_key(context: Context) -> int:
    pid = context.node_config.get(PARTITION_ID)
    return pid if isinstance(pid, int) and not isinstance(pid, bool) else int(context.node_id)
