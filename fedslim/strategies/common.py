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
        v = m.get(k)  # non-numeric / non-scalar metrics from a client are ignored
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else np.nan

    weights = np.nan_to_num(np.array([num(m, weight_key) for m in rows]))
    total = weights.sum()
    out: dict[str, int | float | list[int] | list[float]] = {weight_key: int(total)}
    keys = sorted({k for m in rows for k in m.keys()} - {weight_key, *DROPPED_KEYS})
    for k in keys:
        vals = np.array([num(m, k) for m in rows])
        if k.endswith(SUMMED_SUFFIXES):
            out[k] = float(np.nansum(vals))
        elif total > 0:
            ok = ~np.isnan(vals)
            out[k] = float((vals[ok] * weights[ok]).sum() / max(weights[ok].sum(), 1e-12))
    return MetricRecord(out)
