"""Colluding attackers for ``fedslim.bench.adversarial``: the first ``K`` partitions lie
together, each with valid payloads (the mod sits inside ``compression_mod``, so every lie
is encoded, error-fed and sent like an honest update).

The colluders know each other's honest updates: each attacker trains the round's global
model on every colluder's partition (exactly as those clients would) and computes the
colluders' mean ``mu`` and per-coordinate standard deviation ``sigma``. Attacks:

* ``ipm:<eps>`` -- inner-product manipulation (Xie et al. 2020): send ``-eps * mu``;
* ``alie`` -- "a little is enough" (Baruch et al. 2019): ``mu - z * sigma`` with
  ``z = Phi^-1((n - s) / n)``, ``s = floor(n / 2 + 1) - K`` (n clients, K colluders);
* ``flip-clip`` -- ``-mu`` scaled to 2.9 x the colluders' median update norm, just under
  the default 3x clip;
* ``label-flip`` -- each attacker trains on its own data with labels ``c -> C - 1 - c``;
* ``inflate`` -- each attacker sends its own update flipped (normal norm) and claims 9.9 x
  the colluders' median ``num-examples`` (under the default 10x reject);
* ``absent`` -- the colluders answer every train message with an error: what a perfect
  defence leaves (the federation without the colluders' data), the floor to compare with.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from statistics import NormalDist
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedslim.flower_io import to_state
from fedslim.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    SERVER_ROUND,
)

State = dict[str, torch.Tensor]
COLLUDING = ("alie", "flip-clip", "label-flip", "inflate", "absent")


def is_colluding(kind: str) -> bool:
    return kind in COLLUDING or kind.startswith("ipm:")


def alie_z(n: int, k: int) -> float:
    """ALIE's z for ``k`` colluders among ``n`` clients (0 when ``s`` leaves no room)."""
    s = math.floor(n / 2 + 1) - k
    p = (n - s) / n
    return NormalDist().inv_cdf(p) if 0 < p < 1 else 0.0


def _delta(local: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]) -> State:
    return {k: (local[k] - start[k]) for k, v in start.items() if v.is_floating_point()}


def _norm(update: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))


def _honest_updates(msg: Message, context: Context, call_next: ClientAppCallable,
                    k: int) -> tuple[list[State], list[float]]:
    """Every colluder's honest update and example count for this round's global."""
    start = to_state(msg.content.array_records[ARRAYS])
    updates, counts = [], []
    for pid in range(k):
        ctx = Context(run_id=context.run_id, node_id=context.node_id,
                      node_config={**context.node_config, PARTITION_ID: pid},
                      state=context.state, run_config=context.run_config)
        reply = call_next(msg, ctx)
        updates.append(_delta(to_state(reply.content.array_records[ARRAYS]), start))
        count = reply.content.metric_records[METRICS][NUM_EXAMPLES]
        assert isinstance(count, (int, float))
        counts.append(float(count))
    return updates, counts


def _label_flip(msg: Message, context: Context, overrides: Mapping[str, Any]) -> State:
    from fedslim.client.app import ClientRuntime
    from fedslim.config import parse_run_config
    from fedslim.task.arrays import ArrayData
    from fedslim.task.train import train_local

    cfg = parse_run_config(context.run_config, overrides)
    rt = ClientRuntime(cfg, context)
    rt.load_global(msg)
    classes = int(rt.model.state_dict()[list(rt.model.state_dict())[-1]].shape[0])
    flipped = ArrayData(rt.train_data.x, (classes - 1 - rt.train_data.y).astype(
        rt.train_data.y.dtype))
    conf = msg.content.config_records.get(CONFIG)
    server_round = int(str(conf.get(SERVER_ROUND, 1))) if conf is not None else 1
    train_local(rt.model, flipped, cfg.train, server_round=server_round,
                seed_parts=(cfg.fed.seed, rt.partition_id), device=rt.device)
    return {k: v.detach().cpu() for k, v in rt.model.state_dict().items()}


def colluder_mod(kind: str, attackers: int, overrides: Mapping[str, Any]) -> Mod:
    """Partitions ``< attackers`` run ``kind`` together (train replies only)."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        pid = int(str(context.node_config[PARTITION_ID]))
        if pid >= attackers or msg.metadata.message_type != "train":
            return call_next(msg, context)
        if kind == "absent":
            raise RuntimeError(f"partition {pid} colludes by staying away")
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        start = to_state(msg.content.array_records[ARRAYS])
        local = to_state(reply.content.array_records[ARRAYS])
        if kind == "label-flip":
            local = _label_flip(msg, context, overrides)
        elif kind == "inflate":
            own = _delta(local, start)
            _, counts = _honest_updates(msg, context, call_next, attackers)
            reply.content.metric_records[METRICS][NUM_EXAMPLES] = int(
                9.9 * statistics.median(counts))
            local = {k: (start[k] - own[k]) if k in own else v for k, v in local.items()}
        else:
            updates, _ = _honest_updates(msg, context, call_next, attackers)
            stack = {k: torch.stack([u[k] for u in updates]) for k in updates[0]}
            mu = {k: s.mean(0) for k, s in stack.items()}
            if kind.startswith("ipm:"):
                sent = {k: -float(kind[4:]) * m for k, m in mu.items()}
            elif kind == "alie":
                z = alie_z(int(str(context.node_config[NUM_PARTITIONS])), attackers)
                sent = {k: mu[k] - z * s.std(0, unbiased=False) for k, s in stack.items()}
            else:  # flip-clip
                target = 2.9 * statistics.median(_norm(u) for u in updates)
                sent = {k: -m * (target / max(_norm(mu), 1e-12)) for k, m in mu.items()}
            local = {k: (start[k] + sent[k]) if k in sent else v for k, v in local.items()}
        reply.content[ARRAYS] = ArrayRecord(local)
        return reply

    return mod
