"""The results schema: typed round reports, the collector, one loader for results.json."""

import json
import math

import pytest

from fedslim.report import (
    Central,
    CommReport,
    CommTotals,
    EvalMetrics,
    FinalReport,
    NodeBytes,
    Reject,
    ResultsError,
    RoundCollector,
    RoundReport,
    RunResults,
    load_results,
)


def _round(rnd: int, up: int) -> RoundReport:
    return RoundReport(round=rnd, central=Central(EvalMetrics(0.5, 1.0), EvalMetrics(0.4, 1.1)),
                       train={"train-loss": 0.3}, replies=2, failures=1,
                       rejects=[Reject(node=7, phase="train", reason="bad", partition=None)],
                       comm=CommReport(uplink_bytes=up, uplink_none_bytes=10 * up,
                                       per_node={"7": NodeBytes(up, 5)}, uplink_ratio=10.0))


def test_results_round_trip_through_json(tmp_path):
    rounds = [_round(1, 100), _round(2, 50)]
    res = RunResults(fedslim_version="x", config={"seed": 1}, started_at="t", wall_seconds=1.5,
                     rounds=rounds,
                     final=FinalReport(test_accuracy=float("nan"), test_loss=0.1,
                                       val_accuracy=0.9, val_loss=0.2, rounds_completed=2,
                                       fl_seconds=1.0, model_file="m", model_file_bytes=3,
                                       comm=CommTotals.of(rounds)))
    text = res.to_json()
    assert "NaN" not in text  # JSON has no NaN: written as null
    (tmp_path / "results.json").write_text(text)
    back = load_results(tmp_path)
    assert back.rounds == rounds
    assert back.final is not None and math.isnan(back.final.test_accuracy)
    assert back.final.comm == CommTotals.of(rounds)
    assert back.final.comm.uplink_ratio == 10.0 and back.final.comm.rejected_replies == 2


def test_comm_totals_sum_rounds():
    tot = CommTotals.of([_round(1, 100), _round(2, 50), RoundReport(round=3)])
    assert tot is not None
    assert tot.uplink_bytes == 150 and tot.uplink_none_bytes == 1500 and tot.total_bytes == 150
    assert CommTotals.of([RoundReport(round=1)]) is None


def test_collector_opens_closes_and_keeps_history():
    c = RoundCollector()
    c.open(1).replies = 3
    assert c.open(1).replies == 3  # same round: same report
    c.open(2)  # a new round closes the previous one (no central metrics)
    assert [r.round for r in c.history] == [1] and c.history[0].central is None
    central = Central(EvalMetrics(0.9, 0.1), EvalMetrics(0.8, 0.2))
    done = c.close(central, round_seconds=2.0)
    assert done is not None and done.central == central and done.round_seconds == 2.0
    assert [r.round for r in c.history] == [1, 2] and c.current is None
    assert c.close() is None


@pytest.mark.parametrize("content,fragment", [
    (None, "no such file"),
    ("{not json", "unreadable"),
    (json.dumps({"config": {}}), "missing field"),
    (json.dumps({"fedslim_version": "x", "config": {}, "started_at": "t", "wall_seconds": 1,
                 "rounds": [{"no-round": 1}]}), "missing field 'round'"),
])
def test_load_results_errors_are_typed_and_name_the_problem(tmp_path, content, fragment):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ResultsError, match=fragment):
        load_results(path)
