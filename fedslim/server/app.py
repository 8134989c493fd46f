"""The fedslim ServerApp: the strategy stack from config, ``Strategy.start``, records.

The stack is assembled from the same public parts a user would use in their own app::

    Offset(Compressed(Distilled(<strategy>, Distiller(...)), uplink=..., downlink=...))

(``Distilled`` only with ``distill=true``; ``Offset`` only when resuming). The parts
report into one :class:`~fedslim.report.RoundCollector`; the central evaluation closes
each round, which is then printed, written to ``results.json`` and checkpointed.

``app`` is what ``pyproject.toml`` points Flower at; ``make_server_app(overrides)`` builds
the same app with run-config overrides baked in (used by ``fedslim simulate``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedslim.config import RunConfig, parse_run_config
from fedslim.errors import CheckpointError
from fedslim.protocol import MODEL_FILE
from fedslim.report import (
    Central,
    CommTotals,
    EvalMetrics,
    FinalReport,
    RoundCollector,
    RoundReport,
    RunResults,
    from_dict,
)
from fedslim.server.recorder import RunRecorder
from fedslim.server.storage import Checkpoint, load_checkpoint, save_checkpoint, save_model
from fedslim.strategies.compressed import Compressed
from fedslim.strategies.distill import Distilled, Distiller
from fedslim.strategies.registry import build_strategy
from fedslim.strategies.wrapper import Offset, StrategyWrapper
from fedslim.task.data import Splits, load_splits
from fedslim.task.models import build_model, count_params
from fedslim.task.train import evaluate, select_device

# Keys that may differ between an interrupted run and its resumption.
RESUME_FREE_KEYS = {"num-server-rounds", "resume", "output-dir", "progress", "round-timeout"}


def initial_model(cfg: RunConfig, splits: Splits) -> torch.nn.Module:
    """The round-0 global model: seeded, so every run with this seed starts equal."""
    torch.manual_seed(cfg.fed.seed)
    return build_model(cfg.train.model, splits.input_shape[0], splits.num_classes)


def _check_resumable(ckpt: Checkpoint, cfg: RunConfig, path: Path) -> None:
    now = cfg.to_flat()
    diff = {k: (ckpt.config.get(k), now[k]) for k in now
            if k not in RESUME_FREE_KEYS and ckpt.config.get(k) != now[k]}
    if diff:
        raise CheckpointError(f"cannot resume from {path}: run-config differs from the "
                              f"checkpoint's (key: (checkpoint, now)): {diff}")


@dataclass
class Stack:
    """The strategy to run, and the parts the ServerApp talks to directly."""

    strategy: StrategyWrapper
    collector: RoundCollector
    distiller: Distiller | None


def build_stack(cfg: RunConfig, splits: Splits, device: torch.device,
                round_offset: int = 0) -> Stack:
    """Assemble fedslim's strategy stack from the run config."""
    collector = RoundCollector()
    inner = build_strategy(cfg)
    distiller = None
    if cfg.distill.distill:
        distiller = Distiller(cfg.distill, splits, cfg.train.model, device, cfg.fed.seed)
        inner = Distilled(inner, distiller, num_rounds=cfg.fed.num_server_rounds,
                          collector=collector)
    strategy: StrategyWrapper = Compressed(
        inner, uplink=cfg.comp.uplink, downlink=cfg.comp.downlink,
        error_feedback=cfg.comp.error_feedback, warmup_rounds=cfg.comp.warmup_rounds,
        seed=cfg.fed.seed, collector=collector)
    if round_offset:
        strategy = Offset(strategy, round_offset)
    return Stack(strategy=strategy, collector=collector, distiller=distiller)


def _eval_metrics(model: torch.nn.Module, splits: Splits, device: torch.device) -> Central:
    test = evaluate(model, splits.test, device)
    val = evaluate(model, splits.val, device)
    return Central(test=EvalMetrics(test.accuracy, test.loss),
                   val=EvalMetrics(val.accuracy, val.loss))


def _history(ckpt: Checkpoint, start_round: int) -> list[RoundReport]:
    return [from_dict(RoundReport, h, "checkpoint history") for h in ckpt.history
            if h["round"] <= start_round]


def run_server(grid: Grid, cfg: RunConfig) -> RunResults:
    """Run the whole federation; returns the final results (also in ``results.json``)."""
    outdir = Path(cfg.fed.output_dir).expanduser().resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    if isinstance(getattr(grid, "pull_interval", None), float):
        # Flower's in-memory (simulation) grid polls for replies every 0.1 s, twice per
        # round; 10 ms removes most of that idle time at negligible CPU cost.
        grid.pull_interval = min(grid.pull_interval, 0.01)  # type: ignore[attr-defined]
    splits = load_splits(cfg.data, cfg.fed.seed)
    device = select_device(cfg.train.device)
    model = initial_model(cfg, splits)
    flat = cfg.to_flat()

    start_round, history, strategy_state = 0, [], {}
    if cfg.fed.resume:
        ckpt = load_checkpoint(outdir)
        if ckpt is not None:
            _check_resumable(ckpt, cfg, outdir)
            model.load_state_dict(ckpt.model)
            start_round, strategy_state = ckpt.round, ckpt.strategy_state
            history = _history(ckpt, start_round)
    remaining = cfg.fed.num_server_rounds - start_round

    stack = build_stack(cfg, splits, device, round_offset=start_round)
    stack.strategy.load_state_dict(strategy_state)
    stack.collector.history = list(history)
    recorder = RunRecorder(
        outdir=outdir, config=flat, total_rounds=cfg.fed.num_server_rounds, history=history,
        progress=cfg.fed.progress,
        resumed_from_round=start_round if cfg.fed.resume and start_round else None,
        model={"name": cfg.train.model, "num_params": count_params(model)},
        data={"clients_pool": len(splits.clients), "val": len(splits.val),
              "test": len(splits.test), "proxy": len(splits.proxy_x)})
    if cfg.fed.progress:
        recorder.console.print(
            f"[bold]fedslim[/bold]: {cfg.train.model} on {cfg.data.dataset.value}, "
            f"{cfg.data.partitioning.value} partitions, strategy {cfg.fed.strategy}, "
            f"rounds {start_round + 1}..{cfg.fed.num_server_rounds}, output {outdir}")

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        central = _eval_metrics(model, splits, device)
        metrics = MetricRecord({"test-accuracy": central.test.accuracy,
                                "test-loss": central.test.loss,
                                "val-accuracy": central.val.accuracy,
                                "val-loss": central.val.loss})
        if server_round == 0:
            recorder.start_round_clock()
            return metrics
        report = stack.collector.close(central, recorder.round_seconds())
        if report is None:  # nothing was reported for this round (cannot happen normally)
            report = RoundReport(round=server_round + start_round, central=central)
        recorder.record_round(report)
        save_checkpoint(outdir, Checkpoint(
            round=report.round, model={k: v.clone() for k, v in model.state_dict().items()},
            strategy_state=stack.strategy.state_dict(),
            history=[dataclasses.asdict(h) for h in recorder.history], config=flat))
        recorder.write()
        return metrics

    t0 = time.perf_counter()
    if remaining > 0:
        result = stack.strategy.start(
            grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=remaining,
            timeout=cfg.fed.round_timeout, train_config=ConfigRecord({}),
            evaluate_config=ConfigRecord({}), evaluate_fn=central_evaluate)
        if len(result.arrays) > 0:
            model.load_state_dict(result.arrays.to_torch_state_dict())
    final_state = {k: v.clone() for k, v in model.state_dict().items()}
    model_bytes = save_model(outdir / MODEL_FILE, final_state,
                             {"model": cfg.train.model, "fedslim": "global-model"})
    central = _eval_metrics(model, splits, device)
    final = FinalReport(
        test_accuracy=central.test.accuracy, test_loss=central.test.loss,
        val_accuracy=central.val.accuracy, val_loss=central.val.loss,
        rounds_completed=cfg.fed.num_server_rounds, fl_seconds=time.perf_counter() - t0,
        model_file=MODEL_FILE, model_file_bytes=model_bytes,
        comm=CommTotals.of(recorder.history))
    if stack.distiller is not None:
        final.student = stack.distiller.export(outdir, count_params(model))
    path = recorder.write(final)
    if cfg.fed.progress:
        recorder.console.print(f"[bold]done[/bold]: test accuracy {central.test.accuracy:.4f}; "
                               f"results in {path}")
    return recorder.results(final)


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """Build the ServerApp; ``overrides`` win over ``context.run_config``."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, parse_run_config(context.run_config, overrides))

    return server_app


app = make_server_app()
