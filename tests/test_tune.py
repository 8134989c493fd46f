"""``fedslim tune``: the search space, the Pareto front and the choice (pure parts)."""

from __future__ import annotations

from fedslim.compression import parse_spec
from fedslim.tune import TrialResult, choose, pareto_front, setting


def _t(n: int, ratio: float, val: float) -> TrialResult:
    return TrialResult(n, f"s{n}", 0.0, ratio, 1.0, val, val)


def test_every_point_of_the_space_is_a_valid_setting() -> None:
    for ratio in (10.0, 123.4, 2000.0):
        for bits in (2, 4, 8):
            for small in (False, True):
                out = setting(ratio, bits, small, 0.37)
                spec = parse_spec(out["uplink"])
                assert spec.topk is not None and spec.topk.ratio == round(ratio)
                assert spec.entropy is not None and (spec.passthrough.below == 0) == small
                assert out["server-opt"] == "avgm" and out["server-momentum"] == 0.37
    assert "server-opt" not in setting(50, 4, False, 0.0)


def test_front_keeps_exactly_the_non_dominated_trials() -> None:
    trials = [_t(0, 10, 0.95), _t(1, 100, 0.94), _t(2, 50, 0.93), _t(3, 300, 0.90),
              _t(4, 100, 0.94), _t(5, 20, 0.96)]
    front = pareto_front(trials)
    assert [t.number for t in front] == [5, 1, 4, 3]  # 0 and 2 are beaten; 1 and 4 tie


def test_choice_is_the_best_val_above_the_ratio_floor() -> None:
    front = pareto_front([_t(0, 20, 0.96), _t(1, 60, 0.95), _t(2, 300, 0.90)])
    chosen = choose(front, 50)
    assert chosen is not None and chosen.number == 1
    assert choose(front, 1000) is None
