"""The fedslim ServerApp: strategy from config, ``Strategy.start``, records, checkpoints.

``app`` is what ``pyproject.toml`` points Flower at; ``make_server_app(overrides)`` builds
the same app with run-config overrides baked in (used by ``fedslim simulate``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedslim.config import RunConfig, StrategyName, parse_run_config
from fedslim.errors import CheckpointError
from fedslim.server.recorder import RunRecorder
from fedslim.server.storage import (
    MODEL_NAME,
    Checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_model,
)
from fedslim.strategies.compressed import CompressedFedAvg
from fedslim.strategies.distill import DistillingFedAvg
from fedslim.strategies.fedavg import FedslimFedAvg
from fedslim.task.data import Splits, load_splits
from fedslim.task.models import build_model, count_params
from fedslim.task.ptq import dequantize_state_int8, quantize_state_int8
from fedslim.task.train import evaluate, select_device

# Keys that may differ between an interrupted run and its resumption.
RESUME_FREE_KEYS = {"num-server-rounds", "resume", "output-dir", "progress", "round-timeout"}


def initial_model(cfg: RunConfig, splits: Splits) -> torch.nn.Module:
    """The round-0 global model: seeded, so every run with this seed starts equal."""
    torch.manual_seed(cfg.fed.seed)
    return build_model(cfg.train.model, splits.input_shape[0], splits.num_classes)


def _metrics(rec: MetricRecord | None) -> dict[str, float]:
    return {k: float(v) for k, v in rec.items()} if rec else {}  # type: ignore[arg-type]


def _check_resumable(ckpt: Checkpoint, cfg: RunConfig, path: Path) -> None:
    now = cfg.to_flat()
    diff = {k: (ckpt.config.get(k), now[k]) for k in now
            if k not in RESUME_FREE_KEYS and ckpt.config.get(k) != now[k]}
    if diff:
        raise CheckpointError(f"cannot resume from {path}: run-config differs from the "
                              f"checkpoint's (key: (checkpoint, now)): {diff}")


def build_strategy(cfg: RunConfig, round_offset: int, splits: Splits | None = None,
                   device: torch.device | None = None) -> FedslimFedAvg:
    common = dict(
        fraction_train=cfg.fed.fraction_train,
        fraction_evaluate=cfg.fed.fraction_evaluate,
        min_train_nodes=cfg.fed.min_train_nodes,
        min_evaluate_nodes=min(cfg.fed.min_train_nodes, cfg.fed.min_available_nodes),
        min_available_nodes=cfg.fed.min_available_nodes,
        seed=cfg.fed.seed,
        round_offset=round_offset,
    )
    if cfg.fed.strategy is StrategyName.FLOWER_FEDAVG:
        return FedslimFedAvg(**common)  # type: ignore[arg-type]
    if cfg.distill.distill:
        assert splits is not None and device is not None
        return DistillingFedAvg(comp=cfg.comp, distill=cfg.distill, splits=splits,
                                global_model=cfg.train.model, device=device,
                                num_rounds=cfg.fed.num_server_rounds,
                                **common)  # type: ignore[arg-type]
    return CompressedFedAvg(comp=cfg.comp, **common)  # type: ignore[arg-type]


STUDENT_NAME = "student.safetensors"
STUDENT_INT8_NAME = "student_int8.safetensors"


def export_student(outdir: Path, strategy: DistillingFedAvg, cfg: RunConfig, splits: Splits,
                   device: torch.device, global_params: int) -> dict[str, Any]:
    """Save the student (float32) and a post-training int8 copy; measure both."""
    student = strategy.student
    state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    meta = {"model": cfg.distill.student_model, "fedslim": "distilled-student"}
    fp32_bytes = save_model(outdir / STUDENT_NAME, state, meta)
    fp32 = evaluate(student, splits.test, device)
    q = quantize_state_int8(state)
    int8_bytes = save_model(outdir / STUDENT_INT8_NAME, q, {**meta, "quantized": "int8"})
    qmodel = build_model(cfg.distill.student_model, splits.input_shape[0], splits.num_classes)
    qmodel.load_state_dict(dequantize_state_int8(q))
    int8 = evaluate(qmodel, splits.test, device)
    params = count_params(student)
    return {"model": cfg.distill.student_model, "params": params,
            "param_fraction_of_global": params / global_params,
            "file": STUDENT_NAME, "file_bytes": fp32_bytes, "test_accuracy": fp32.accuracy,
            "val_accuracy": evaluate(student, splits.val, device).accuracy,
            "int8_file": STUDENT_INT8_NAME, "int8_file_bytes": int8_bytes,
            "int8_test_accuracy": int8.accuracy}


def comm_totals(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Cumulative bytes over all recorded rounds (both directions) and the uplink ratio."""
    rows = [h["comm"] for h in history if h.get("comm")]
    if not rows:
        return None
    keys = ("uplink_bytes", "uplink_eval_bytes", "downlink_bytes", "downlink_eval_bytes",
            "uplink_none_bytes", "encode_seconds", "decode_seconds")
    tot: dict[str, Any] = {k: sum(r[k] for r in rows) for k in keys}
    tot["uplink_ratio"] = (tot["uplink_none_bytes"] / tot["uplink_bytes"]
                           if tot["uplink_bytes"] else None)
    tot["total_bytes"] = (tot["uplink_bytes"] + tot["uplink_eval_bytes"]
                          + tot["downlink_bytes"] + tot["downlink_eval_bytes"])
    tot["rejected_replies"] = sum(len(r["rejected"]) for r in rows)
    return tot


def run_server(grid: Grid, cfg: RunConfig) -> dict[str, Any]:
    """Run the whole federation; returns the final ``results.json`` content."""
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
            start_round, history, strategy_state = ckpt.round, ckpt.history, ckpt.strategy_state
    remaining = cfg.fed.num_server_rounds - start_round

    strategy = build_strategy(cfg, round_offset=start_round, splits=splits, device=device)
    strategy.load_state_dict(strategy_state)
    recorder = RunRecorder(
        outdir=outdir, config=flat, total_rounds=cfg.fed.num_server_rounds,
        history=[h for h in history if h["round"] <= start_round], progress=cfg.fed.progress,
        resumed_from_round=start_round if cfg.fed.resume and start_round else None,
        info={"model": {"name": cfg.train.model, "num_params": count_params(model)},
              "data": {"clients_pool": len(splits.clients), "val": len(splits.val),
                       "test": len(splits.test), "proxy": len(splits.proxy_x)}},
    )
    if cfg.fed.progress:
        recorder.console.print(
            f"[bold]fedslim[/bold]: {cfg.train.model} on {cfg.data.dataset.value}, "
            f"{cfg.data.partitioning.value} partitions, rounds {start_round + 1}.."
            f"{cfg.fed.num_server_rounds}, output {outdir}")

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        rnd = server_round + start_round
        model.load_state_dict(arrays.to_torch_state_dict())
        test = evaluate(model, splits.test, device)
        val = evaluate(model, splits.val, device)
        metrics = {"test-accuracy": test.accuracy, "test-loss": test.loss,
                   "val-accuracy": val.accuracy, "val-loss": val.loss}
        if server_round == 0:
            recorder.start_round_clock()
            return MetricRecord(metrics)
        row = {
            "central": {"test": {"accuracy": test.accuracy, "loss": test.loss},
                        "val": {"accuracy": val.accuracy, "loss": val.loss}},
            "train": _metrics(strategy.last_train_metrics),
            "federated_evaluate": _metrics(strategy.last_evaluate_metrics),
            "replies": strategy.last_num_replies,
            "failures": strategy.last_num_failures,
        }
        distilled = getattr(strategy, "last_distill", None)
        if distilled is not None:
            row["distill"] = distilled
        comm = getattr(strategy, "last_comm", None)
        if comm is not None:
            row["comm"] = comm
            tot = comm_totals([*recorder.history, row])
            row["comm_cumulative"] = {k: tot[k] for k in ("uplink_bytes", "downlink_bytes",
                                                          "total_bytes", "uplink_ratio")}
        recorder.record_round(rnd, row)
        save_checkpoint(outdir, Checkpoint(
            round=rnd, model={k: v.clone() for k, v in model.state_dict().items()},
            strategy_state=strategy.state_dict(), history=recorder.history, config=flat))
        recorder.write()
        return MetricRecord(metrics)

    t0 = time.perf_counter()
    if remaining > 0:
        result = strategy.start(
            grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=remaining,
            timeout=cfg.fed.round_timeout, train_config=ConfigRecord({}),
            evaluate_config=ConfigRecord({}), evaluate_fn=central_evaluate)
        model.load_state_dict(result.arrays.to_torch_state_dict())
    final_state = {k: v.clone() for k, v in model.state_dict().items()}
    model_bytes = save_model(outdir / MODEL_NAME, final_state,
                             {"model": cfg.train.model, "fedslim": "global-model"})
    test = evaluate(model, splits.test, device)
    val = evaluate(model, splits.val, device)
    final = {"test_accuracy": test.accuracy, "test_loss": test.loss,
             "val_accuracy": val.accuracy, "val_loss": val.loss,
             "rounds_completed": cfg.fed.num_server_rounds,
             "fl_seconds": time.perf_counter() - t0,
             "model_file": MODEL_NAME, "model_file_bytes": model_bytes,
             "comm": comm_totals(recorder.history)}
    if isinstance(strategy, DistillingFedAvg):
        final["student"] = export_student(outdir, strategy, cfg, splits, device,
                                          count_params(model))
    path = recorder.write(final)
    if cfg.fed.progress:
        recorder.console.print(f"[bold]done[/bold]: test accuracy {test.accuracy:.4f}; "
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
