"""Pieces every fedslim strategy shares: seeded node sampling and metric aggregation."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedslim.protocol import HELLO

log = logging.getLogger("flwr").getChild("fedslim")

HELLO_TIMEOUT = 60.0  # seconds the server waits for the nodes' answers, once per node

# Metric keys that are summed (not averaged) across clients; identifiers are dropped.
SUMMED_SUFFIXES = ("-bytes", "-seconds")
DROPPED_KEYS = ("partition-id", "global-crc")


def discover_partitions(grid: Grid, known: dict[int, int | None],
                        timeout: float = HELLO_TIMEOUT) -> None:
    """Ask every node not in ``known`` for its partition id (one small query each, once).

    Node ids are random per run (Flower's simulation draws them afresh), so sampling over
    sorted ids picks other partitions in another run -- or after a resume -- with the same
    seed. A node answers ``query.fedslim_hello`` with its ``partition-id`` (fedslim's
    ClientApp does: :func:`fedslim.protocol.answer_hello`). Answers are untrusted: only an
    int in [0, 2^31) is kept; anything else (no handler, an error, no reply in ``timeout``)
    leaves the node ordered by its id, after the nodes that answered.
    """
    unknown = sorted(set(grid.get_node_ids()) - known.keys())
    if not unknown:
        return
    msgs = [Message(RecordDict({HELLO: ConfigRecord({"ask": 1})}), dst_node_id=node,
                    message_type=f"{MessageType.QUERY}.{HELLO}") for node in unknown]
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        node = reply.metadata.src_node_id
        if node not in known and not reply.has_error():
            rec = reply.content.config_records.get(HELLO)
            pid = rec.get("partition-id") if rec is not None else None
            if isinstance(pid, int) and not isinstance(pid, bool) and 0 <= pid < 1 << 31:
                known[node] = pid
    answered = sum(1 for node in unknown if known.get(node) is not None)
    for node in unknown:
        known.setdefault(node, None)
    if answered < len(unknown):
        log.info("%d of %d nodes did not report a partition id: they are sampled in "
                 "node-id order", len(unknown) - answered, len(unknown))


def seeded_sample(grid: Grid, min_available: int, fraction: float, min_nodes: int,
                  seed: int, server_round: int, salt: int,
                  partitions: Mapping[int, int | None] | None = None) -> list[int]:
    """Sample node ids reproducibly: an RNG seeded by (seed, round, salt) over the nodes in
    a stable order -- by partition id where ``partitions`` knows it, then by node id.

    Flower's default uses the global ``random`` module, which makes a resumed run pick
    different nodes than an uninterrupted one.
    """
    all_ids, _ = sample_nodes(grid, min_available, min_available)
    known = partitions or {}

    def key(node: int) -> tuple[int, int, int]:
        pid = known.get(node)
        return (0, pid, node) if pid is not None else (1, 0, node)

    all_ids = sorted(grid.get_node_ids(), key=key)
    size = min(len(all_ids), max(int(len(all_ids) * fraction), min_nodes))
    rng = random.Random(hash((seed, server_round, salt)) & 0xFFFFFFFF)
    return sorted(rng.sample(all_ids, size))


def aggregate_metrics(records: Iterable[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of every metric by ``weight_key``; sums for counts, bytes and times."""
    rows = [next(iter(r.metric_records.values())) for r in records]
    if not rows:
        return MetricRecord({})

    def num(m: MetricRecord, k: str) -> float:
        v = m.get(k)  # non-numeric, non-scalar and non-finite client metrics are ignored
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v):
            return np.nan
        return float(v)

    weights = np.array([num(m, weight_key) for m in rows])
    weights = np.where(np.isfinite(weights) & (weights > 0), weights, 0.0)
    total = float(weights.sum())
    out: dict[str, int | float | list[int] | list[float]] = {}
    if np.isfinite(total) and total < 2**62:
        out[weight_key] = int(total)
    keys = sorted({k for m in rows for k in m.keys()} - {weight_key, *DROPPED_KEYS})
    for k in keys:
        vals = np.array([num(m, k) for m in rows])
        ok = ~np.isnan(vals)
        if k.endswith(SUMMED_SUFFIXES):
            value = float(np.nansum(vals))
        elif np.isfinite(total) and total > 0 and weights[ok].sum() > 0:
            value = float((vals[ok] * weights[ok]).sum() / weights[ok].sum())
        else:
            continue
        if np.isfinite(value):
            out[k] = value
    return MetricRecord(out)
