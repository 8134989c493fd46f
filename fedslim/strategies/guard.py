"""``Guarded(strategy)``: server-side defences against hostile or broken (valid-looking)
updates, around any strategy that aggregates plain weights.

:class:`~fedslim.strategies.compressed.Compressed` rejects what is malformed; a reply can
still be well-formed and harmful: an update scaled by 1e6, a sign-flipped update claiming
``num-examples=1e9``, a constant 3e38 that turns the next average into Inf. Put
``Guarded`` inside ``Compressed`` (it needs plain weights) and outside what aggregates::

    Compressed(Guarded(FedAvg(), clip_ratio=3.0, weight_ratio=2.0), uplink=...)

Per round, with the global model the replies started from:

* **weight cap** -- a reply's ``num-examples`` above ``weight_ratio`` x the round's median is
  lowered to that (the reply's MetricRecord is rewritten, so any inner strategy sees it);
  a claim above ``reject_ratio`` x the median (1e9 examples among clients holding
  hundreds) is a lie, and the reply is rejected;
* **outlier rejection** -- an update whose L2 norm exceeds ``reject_ratio`` x the round's
  median update norm (3+ replies) is not a large honest update but a hostile or broken one
  (e.g. scaled by 1e6, or every weight set to 3e38): the reply is rejected;
* **norm bound** -- an update (reply weights - global) whose L2 norm exceeds the bound is
  scaled down onto it; the bound is ``clip_ratio`` x the round's median update norm (needs
  3+ replies), capped by ``max_norm`` when that is set;
* **trust** (with a ``reference``: the server's own update on a root set it holds, see
  :mod:`fedslim.strategies.trust`) -- an update whose cosine with the reference is <= 0
  is left out of this round's aggregate (``weight-zero``; not counted as a rejected
  reply: the cosine cannot tell an honest update on skewed data from a liar's), one
  below ``trust_ratio`` x the round's median positive cosine loses weight in proportion
  (needs 3+ replies, like the ratios). This is what stops colluders who send valid,
  well-bounded updates that point the wrong way (inner-product manipulation, sign flips,
  label flipping);
* **finite aggregate** -- if the inner strategy still returns NaN/Inf, the round is
  dropped and the global model kept (it can never become NaN).

Every action is reported per node in the round's ``defences``. Robust aggregation (median,
trimmed mean, Krum) is the inner strategy's job: ``strategy=fedmedian|fedtrimmedavg|krum``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from functools import partial

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedslim.compression.buffers import all_finite
from fedslim.flower_io import state_record, to_state
from fedslim.protocol import NUM_EXAMPLES
from fedslim.report import Defence, Reject, RoundCollector
from fedslim.strategies.aggregate import State, float_keys
from fedslim.strategies.stream import (
    StreamingStrategy,
    Update,
    WeightsFn,
    streams,
    update_norm,
)
from fedslim.strategies.trust import ReferenceFn, cosine, trust_factors
from fedslim.strategies.uplink import check_weight, partition_of
from fedslim.strategies.wrapper import StrategyWrapper

log = logging.getLogger("flwr").getChild("fedslim")


def _weights_of(msg: Message, arrays_key: str) -> State:
    return to_state(msg.content.array_records[arrays_key])


def norm_bound(norms: list[float], clip_ratio: float, max_norm: float) -> float:
    """The round's bound: ``clip_ratio`` x median (3+ norms), capped by ``max_norm``."""
    bound = math.inf
    if clip_ratio > 0 and len(norms) >= 3:
        ordered = sorted(norms)
        median = ordered[len(ordered) // 2] if len(ordered) % 2 else 0.5 * (
            ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2])
        bound = clip_ratio * median
    if max_norm > 0:
        bound = min(bound, max_norm)
    return bound


class Guarded(StrategyWrapper):
    """Weight cap, norm bound and a finite-aggregate check around ``strategy``."""

    def __init__(self, strategy: Strategy, *, clip_ratio: float = 3.0, max_norm: float = 0.0,
                 weight_ratio: float = 2.0, reject_ratio: float = 10.0,
                 reference: ReferenceFn | None = None, trust_ratio: float = 0.5,
                 arrays_key: str = "arrays",
                 collector: RoundCollector | None = None) -> None:
        super().__init__(strategy, collector, reports=True)
        self.collector: RoundCollector = self.collector or RoundCollector()
        self.clip_ratio, self.max_norm, self.weight_ratio = clip_ratio, max_norm, weight_ratio
        self.reject_ratio = reject_ratio
        self.reference, self.trust_ratio = reference, trust_ratio
        self.arrays_key = arrays_key
        self.base: State = {}
        self._base_arrays: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if arrays is not self._base_arrays:
            self.base, self._base_arrays = to_state(arrays), arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def _act(self, server_round: int, msg: Message, action: str, detail: str) -> None:
        node = msg.metadata.src_node_id
        log.warning("round %s, node %s: %s (%s)", server_round, node, action, detail)
        self.collector.open(server_round).defences.append(
            Defence(node=node, partition=partition_of(msg), action=action, detail=detail))

    def _cap_weights(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Reject absurd claims (over ``reject_ratio`` x median), cap large ones."""
        weights = [check_weight(next(iter(m.content.metric_records.values()), None), "")
                   for m in replies]  # validated by the decoder: positive and finite
        if len(weights) < 3:
            return replies
        median = sorted(weights)[len(weights) // 2]
        cap = self.weight_ratio * median if self.weight_ratio > 0 else math.inf
        absurd = self.reject_ratio * median if self.reject_ratio > 0 else math.inf
        kept = []
        for msg, w in zip(replies, weights, strict=True):
            if w > absurd:
                self._reject(server_round, msg, f"claims {NUM_EXAMPLES}={w:g}, over "
                             f"{self.reject_ratio:g} x the round's median ({median:g})")
                continue
            kept.append(msg)
            if w > cap:
                rec = next(iter(msg.content.metric_records.values()))
                rec[NUM_EXAMPLES] = int(cap) if isinstance(rec[NUM_EXAMPLES], int) else cap
                self._act(server_round, msg, "weight-capped",
                          f"num-examples {w:g} > {self.weight_ratio:g} x median; set to {cap:g}")
        return kept

    def _norm_scales(self, server_round: int, replies: Sequence[Message],
                     norms: Sequence[float]) -> list[float | None]:
        """Per reply: None (rejected as an outlier) or the factor its update is scaled by
        (1.0: within the bound). Rejections and clips are reported."""
        outlier = norm_bound(list(norms), self.reject_ratio, 0.0)
        bound = norm_bound(list(norms), self.clip_ratio, self.max_norm)
        scales: list[float | None] = []
        for msg, norm in zip(replies, norms, strict=True):
            if norm > outlier:
                self._reject(server_round, msg, f"update norm {norm:.4g} is over "
                             f"{self.reject_ratio:g} x the round's median ({outlier:.4g})")
                scales.append(None)
            elif norm <= bound:
                scales.append(1.0)
            else:
                scales.append(bound / norm)
                self._act(server_round, msg, "norm-clipped", f"update norm {norm:.4g} > "
                          f"bound {bound:.4g}; scaled by {bound / norm:.3g}")
        return scales

    def _bound_norms(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Reject outliers, clip the rest onto the bound; return the replies kept."""
        keys = float_keys(self.base)
        locals_ = [to_state(m.content.array_records[self.arrays_key]) for m in replies]
        norms = [update_norm(loc, self.base, keys) for loc in locals_]
        kept = []
        for msg, loc, scale in zip(replies, locals_,
                                   self._norm_scales(server_round, replies, norms),
                                   strict=True):
            if scale is None:
                continue
            kept.append(msg)
            if scale != 1.0:
                msg.content[self.arrays_key] = state_record(
                    {k: (self.base[k] + (loc[k] - self.base[k]) * scale) if k in keys
                     else loc[k] for k in loc})
        return kept

    def _trust(self, server_round: int, replies: Sequence[Message],
               weights: Sequence[WeightsFn]) -> set[int]:
        """Score each reply against the server's reference update; leave out those pointing
        away from it, down-weight the stragglers. Returns the ids of the replies kept."""
        everyone = {id(m) for m in replies}
        if self.reference is None or not replies:
            return everyone
        if len(replies) < 3:  # like the ratio rules: no round median to weigh against, and
            # leaving one of two out can put the round under min-train-nodes
            self._skip_trust(server_round, f"{len(replies)} replies: trust needs 3+")
            return everyone
        keys = float_keys(self.base)
        ref = self.reference(self.base, server_round)
        cosines = []
        for fn in weights:
            local = fn()
            cosines.append(cosine({k: local[k] - self.base[k] for k in keys}, ref))
        kept = set()
        factors = trust_factors(cosines, self.trust_ratio)
        if max(cosines) <= 0:
            self._skip_trust(server_round, f"no update agrees with the server's reference "
                             f"(max cosine {max(cosines):.3f}): it says nothing this round")
        for msg, cos, factor in zip(replies, cosines, factors, strict=True):
            if factor <= 0:
                self._act(server_round, msg, "weight-zero", f"cosine with the server's "
                          f"reference update {cos:.3f} <= 0: left out of this round")
                continue
            kept.add(id(msg))
            if factor < 1.0:
                rec = next(iter(msg.content.metric_records.values()))
                claimed = check_weight(rec, "")
                rec[NUM_EXAMPLES] = claimed * factor
                self._act(server_round, msg, "down-weighted",
                          f"cosine with the server's reference {cos:.3f} < {self.trust_ratio:g}"
                          f" x the round's median; weight x {factor:.3f}")
        return kept

    def _skip_trust(self, server_round: int, why: str) -> None:
        self.collector.open(server_round).defences.append(Defence(
            node=0, partition=None, action="trust-skipped", detail=why))

    def _reject(self, server_round: int, msg: Message, reason: str) -> None:
        node = msg.metadata.src_node_id
        log.warning("rejected train reply from node %s: %s", node, reason)
        report = self.collector.open(server_round)
        report.rejects.append(Reject(node=node, phase="train", reason=reason,
                                     partition=partition_of(msg)))
        report.replies, report.failures = report.replies - 1, report.failures + 1

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ok = [m for m in replies if not m.has_error()
              and self.arrays_key in m.content.array_records]
        if ok and self.base:
            ok = self._cap_weights(server_round, ok)
            ok = self._bound_norms(server_round, ok)
            kept = self._trust(server_round, ok, [
                partial(_weights_of, m, self.arrays_key) for m in ok])
            ok = [m for m in ok if id(m) in kept]
        if not ok:
            return None, None
        return self._finite(server_round, *self.strategy.aggregate_train(server_round, ok))

    @property
    def streaming(self) -> bool:
        return streams(self.strategy)

    def aggregate_updates(self, server_round: int, updates: Sequence[Update]
                          ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The same defences on streamed updates: the norms were measured while each reply
        was validated, and a clip is a ``scale`` applied when the update is decoded."""
        ups = list(updates)
        if ups and self.base:
            kept = {id(m) for m in self._cap_weights(server_round, [u.msg for u in ups])}
            ups = [u for u in ups if id(u.msg) in kept]
            scales = self._norm_scales(server_round, [u.msg for u in ups],
                                       [u.norm for u in ups])
            for upd, scale in zip(ups, scales, strict=True):
                upd.scale = scale if scale is not None else 1.0
            ups = [u for u, scale in zip(ups, scales, strict=True) if scale is not None]
            kept = self._trust(server_round, [u.msg for u in ups], [u.weights for u in ups])
            ups = [u for u in ups if id(u.msg) in kept]
        if not ups:
            return None, None
        inner = self.strategy
        assert isinstance(inner, StreamingStrategy)  # (streaming is True only then)
        return self._finite(server_round, *inner.aggregate_updates(server_round, ups))

    def _finite(self, server_round: int, arrays: ArrayRecord | None,
                metrics: MetricRecord | None
                ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop the round if the aggregate holds NaN/Inf (the global model is kept)."""
        if arrays is not None and not all(
                all_finite(v) for v in to_state(arrays).values()):
            log.warning("round %s: the aggregate holds NaN/Inf; the global model is kept",
                        server_round)
            self.collector.open(server_round).defences.append(Defence(
                node=0, partition=None, action="aggregate-dropped",
                detail="the aggregated model held NaN/Inf; the round was dropped"))
            return None, metrics
        return arrays, metrics
