"""Pieces every fedslim strategy shares: seeded node sampling and metric aggregation."""

from __future__ import annotations

import random
from collections.abc import Iterable

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

# Metric keys that are summed (not averaged) across clients; identifiers are dropped.
SUMMED_SUFFIXES = ("-bytes", "-seconds")
DROPPED_KEYS = ("partition-id", "global-crc")


def seeded_sample(grid: Grid, min_available: int, fraction: float, min_nodes: int,
                  seed: int, server_round: int, salt: int) -> list[int]:
    """Sample node ids reproducibly: sorted ids, an RNG seeded by (seed, round, salt).

    Flower's default uses the global ``random`` module, which makes a resumed run pick
    different nodes than an uninterrupted one.
    """
    all_ids, _ = sample_nodes(grid, min_available, min_available)
    all_ids = sorted(grid.get_node_ids())
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
