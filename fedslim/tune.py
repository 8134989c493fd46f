"""``fedslim tune``: pick the compression setting for *your* model, data and partition.

A multi-objective search (optuna's TPE sampler, seeded) over the uplink pipeline -- a byte
budget ``budget:xR`` (R log-uniform, up to what the model can carry: a reply cannot be much
under ~1.5 kB), the quantizer's bits, whether small tensors are quantized too (``pass:0``)
-- and the server's momentum. Every trial is scored on the **validation** split only, as
the mean over ``score_seeds`` federations with different seeds (one seed rewards noise:
three runs of one budget that differed only in momentum once spanned 0.815-0.875 val):
(mean final val accuracy, mean uplink reduction). The Pareto front keeps one trial per
uplink spec (the best of its momenta). The choice is the front's best val accuracy among
trials with at least ``min_ratio`` uplink reduction; it is then **re-run on fresh seeds**
next to ``uplink=none`` and reported with its spread -- the only test figures shown.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedslim.bench.runner import simulate_subprocess
from fedslim.errors import ConfigError
from fedslim.report import RunResults

BITS = (2, 4, 8)
MIN_RATIO = 10.0
SMALLEST_REPLY = 1500  # bytes: the search space's smallest reply (envelope ~0.45 kB + an update)
MOMENTUM_RANGE = (0.0, 0.9)
CONFIRM_OFFSET = 1000  # fresh seeds: seed + 1000, + 1001, ...


def max_ratio(model_bytes: int, cap: float = 2000.0) -> float:
    """The largest budget ratio worth trying: a reply cannot be much under ~1.5 kB."""
    return max(MIN_RATIO * 1.5, min(cap, model_bytes / SMALLEST_REPLY))


def check_reachable(min_ratio: float, model_bytes: int, model: str) -> float:
    """The search's top ratio; a ``min_ratio`` beyond it is refused before any trial."""
    top = max_ratio(model_bytes)
    if min_ratio > top:
        raise ConfigError(
            f"--min-ratio {min_ratio:g} is beyond what model={model!r} can carry: its update "
            f"is {model_bytes / 1e3:,.1f} kB as float32 and a reply cannot be much under "
            f"~{SMALLEST_REPLY / 1e3:.1f} kB (Flower's envelope and metrics), so the search "
            f"reaches x{top:,.0f} at most; use --min-ratio {math.floor(top)} or less")
    return top


@dataclass
class TrialResult:
    """One point of the search: its setting and what it measured, mean over its seeds."""

    number: int
    uplink: str
    server_momentum: float
    uplink_ratio: float
    uplink_mb: float
    val_accuracy: float
    seeds: list[int] = field(default_factory=list)
    val_per_seed: list[float] = field(default_factory=list)
    pareto: bool = False
    chosen: bool = False
    duplicate_of: int | None = None  # a better trial of the same uplink spec


@dataclass
class Confirmation:
    """The chosen setting and ``uplink=none``, re-run on fresh seeds (test figures)."""

    seeds: list[int]
    test_per_seed: list[float]
    none_test_per_seed: list[float]
    uplink_ratio: float
    total_ratio: float

    @property
    def diff_pp(self) -> list[float]:
        return [100 * (a - b) for a, b in zip(self.test_per_seed, self.none_test_per_seed,
                                              strict=True)]


def setting(ratio: float, bits: int, quantize_small: bool, momentum: float) -> dict[str, Any]:
    """The run-config overrides of one point of the search space."""
    spec = f"budget:x{max(1, round(ratio))}|q:{bits}|ans" + ("|pass:0" if quantize_small else "")
    out: dict[str, Any] = {"uplink": spec}
    if momentum > 0.0:
        out.update({"server-opt": "avgm", "server-momentum": round(momentum, 3)})
    return out


def final_figures(res: RunResults) -> tuple[float, float, float, float, int]:
    """(val accuracy, test accuracy, uplink ratio, uplink MB, total bytes) of a run."""
    final, last = res.final, res.rounds[-1] if res.rounds else None
    if final is None or final.comm is None or last is None or last.central is None \
            or last.central.val is None:
        raise RuntimeError("the run ended without central validation figures")
    return (last.central.val.accuracy, final.test_accuracy, final.comm.uplink_ratio or 1.0,
            final.comm.uplink_bytes / 1e6, final.comm.total_bytes)


def pareto_front(trials: list[TrialResult]) -> list[TrialResult]:
    """Trials no other trial beats on both val accuracy and uplink reduction, one per
    uplink spec (the others of a spec are marked ``duplicate_of`` its best)."""
    best: dict[str, TrialResult] = {}
    for t in trials:
        kept = best.get(t.uplink)
        if kept is None or t.val_accuracy > kept.val_accuracy:
            best[t.uplink] = t
    for t in trials:
        top = best[t.uplink]
        t.duplicate_of = None if top is t else top.number
    distinct = list(best.values())
    front = []
    for t in distinct:
        dominated = any(o.val_accuracy >= t.val_accuracy and o.uplink_ratio >= t.uplink_ratio
                        and (o.val_accuracy > t.val_accuracy or o.uplink_ratio > t.uplink_ratio)
                        for o in distinct)
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: t.uplink_ratio)


def choose(front: list[TrialResult], min_ratio: float) -> TrialResult | None:
    """Best val accuracy on the front among trials with >= ``min_ratio`` (ties: smaller)."""
    ok = [t for t in front if t.uplink_ratio >= min_ratio]
    return max(ok, key=lambda t: (t.val_accuracy, t.uplink_ratio)) if ok else None


Runner = Callable[[dict[str, Any], int], RunResults]


def subprocess_runner(num_clients: int, rounds: int, extra: list[str]) -> Runner:
    """One real federation per call (``fedslim simulate`` in a subprocess)."""
    def run(overrides: dict[str, Any], seed: int) -> RunResults:
        return simulate_subprocess({**overrides, "seed": seed}, num_clients, rounds, extra)[0]
    return run


def score(overrides: dict[str, Any], seeds: list[int], run: Runner
          ) -> tuple[list[float], float, float]:
    """(val per seed, mean uplink ratio, mean uplink MB) of one setting."""
    figures = [final_figures(run(overrides, s)) for s in seeds]
    return ([f[0] for f in figures], statistics.mean(f[2] for f in figures),
            statistics.mean(f[3] for f in figures))


def run_search(trials: int, seeds: list[int], sampler_seed: int, top_ratio: float,
               run: Runner, on_trial: Any = None) -> list[TrialResult]:
    """Run the optuna study; ``on_trial(result, failure)`` is called after each trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "maximize"],
                                sampler=optuna.samplers.TPESampler(seed=sampler_seed))
    results: list[TrialResult] = []

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        overrides = setting(trial.suggest_float("ratio", MIN_RATIO, top_ratio, log=True),
                            trial.suggest_categorical("bits", list(BITS)),
                            trial.suggest_categorical("quantize_small", [False, True]),
                            trial.suggest_float("server_momentum", *MOMENTUM_RANGE))
        try:
            vals, ratio, mb = score(overrides, seeds, run)
        except RuntimeError as exc:  # e.g. a budget below the model's fixed cost
            if on_trial is not None:
                on_trial(None, f"trial {trial.number}: {overrides['uplink']} failed: "
                         f"{str(exc).strip().splitlines()[-1][:160]}")
            raise optuna.TrialPruned() from None
        result = TrialResult(trial.number, overrides["uplink"],
                             float(overrides.get("server-momentum", 0.0)), ratio, mb,
                             statistics.mean(vals), list(seeds), vals)
        results.append(result)
        if on_trial is not None:
            on_trial(result, None)
        return result.val_accuracy, math.log10(ratio)

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


def confirm(chosen: TrialResult, seeds: list[int], run: Runner) -> Confirmation:
    """Re-run the chosen setting and ``uplink=none`` on ``seeds`` (not used to choose)."""
    mine = [final_figures(run(setting_of(chosen), s)) for s in seeds]
    none = [final_figures(run({"uplink": "none"}, s)) for s in seeds]
    return Confirmation(
        seeds=list(seeds), test_per_seed=[m[1] for m in mine],
        none_test_per_seed=[n[1] for n in none],
        uplink_ratio=statistics.mean(m[2] for m in mine),
        total_ratio=statistics.mean(n[4] / m[4] for m, n in zip(mine, none, strict=True)))


def setting_of(trial: TrialResult) -> dict[str, Any]:
    out: dict[str, Any] = {"uplink": trial.uplink}
    if trial.server_momentum > 0.0:
        out.update({"server-opt": "avgm", "server-momentum": trial.server_momentum})
    return out


def summary_lines(front: list[TrialResult], chosen: TrialResult | None,
                  confirmation: Confirmation | None, min_ratio: float) -> list[str]:
    """What ``fedslim tune`` prints after the search: the front, then the choice."""
    lines = ["Pareto front (validation, mean over the scoring seeds; one trial per spec): "
             "uplink reduction, val accuracy, setting"]
    lines += [f"  x{r.uplink_ratio:>9,.1f}  {r.val_accuracy:.4f}  {r.uplink} momentum "
              f"{r.server_momentum:.2f}" + ("   <- chosen" if r.chosen else "") for r in front]
    if chosen is None:
        lines.append(f"no trial reached x{min_ratio:g} uplink reduction; lower --min-ratio "
                     "or run more --trials")
    elif confirmation is not None:
        diffs = confirmation.diff_pp
        test = confirmation.test_per_seed
        lines.append(
            f"chosen on val: uplink={chosen.uplink} server-momentum="
            f"{chosen.server_momentum:.2f}; re-run on fresh seeds "
            f"{', '.join(map(str, confirmation.seeds))}: uplink x"
            f"{confirmation.uplink_ratio:,.1f}, total x{confirmation.total_ratio:,.1f}, test "
            f"{statistics.mean(test):.4f} (sd {statistics.pstdev(test):.4f}) vs "
            f"{statistics.mean(confirmation.none_test_per_seed):.4f} uncompressed: "
            f"{statistics.mean(diffs):+.2f} pp (per seed "
            f"{', '.join(f'{d:+.2f}' for d in diffs)})")
    return lines


def save(out: Path, results: list[TrialResult], confirmation: Confirmation | None,
         chosen: TrialResult | None, meta: dict[str, Any]) -> list[Path]:
    """tune.json, trials.csv and pareto.png in ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in results]
    (out / "tune.json").write_text(json.dumps({
        **meta, "trials": rows,
        "confirmation": asdict(confirmation) if confirmation else None,
        "chosen": asdict(chosen) if chosen else None}, indent=2))
    with open(out / "trials.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["number"])
        writer.writeheader()
        writer.writerows(rows)
    _plot(out / "pareto.png", results, meta)
    return [out / "tune.json", out / "trials.csv", out / "pareto.png"]


def _plot(path: Path, results: list[TrialResult], meta: dict[str, Any]) -> None:
    from fedslim.bench.plots import _finish, _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 6))
    ax.scatter([r.uplink_ratio for r in results], [100 * r.val_accuracy for r in results],
               c="0.6", s=30, label="trial (mean over its seeds)")
    front = sorted((r for r in results if r.pareto), key=lambda r: r.uplink_ratio)
    ax.plot([r.uplink_ratio for r in front], [100 * r.val_accuracy for r in front], "o-",
            c="C0", label="Pareto front (val, one trial per spec)")
    for r in results:
        ax.annotate(str(r.number), (r.uplink_ratio, 100 * r.val_accuracy), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    for r in results:
        if r.chosen:
            ax.scatter([r.uplink_ratio], [100 * r.val_accuracy], marker="*", s=220, c="C3",
                       zorder=4, label=f"chosen: {r.uplink}")
    _finish(plt, fig, ax, path, "uplink reduction (x, bytes as Flower serialized them)",
            "final central validation accuracy (%), mean over the scoring seeds",
            f"fedslim tune: {meta.get('n_trials')} trials x {len(meta.get('score_seeds', []))} "
            f"seeds, {meta.get('num_clients')} clients, {meta.get('rounds')} rounds")


__all__ = ["Confirmation", "TrialResult", "check_reachable", "choose", "confirm",
           "pareto_front", "run_search", "save", "score", "setting"]
