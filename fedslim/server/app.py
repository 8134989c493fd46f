"""The fedslim ServerApp: the strategy stack from config, ``Strategy.start``, records.

The stack is assembled from the same public parts a user would use in their own app::

    Offset(NodeGuard(Compressed(Guarded(Distilled(<strategy>, Distiller(...))),
                                uplink=..., downlink=...)))

(``Distilled`` only with ``distill=true``; ``Offset`` only when resuming). The parts
report into one :class:`~fedslim.report.RoundCollector`; the central evaluation closes
each round, which is then printed, written to ``results.json`` and checkpointed.

``app`` is what ``pyproject.toml`` points Flower at; ``make_server_app(overrides)`` builds
the same app with run-config overrides baked in (used by ``fedslim simulate``).
"""

from __future__ import annotations

import dataclasses
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedslim.config import RunConfig, parse_run_config
from fedslim.console import FRAMEWORK_LOG, framework_logs
from fedslim.errors import CheckpointError, FedslimError
from fedslim.outdir import check_fresh, expand
from fedslim.protocol import MODEL_FILE
from fedslim.report import (
    Central,
    CommTotals,
    EvalMetrics,
    FinalReport,
    Resources,
    RoundCollector,
    RoundReport,
    RunResults,
    from_dict,
)
from fedslim.server.early_stop import EarlyStop, StopFederation
from fedslim.server.recorder import RunRecorder
from fedslim.server.run_report import client_summary, confusion, write_run_report
from fedslim.server.storage import Checkpoint, load_checkpoint, save_checkpoint, save_model
from fedslim.strategies.compressed import Compressed
from fedslim.strategies.distill import Distilled, Distiller
from fedslim.strategies.guard import Guarded
from fedslim.strategies.keep_zeros import KeepZeros
from fedslim.strategies.registry import build_strategy
from fedslim.strategies.trust import TRUST_STREAM, ServerReference
from fedslim.strategies.wrapper import NodeGuard, Offset, StrategyWrapper
from fedslim.task.data import Splits, load_splits
from fedslim.task.models import build_model, count_params, seeded_model
from fedslim.task.prune import load_init, zero_masks
from fedslim.task.train import evaluate, select_device, train_local

# Keys that may differ between an interrupted run and its resumption.
RESUME_FREE_KEYS = {"num-server-rounds", "resume", "overwrite", "output-dir", "progress",
                    "round-timeout", "verbose", "node-timeout", "early-stop-patience",
                    "early-stop-min-delta"}


def initial_model(cfg: RunConfig, splits: Splits) -> torch.nn.Module:
    """The round-0 global model: seeded, so every run with this seed starts equal, and
    fedslim's ClientApp builds the same one instead of downloading it; or ``init-from``'s
    weights (then sent to each node once)."""
    model = seeded_model(cfg.train.model, cfg.fed.seed, splits.input_shape,
                         splits.num_classes)
    if cfg.fed.init_from:
        load_init(model, Path(cfg.fed.init_from).expanduser())
    return model


def _check_resumable(ckpt: Checkpoint, cfg: RunConfig, path: Path) -> None:
    now = cfg.to_flat()
    diff = {k: (ckpt.config.get(k), now[k]) for k in now
            if k not in RESUME_FREE_KEYS and ckpt.config.get(k) != now[k]}
    if diff:
        raise CheckpointError(f"cannot resume from {path}: run-config differs from the "
                              f"checkpoint's (key: (checkpoint, now)): {diff}")


def server_reference(cfg: RunConfig, splits: Splits, device: torch.device
                     ) -> ServerReference | None:
    """The trust defence's reference: the global model trained on the root set (the
    validation split's first ``defence-trust-examples``) with the clients' settings."""
    if cfg.comp.defence_trust_ratio <= 0 or len(splits.val) == 0:
        return None
    root = splits.val.subset(np.arange(min(len(splits.val), cfg.comp.defence_trust_examples)))
    model = build_model(cfg.train.model, splits.input_shape, splits.num_classes)

    def train(m: torch.nn.Module, server_round: int) -> None:
        train_local(m, root, cfg.train, server_round=server_round,
                    seed_parts=(cfg.fed.seed, TRUST_STREAM), device=device)

    return ServerReference(model, train)


@dataclass
class Stack:
    """The strategy to run, and the parts the ServerApp talks to directly."""

    strategy: StrategyWrapper
    collector: RoundCollector
    distiller: Distiller | None
    compressed: Compressed


def build_stack(cfg: RunConfig, splits: Splits, device: torch.device,
                round_offset: int = 0, zeros: dict[str, torch.Tensor] | None = None
                ) -> Stack:
    """Assemble fedslim's strategy stack from the run config (``zeros``: the weights
    ``sparse-training`` keeps at zero)."""
    collector = RoundCollector()
    inner = build_strategy(cfg)
    distiller = None
    if cfg.distill.distill:
        distiller = Distiller(cfg.distill, splits, cfg.train.model, device, cfg.fed.seed)
        inner = Distilled(inner, distiller, num_rounds=cfg.fed.num_server_rounds,
                          collector=collector)
    inner = Guarded(inner, clip_ratio=cfg.comp.defence_clip_ratio,
                    max_norm=cfg.comp.defence_max_norm,
                    weight_ratio=cfg.comp.defence_weight_ratio,
                    reject_ratio=cfg.comp.defence_reject_ratio,
                    reference=server_reference(cfg, splits, device),
                    trust_ratio=cfg.comp.defence_trust_ratio, collector=collector)
    if cfg.train.sparse_training:
        inner = KeepZeros(inner, zeros or {})
    compressed = Compressed(
        inner, uplink=cfg.comp.uplink, downlink=cfg.comp.downlink_spec,
        error_feedback=cfg.comp.error_feedback.enabled(cfg.fed.fraction_train),
        warmup_rounds=cfg.comp.warmup_rounds,
        seed=cfg.fed.seed, collector=collector,
        # fedslim's ClientApp builds the seeded round-0 model itself (not after a resume)
        shared_init=cfg.comp.shared_init and round_offset == 0 and not cfg.fed.init_from,
        bind=cfg.comp.bind_replies, stream=cfg.comp.stream_aggregation,
        ef_reset_after=cfg.comp.ef_reset_after, keyframe_every=cfg.comp.keyframe_every,
        keyframe=cfg.comp.keyframe)
    strategy: StrategyWrapper = NodeGuard(compressed, cfg.fed.min_available_nodes,
                                          cfg.fed.node_timeout)
    if round_offset:
        strategy = Offset(strategy, round_offset)
    return Stack(strategy=strategy, collector=collector, distiller=distiller,
                 compressed=compressed)


def _eval_metrics(model: torch.nn.Module, splits: Splits, device: torch.device) -> Central:
    test = evaluate(model, splits.test, device)
    val = evaluate(model, splits.val, device)
    return Central(test=EvalMetrics(test.accuracy, test.loss),
                   val=EvalMetrics(val.accuracy, val.loss))


def _history(ckpt: Checkpoint, start_round: int) -> list[RoundReport]:
    return [from_dict(RoundReport, h, "checkpoint history") for h in ckpt.history
            if h["round"] <= start_round]


@dataclass
class ServerRun:
    """One ServerApp run: data, model, strategy stack, recorder; resumed if asked."""

    cfg: RunConfig
    outdir: Path
    splits: Splits
    device: torch.device
    model: torch.nn.Module
    stack: Stack
    recorder: RunRecorder
    start_round: int
    early_stop: EarlyStop
    stopped_early: str | None = None

    @classmethod
    def prepare(cls, cfg: RunConfig, outdir: Path) -> ServerRun:
        splits = load_splits(cfg.data, cfg.fed.seed)
        device = select_device(cfg.train.device)
        model = initial_model(cfg, splits)
        start_round, history, strategy_state = 0, [], {}
        ckpt = load_checkpoint(outdir) if cfg.fed.resume else None
        if ckpt is not None:
            _check_resumable(ckpt, cfg, outdir)
            model.load_state_dict(ckpt.model)
            start_round, strategy_state = ckpt.round, ckpt.strategy_state
            history = _history(ckpt, start_round)
        stack = build_stack(cfg, splits, device, round_offset=start_round,
                            zeros=zero_masks(model.state_dict()))
        stack.strategy.load_state_dict(strategy_state)
        stack.collector.history = list(history)
        recorder = RunRecorder(
            outdir=outdir, config=cfg.to_flat(), total_rounds=cfg.fed.num_server_rounds,
            history=history, progress=cfg.fed.progress,
            resumed_from_round=start_round or None,
            model={"name": cfg.train.model, "num_params": count_params(model)},
            data={"clients_pool": len(splits.clients), "val": len(splits.val),
                  "test": len(splits.test), "proxy": len(splits.proxy_x)})
        early = EarlyStop(cfg.fed.early_stop_patience, cfg.fed.early_stop_min_delta, outdir)
        return cls(cfg, outdir, splits, device, model, stack, recorder, start_round, early)

    def central_evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Flower's ``evaluate_fn``: evaluate, close the round, record and checkpoint it."""
        t0 = time.perf_counter()
        self.model.load_state_dict(arrays.to_torch_state_dict())
        central = _eval_metrics(self.model, self.splits, self.device)
        evaluate_seconds = time.perf_counter() - t0
        metrics = MetricRecord({"test-accuracy": central.test.accuracy,
                                "test-loss": central.test.loss,
                                "val-accuracy": central.val.accuracy,
                                "val-loss": central.val.loss})
        if server_round == 0:
            self.recorder.start_round_clock()
            return metrics
        report = self.stack.collector.close(central, self.recorder.round_seconds())
        if report is None:  # nothing was reported for this round (cannot happen normally)
            report = RoundReport(round=server_round + self.start_round, central=central)
        report.resources = self._resources(report, evaluate_seconds)
        self.recorder.record_round(report)
        stop = self.early_stop.observe(self.recorder.history, self.model,
                                       {"model": self.cfg.train.model,
                                        "fedslim": "best-global-model"})
        save_checkpoint(self.outdir, Checkpoint(
            round=report.round,
            model={k: v.clone() for k, v in self.model.state_dict().items()},
            strategy_state=self.stack.strategy.state_dict(),
            history=[dataclasses.asdict(h) for h in self.recorder.history],
            config=self.recorder.config))
        self.recorder.write()
        if stop is not None and report.round < self.cfg.fed.num_server_rounds:
            self.stopped_early = f"stopped after round {report.round}: {stop}"
            raise StopFederation(self.stopped_early)
        return metrics

    def _resources(self, report: RoundReport, evaluate_seconds: float) -> Resources:
        comm = report.comm
        decode = comm.decode_seconds if comm else 0.0
        aggregate = self.stack.compressed.aggregate_seconds
        rss = report.federated_evaluate.get("peak-rss-mb")
        return Resources(
            client_train_seconds=report.train.get("train-seconds", 0.0),
            client_encode_seconds=comm.encode_seconds if comm else 0.0,
            client_decode_seconds=comm.node_decode_seconds if comm else 0.0,
            server_decode_seconds=decode, server_aggregate_seconds=aggregate,
            server_evaluate_seconds=evaluate_seconds,
            wait_seconds=max(0.0, report.round_seconds - decode - aggregate
                             - evaluate_seconds),
            server_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            client_peak_rss_mb=rss)

    def run(self, grid: Grid) -> None:
        remaining = self.cfg.fed.num_server_rounds - self.start_round
        if remaining <= 0:
            return
        try:
            self._start(grid, remaining)
        except StopFederation:  # the model is the last round's (central_evaluate loaded it)
            pass

    def _start(self, grid: Grid, remaining: int) -> None:
        result = self.stack.strategy.start(
            grid=grid, initial_arrays=ArrayRecord(self.model.state_dict()),
            num_rounds=remaining, timeout=self.cfg.fed.round_timeout,
            train_config=ConfigRecord(dict(self.cfg.client)),
            evaluate_config=ConfigRecord(dict(self.cfg.client)),
            evaluate_fn=self.central_evaluate)
        if len(result.arrays) > 0:  # empty when no round aggregated
            self.model.load_state_dict(result.arrays.to_torch_state_dict())

    def finish(self, fl_seconds: float, error: str | None = None) -> RunResults:
        """Save the model (and student), write the final results, print the summary."""
        cfg = self.cfg
        state = {k: v.clone() for k, v in self.model.state_dict().items()}
        model_bytes = save_model(self.outdir / MODEL_FILE, state,
                                 {"model": cfg.train.model, "fedslim": "global-model"})
        central = _eval_metrics(self.model, self.splits, self.device)
        history = self.recorder.history
        final = FinalReport(
            test_accuracy=central.test.accuracy, test_loss=central.test.loss,
            val_accuracy=central.val.accuracy, val_loss=central.val.loss,
            rounds_completed=len(history),
            rounds_aggregated=sum(r.aggregated for r in history), fl_seconds=fl_seconds,
            model_file=MODEL_FILE, model_file_bytes=model_bytes, comm=CommTotals.of(history))
        if self.stack.distiller is not None:
            final.student = self.stack.distiller.export(self.outdir,
                                                        count_params(self.model))
        final.error = error
        if error is None and history and final.rounds_aggregated == 0:
            final.error = ("no round aggregated: every train reply was rejected or failed "
                           "(see rounds[i].rejects); the saved model is the initial one")
        final.best = self.early_stop.final(history)
        final.stopped_early = self.stopped_early
        final.confusion = confusion(self.model, self.splits.test, self.splits.num_classes,
                                    self.device)
        evaluated_round, accuracy = self.stack.compressed.client_accuracy
        final.client_accuracy = client_summary(evaluated_round, accuracy)
        self.recorder.write(final)
        try:
            files = write_run_report(self.outdir, self.recorder.results(final), final,
                                     accuracy)
        except (OSError, ValueError, RuntimeError) as exc:  # results.json is written
            files = []
            self.recorder.console.print(f"[yellow]report.md not written[/yellow]: {exc}")
        if cfg.fed.progress:
            self.recorder.print_summary(final, files)
        return self.recorder.results(final)


def run_server(grid: Grid, cfg: RunConfig) -> RunResults:
    """Run the whole federation; returns the final results (also in ``results.json``)."""
    outdir = Path(cfg.fed.output_dir).expanduser().resolve()
    check_fresh(outdir, cfg.fed.resume, cfg.fed.overwrite)
    outdir.mkdir(parents=True, exist_ok=True)
    if isinstance(getattr(grid, "pull_interval", None), float):
        # Flower's in-memory (simulation) grid polls for replies every 0.1 s, twice per
        # round; 10 ms removes most of that idle time at negligible CPU cost.
        grid.pull_interval = min(grid.pull_interval, 0.01)  # type: ignore[attr-defined]
    with framework_logs(outdir / FRAMEWORK_LOG, cfg.fed.verbose):
        run = ServerRun.prepare(cfg, outdir)
        if cfg.fed.progress:
            run.recorder.print_header(cfg, run.start_round)
        t0 = time.perf_counter()
        try:
            run.run(grid)
        except FedslimError as exc:  # e.g. nodes never came: say so in results.json too
            run.finish(time.perf_counter() - t0, error=str(exc))
            raise
        return run.finish(time.perf_counter() - t0)


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """Build the ServerApp; ``overrides`` win over ``context.run_config``."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = parse_run_config(context.run_config, overrides)
        # `{run}` left for each process (flwr run): run-<run id>, as the ClientApps name it
        out = expand(cfg.fed.output_dir, cfg.fed.resume, name=f"run-{context.run_id}")
        run_server(grid, dataclasses.replace(
            cfg, fed=dataclasses.replace(cfg.fed, output_dir=out)))

    return server_app


app = make_server_app()
