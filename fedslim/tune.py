"""``fedslim tune``: pick the compression setting for *your* model, data and partition.

A multi-objective search (optuna's TPE sampler, seeded) over the uplink pipeline -- a byte
budget ``budget:xR`` (R log-uniform), the quantizer's bits, whether small tensors are
quantized too (``pass:0``) -- and the server's momentum. Every trial is one real federation
(``fedslim simulate`` in a subprocess, with the caller's ``-c`` settings), scored on the
**validation** split only: (final central val accuracy, uplink reduction). The Pareto front
is printed and saved (table, CSV, JSON, PNG); the chosen setting is the front's best val
accuracy among trials with at least ``--min-ratio`` uplink reduction, and only then are its
test figures shown, next to one uncompressed run (``uplink=none``) of the same seed.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedslim.bench.runner import simulate_subprocess
from fedslim.report import RunResults

BITS = (2, 4, 8)
MIN_RATIO = 10.0
SMALLEST_REPLY = 1500  # bytes: the search space's smallest reply (envelope ~0.45 kB + an update)
MOMENTUM_RANGE = (0.0, 0.9)


def max_ratio(model_bytes: int, cap: float = 2000.0) -> float:
    """The largest budget ratio worth trying: a reply cannot be much under ~1.5 kB."""
    return max(MIN_RATIO * 1.5, min(cap, model_bytes / SMALLEST_REPLY))


@dataclass
class TrialResult:
    """One federation of the search: its setting and what it measured."""

    number: int
    uplink: str
    server_momentum: float
    uplink_ratio: float
    uplink_mb: float
    val_accuracy: float
    test_accuracy: float
    pareto: bool = False
    chosen: bool = False


def setting(ratio: float, bits: int, quantize_small: bool, momentum: float) -> dict[str, Any]:
    """The run-config overrides of one point of the search space."""
    spec = f"budget:x{max(1, round(ratio))}|q:{bits}|ans" + ("|pass:0" if quantize_small else "")
    out: dict[str, Any] = {"uplink": spec}
    if momentum > 0.0:
        out.update({"server-opt": "avgm", "server-momentum": round(momentum, 3)})
    return out


def _scores(res: RunResults) -> tuple[float, float, float, float]:
    """(val accuracy, test accuracy, uplink ratio, uplink MB) of a finished run."""
    final, last = res.final, res.rounds[-1] if res.rounds else None
    if final is None or final.comm is None or last is None or last.central is None \
            or last.central.val is None:
        raise RuntimeError("the run ended without central validation figures")
    return (last.central.val.accuracy, final.test_accuracy, final.comm.uplink_ratio or 1.0,
            final.comm.uplink_bytes / 1e6)


def pareto_front(trials: list[TrialResult]) -> list[TrialResult]:
    """Trials no other trial beats on both val accuracy and uplink reduction."""
    front = []
    for t in trials:
        dominated = any(o.val_accuracy >= t.val_accuracy and o.uplink_ratio >= t.uplink_ratio
                        and (o.val_accuracy > t.val_accuracy or o.uplink_ratio > t.uplink_ratio)
                        for o in trials)
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: t.uplink_ratio)


def choose(front: list[TrialResult], min_ratio: float) -> TrialResult | None:
    """Best val accuracy on the front among trials with >= ``min_ratio`` (ties: smaller)."""
    ok = [t for t in front if t.uplink_ratio >= min_ratio]
    return max(ok, key=lambda t: (t.val_accuracy, t.uplink_ratio)) if ok else None


def run_search(trials: int, num_clients: int, rounds: int, seed: int, extra: list[str],
               top_ratio: float, on_trial: Any = None) -> list[TrialResult]:
    """Run the optuna study; ``on_trial(result)`` is called after each finished trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "maximize"],
                                sampler=optuna.samplers.TPESampler(seed=seed))
    results: list[TrialResult] = []

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        overrides = setting(trial.suggest_float("ratio", MIN_RATIO, top_ratio, log=True),
                            trial.suggest_categorical("bits", list(BITS)),
                            trial.suggest_categorical("quantize_small", [False, True]),
                            trial.suggest_float("server_momentum", *MOMENTUM_RANGE))
        try:
            res, _ = simulate_subprocess({**overrides, "seed": seed}, num_clients, rounds,
                                         extra)
            val, test, ratio, mb = _scores(res)
        except RuntimeError as exc:  # e.g. a budget below the model's fixed cost
            if on_trial is not None:
                on_trial(None, f"trial {trial.number}: {overrides['uplink']} failed: "
                         f"{str(exc).strip().splitlines()[-1][:160]}")
            raise optuna.TrialPruned() from None
        result = TrialResult(trial.number, overrides["uplink"],
                             float(overrides.get("server-momentum", 0.0)), ratio, mb, val, test)
        results.append(result)
        if on_trial is not None:
            on_trial(result, None)
        return val, math.log10(ratio)

    study.optimize(objective, n_trials=trials)
    return results


def conclude(results: list[TrialResult], min_ratio: float) -> tuple[list[TrialResult],
                                                                    TrialResult | None]:
    """Mark the Pareto front and the choice on ``results``; return (front, chosen)."""
    front = pareto_front(results)
    for r in front:
        r.pareto = True
    chosen = choose(front, min_ratio)
    if chosen is not None:
        chosen.chosen = True
    return front, chosen


def summary_lines(front: list[TrialResult], chosen: TrialResult | None, base: TrialResult,
                  min_ratio: float) -> list[str]:
    """What ``fedslim tune`` prints after the search: the front, then the choice."""
    lines = ["Pareto front (validation): uplink reduction, val accuracy, setting"]
    lines += [f"  x{r.uplink_ratio:>9,.1f}  {r.val_accuracy:.4f}  {r.uplink} momentum "
              f"{r.server_momentum:.2f}" + ("   <- chosen" if r.chosen else "") for r in front]
    if chosen is None:
        lines.append(f"no trial reached x{min_ratio:g} uplink reduction; lower --min-ratio "
                     "or run more --trials")
    else:
        lines.append(f"chosen on val: uplink={chosen.uplink} server-momentum="
                     f"{chosen.server_momentum:.2f} -> uplink x{chosen.uplink_ratio:,.1f}, test "
                     f"{chosen.test_accuracy:.4f} vs {base.test_accuracy:.4f} uncompressed "
                     f"({100 * (chosen.test_accuracy - base.test_accuracy):+.2f} pp)")
    return lines


def baseline(num_clients: int, rounds: int, seed: int, extra: list[str]) -> TrialResult:
    """One uncompressed run (``uplink=none``) of the same seed and settings."""
    res, _ = simulate_subprocess({"uplink": "none", "seed": seed}, num_clients, rounds, extra)
    val, test, ratio, mb = _scores(res)
    return TrialResult(-1, "none", 0.0, ratio, mb, val, test)


def save(out: Path, results: list[TrialResult], base: TrialResult | None,
         chosen: TrialResult | None, meta: dict[str, Any]) -> list[Path]:
    """tune.json, trials.csv and pareto.png in ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in results]
    (out / "tune.json").write_text(json.dumps({
        **meta, "trials": rows, "baseline": asdict(base) if base else None,
        "chosen": asdict(chosen) if chosen else None}, indent=2))
    with open(out / "trials.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["number"])
        writer.writeheader()
        writer.writerows(rows)
    _plot(out / "pareto.png", results, base, meta)
    return [out / "tune.json", out / "trials.csv", out / "pareto.png"]


def _plot(path: Path, results: list[TrialResult], base: TrialResult | None,
          meta: dict[str, Any]) -> None:
    from fedslim.bench.plots import _finish, _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 6))
    ax.scatter([r.uplink_ratio for r in results], [100 * r.val_accuracy for r in results],
               c="0.6", s=30, label="trial")
    front = sorted((r for r in results if r.pareto), key=lambda r: r.uplink_ratio)
    ax.plot([r.uplink_ratio for r in front], [100 * r.val_accuracy for r in front], "o-",
            c="C0", label="Pareto front (val)")
    for r in results:
        ax.annotate(str(r.number), (r.uplink_ratio, 100 * r.val_accuracy), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    for r in results:
        if r.chosen:
            ax.scatter([r.uplink_ratio], [100 * r.val_accuracy], marker="*", s=220, c="C3",
                       zorder=4, label=f"chosen: {r.uplink}")
    if base is not None:
        ax.axhline(100 * base.val_accuracy, ls="--", c="0.3", lw=1,
                   label=f"uplink=none: val {100 * base.val_accuracy:.2f}%")
    _finish(plt, fig, ax, path, "uplink reduction (x, bytes as Flower serialized them)",
            "final central validation accuracy (%)",
            f"fedslim tune: {meta.get('n_trials')} trials, seed {meta.get('seed')}, "
            f"{meta.get('num_clients')} clients, {meta.get('rounds')} rounds")


__all__ = ["TrialResult", "baseline", "choose", "pareto_front", "run_search", "save",
           "setting"]
