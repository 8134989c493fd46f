"""Early stopping on the server's validation accuracy (fedslim.server.early_stop)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from fedslim.report import Central, EvalMetrics, RoundReport
from fedslim.server.early_stop import BEST_MODEL_FILE, EarlyStop, best_round


def _hist(vals: list[float]) -> list[RoundReport]:
    return [RoundReport(round=i + 1, central=Central(EvalMetrics(v - 0.01, 1.0),
                                                     EvalMetrics(v, 1.0)))
            for i, v in enumerate(vals)]


def test_best_round_and_rounds_since():
    best, since = best_round(_hist([0.5, 0.7, 0.69, 0.705, 0.6]))
    assert best is not None and (best.round, since) == (4, 1)
    best, since = best_round(_hist([0.5, 0.7, 0.69, 0.705, 0.6]), min_delta=0.01)
    assert best is not None and (best.round, since) == (2, 3)  # +0.005 is not a gain
    assert best_round([]) == (None, 0)


def test_stops_after_patience_and_keeps_the_best_model(tmp_path):
    stop = EarlyStop(patience=2, min_delta=0.0, outdir=tmp_path)
    model = torch.nn.Linear(2, 1)
    vals = [0.5, 0.8, 0.7, 0.75]
    reasons = []
    for n in range(1, len(vals) + 1):
        with torch.no_grad():
            model.weight.fill_(n)  # the model of round n
        reasons.append(stop.observe(_hist(vals[:n]), model, {"model": "m"}))
    assert reasons[:3] == [None, None, None] and "after round 2" in reasons[3]
    kept = load_file(str(tmp_path / BEST_MODEL_FILE))
    assert torch.equal(kept["weight"], torch.full((1, 2), 2.0))  # round 2's, not round 4's
    best = stop.final(_hist(vals))
    assert best is not None and best.round == 2 and best.model_file == BEST_MODEL_FILE


def test_disabled_writes_nothing_but_reports_the_best_round(tmp_path):
    stop = EarlyStop(patience=0, min_delta=0.0, outdir=tmp_path)
    assert stop.observe(_hist([0.5, 0.4, 0.3]), torch.nn.Linear(1, 1), {}) is None
    assert not (tmp_path / BEST_MODEL_FILE).exists()
    best = stop.final(_hist([0.5, 0.4, 0.3]))
    assert best is not None and best.round == 1 and best.model_file is None
