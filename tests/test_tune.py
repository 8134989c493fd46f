"""``fedslim tune``: the search space, the Pareto front, the choice and its confirmation
(pure parts; tests/e2e/test_tune.py runs real federations)."""

from __future__ import annotations

import pytest

from fedslim.compression import parse_spec
from fedslim.errors import ConfigError
from fedslim.report import Central, CommTotals, EvalMetrics, FinalReport, RoundReport, RunResults
from fedslim.tune import (
    TrialResult,
    check_reachable,
    choose,
    confirm,
    max_ratio,
    pareto_front,
    score,
    setting,
)


def _t(n: int, ratio: float, val: float, spec: str | None = None) -> TrialResult:
    return TrialResult(n, spec or f"s{n}", 0.0, ratio, 1.0, val)


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


def test_front_keeps_one_trial_per_spec() -> None:
    """Three momenta of one budget are one point (its best), not three: the spread between
    them is the noise a single spec shows, not three settings."""
    trials = [_t(0, 100, 0.815, "budget:x13|q:2|ans"), _t(1, 100, 0.875, "budget:x13|q:2|ans"),
              _t(2, 100, 0.85, "budget:x13|q:2|ans"), _t(3, 40, 0.86, "budget:x5|q:4|ans")]
    front = pareto_front(trials)
    assert [t.number for t in front] == [1]
    assert [t.duplicate_of for t in trials] == [1, None, 1, None]


def test_choice_is_the_best_val_above_the_ratio_floor() -> None:
    front = pareto_front([_t(0, 20, 0.96), _t(1, 60, 0.95), _t(2, 300, 0.90)])
    chosen = choose(front, 50)
    assert chosen is not None and chosen.number == 1
    assert choose(front, 1000) is None


def test_an_unreachable_min_ratio_is_refused_before_any_trial() -> None:
    small = 4 * 5_000  # a 5k-parameter model: 20 kB of float32
    top = max_ratio(small)
    assert check_reachable(top, small, "m") == top
    with pytest.raises(ConfigError, match=r"--min-ratio 50 is beyond what model='m' can carry"):
        check_reachable(50, small, "m")


def _result(val: float, test: float, ratio: float, total: int) -> RunResults:
    central = Central(test=EvalMetrics(test, 0.1), val=EvalMetrics(val, 0.1))
    comm = CommTotals(uplink_bytes=1000, total_bytes=total, uplink_ratio=ratio)
    final = FinalReport(test_accuracy=test, test_loss=0.1, val_accuracy=val, val_loss=0.1,
                        rounds_completed=1, fl_seconds=1.0, model_file="m",
                        model_file_bytes=1, comm=comm)
    return RunResults("0", {}, "now", 1.0, rounds=[RoundReport(round=1, central=central)],
                      final=final)


def test_a_trial_is_scored_on_every_seed_and_the_choice_confirmed_on_fresh_ones() -> None:
    calls: list[tuple[str, int]] = []

    def run(overrides: dict, seed: int) -> RunResults:
        calls.append((overrides["uplink"], seed))
        if overrides["uplink"] == "none":
            return _result(0.96, 0.97, 1.0, 100_000)
        return _result(0.90 + (seed % 1000) / 1000, 0.95 + (seed % 1000) / 1000, 80.0, 1_000)

    vals, ratio, _ = score({"uplink": "budget:x80|q:4|ans"}, [1, 2], run)
    assert vals == [0.901, 0.902] and ratio == 80.0
    chosen = _t(7, 80.0, 0.9015, "budget:x80|q:4|ans")
    conf = confirm(chosen, [1001, 1002], run)
    assert calls[2:] == [("budget:x80|q:4|ans", 1001), ("budget:x80|q:4|ans", 1002),
                         ("none", 1001), ("none", 1002)]
    assert conf.total_ratio == 100.0 and conf.uplink_ratio == 80.0
    assert [round(d, 2) for d in conf.diff_pp] == [-1.9, -1.8]  # 0.951 - 0.97, 0.952 - 0.97
