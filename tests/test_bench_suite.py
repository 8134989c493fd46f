"""The suite's arithmetic: bytes to target, accuracy at equal bytes, summaries, selection
(pure parts; the benchmarks themselves run real federations)."""

from __future__ import annotations

import pytest

from fedslim.bench import select, suite
from fedslim.bench.targets import (
    Curve,
    accuracy_within,
    bytes_to_target_ratio,
    first_reaching,
    target_of,
)


def _curve(val: list[float], per_round: int) -> Curve:
    return Curve(val, [v + 0.01 for v in val], [per_round * (i + 1) for i in range(len(val))])


def test_bytes_to_target_compares_where_each_run_first_gets_there() -> None:
    none = _curve([0.5, 0.9, 0.95, 0.96, 0.97], 1000)
    small = _curve([0.2, 0.5, 0.8, 0.9, 0.95, 0.961, 0.97, 0.97], 10)
    assert target_of(none) == pytest.approx(0.99 * 0.97)
    hit = first_reaching(small, target_of(none))
    assert hit is not None and (hit.round, hit.total_bytes) == (6, 60)  # 0.961 >= 0.9603
    assert first_reaching(none, target_of(none)).round == 5  # type: ignore[union-attr]
    assert bytes_to_target_ratio(small, none) == pytest.approx(5000 / 60)
    assert bytes_to_target_ratio(_curve([0.1, 0.2], 10), none) is None


def test_accuracy_within_a_budget_is_the_last_round_that_fits() -> None:
    run = _curve([0.2, 0.5, 0.8], 10)
    assert accuracy_within(run, 25) == (2, 0.5, 0.51)
    assert accuracy_within(run, 5) is None and accuracy_within(run, 1e9) == (3, 0.8, 0.81)
    with pytest.raises(ValueError):
        Curve([0.1], [0.1, 0.2], [1])


def _row(setting: str, seed: int, test: float, total: int, val: list[float],
         per_round: int) -> dict:
    curve = [{"val_accuracy": v, "test_accuracy": v, "total_bytes": per_round * (i + 1)}
             for i, v in enumerate(val)]
    return {"workload": "w", "strategy": "fedavg", "setting": setting, "seed": seed,
            "val_accuracy": val[-1], "test_accuracy": test, "total_bytes": total,
            "final_test_accuracy": test, "rounds": len(val), "curve": curve}


def test_summary_reports_against_the_same_seeds_baseline() -> None:
    rows = [_row("none", 1, 0.95, 3000, [0.5, 0.9, 0.95], 1000),
            _row("none", 2, 0.97, 3000, [0.6, 0.95, 0.96], 1000),
            _row("auto", 1, 0.94, 30, [0.3, 0.8, 0.93, 0.95, 0.95, 0.95], 10),
            _row("auto", 2, 0.97, 30, [0.3, 0.9, 0.96, 0.96, 0.96, 0.96], 10)]
    summary = {s["setting"]: s for s in suite.summarize(rows)}
    auto = summary["auto"]
    assert auto["total_ratio"] == 100.0
    assert auto["test_minus_none_per_seed"] == pytest.approx([-1.0, 0.0])
    # targets 0.9405 and 0.9504: none gets there in round 3, auto in rounds 4 and 3
    assert auto["bytes_to_target_per_seed"] == pytest.approx([3000 / 40, 3000 / 30])
    assert auto["reached"] == "2/2"
    assert auto["test_at_equal_bytes_per_seed"] == [0.95, 0.96]  # 1/50 of 3000 = 60 bytes
    table = suite.markdown(list(summary.values()), [1, 2])
    assert "| w | auto | 100.0 | 0.9550 (0.0150) | -0.50 (-1.00, +0.00) | 87.5 (2/2) |" in table


def test_selection_takes_the_highest_energy_that_meets_the_rule() -> None:
    rows = [{"setting": "none", "seed": s, "val_accuracy": 0.97, "total_bytes": 100_000}
            for s in (1, 2)]
    for name, val, size in (("auto:energy=0.3", 0.965, 500), ("auto:energy=0.4", 0.965, 800),
                            ("auto:energy=0.5", 0.97, 1200), ("auto:energy=0.6", 0.95, 500)):
        rows += [{"setting": name, "seed": s, "val_accuracy": val, "total_bytes": size}
                 for s in (1, 2)]
    table, chosen = select.pick(rows, min_total_ratio=100, tolerance_pp=1.0)
    # 0.5 is under 100x, 0.6 is 2 pp below none on val: 0.4 is the highest that qualifies
    assert chosen == "auto:energy=0.4"
    assert [round(t["total_ratio"]) for t in table] == [200, 125, 83, 200]
    assert select.pick(rows, min_total_ratio=1000, tolerance_pp=1.0)[1] is None
