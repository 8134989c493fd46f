"""What a person reads after a run: error analysis, curves, a CSV per round, ``report.md``.

Written next to ``results.json`` when a run finishes (:func:`write_run_report`):

* ``rounds.csv`` -- one row per round: accuracy, loss, bytes both ways, cumulative traffic
  and its ratio against plain float32, seconds;
* ``curves.png`` -- test/validation accuracy per round and against cumulative traffic;
* ``confusion.png`` -- the final global model's confusion matrix on the test split (its
  figures, with per-class accuracy and the most-confused pairs, are in ``results.json``
  under ``final.confusion``);
* ``clients.png`` + ``clients.csv`` -- the last federated evaluation: each client's
  accuracy on its own split (summary under ``final.client_accuracy``);
* ``report.md`` -- the final table, the figures above, links to the files.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedslim.report import ClientAccuracy, Confusion, FinalReport, RunResults
from fedslim.server.storage import atomic_write_bytes
from fedslim.task.arrays import ArrayData
from fedslim.task.train import predict_logits

REPORT_FILE = "report.md"
ROUNDS_CSV = "rounds.csv"
CLIENTS_CSV = "clients.csv"
CURVES_PNG = "curves.png"
CONFUSION_PNG = "confusion.png"
CLIENTS_PNG = "clients.png"
MOST_CONFUSED = 5


@torch.no_grad()
def confusion(model: torch.nn.Module, data: ArrayData, num_classes: int,
              device: torch.device) -> Confusion | None:
    """The confusion matrix of ``model`` on ``data`` (None for an empty split)."""
    if len(data) == 0 or num_classes < 1:
        return None
    x, y = data.tensors(device)
    pred = predict_logits(model, x, device).argmax(1)
    index = (y * num_classes + pred).cpu()
    matrix = torch.bincount(index, minlength=num_classes * num_classes)
    m = matrix.reshape(num_classes, num_classes).numpy()
    totals = m.sum(1)
    per_class = [float(m[c, c] / totals[c]) if totals[c] else math.nan
                 for c in range(num_classes)]
    off = m.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None)[::-1][:MOST_CONFUSED]
    pairs = [[int(i // num_classes), int(i % num_classes), int(off.flat[i])]
             for i in order if off.flat[i] > 0]
    return Confusion(matrix=m.astype(int).tolist(), per_class_accuracy=per_class,
                     most_confused=pairs)


def client_summary(round_: int, accuracy: dict[str, float]) -> ClientAccuracy | None:
    """Mean, min, 10th percentile, median, max of the clients' own-split accuracies."""
    values = sorted(accuracy.values())
    if not values:
        return None
    p10 = values[min(len(values) - 1, int(0.1 * len(values)))]
    return ClientAccuracy(round=round_, clients=len(values), mean=statistics.fmean(values),
                          min=values[0], p10=p10, median=statistics.median(values),
                          max=values[-1])


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _cumulative(res: RunResults) -> list[tuple[int, float]]:
    """Per round: (bytes so far both ways, their ratio against plain float32; 0: unknown)."""
    out, sent, plain, known = [], 0, 0, True
    for r in res.rounds:
        if r.comm is not None:
            sent += r.comm.total_bytes
            plain += r.comm.total_none_bytes
            known = known and r.comm.downlink_none_bytes > 0
        out.append((sent, plain / sent if known and sent and plain else 0.0))
    return out


def _rounds_csv(res: RunResults, path: Path) -> None:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["round", "test_accuracy", "test_loss", "val_accuracy", "val_loss",
                "uplink_bytes", "downlink_bytes", "cumulative_bytes",
                "cumulative_total_ratio", "replies", "rejected", "round_seconds"])
    for r, (sent, ratio) in zip(res.rounds, _cumulative(res), strict=True):
        c = r.central
        w.writerow([r.round, *(([c.test.accuracy, c.test.loss, c.val.accuracy, c.val.loss])
                               if c else ["", "", "", ""]),
                    r.comm.uplink_bytes + r.comm.uplink_eval_bytes if r.comm else "",
                    r.comm.downlink_bytes + r.comm.downlink_eval_bytes if r.comm else "",
                    sent, f"{ratio:.2f}" if ratio else "",
                    r.replies, len(r.rejects), f"{r.round_seconds:.3f}"])
    atomic_write_bytes(path, out.getvalue().encode())


def _curves(res: RunResults, path: Path) -> None:
    plt = _pyplot()
    pairs = [(r.round, sent / 1e6, r.central) for r, (sent, _) in
             zip(res.rounds, _cumulative(res), strict=True) if r.central is not None]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    test = [100 * c.test.accuracy for _, _, c in pairs]
    val = [100 * c.val.accuracy for _, _, c in pairs]
    for ax, x, label in ((a, [p[0] for p in pairs], "round"),
                         (b, [p[1] for p in pairs], "cumulative traffic, both ways (MB)")):
        ax.plot(x, test, "o-", ms=3, label="test")
        ax.plot(x, val, "s--", ms=3, label="validation")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    a.set_title("accuracy per round", fontsize=10)
    b.set_title("accuracy vs bytes on the wire", fontsize=10)
    _save(fig, path)
    plt.close(fig)


def _confusion_png(conf: Confusion, path: Path) -> None:
    plt = _pyplot()
    m = np.asarray(conf.matrix, dtype=float)
    n = len(m)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n, 1.0 + 0.45 * n))
    rows = m / np.maximum(m.sum(1, keepdims=True), 1)
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    if n <= 20:  # every class on the axes and counts in the cells while they fit
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if rows[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("test split, final global model", fontsize=10)
    _save(fig, path)
    plt.close(fig)


def _clients(accuracy: dict[str, float], csv_path: Path, png_path: Path) -> None:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["client", "accuracy"])
    for who, acc in sorted(accuracy.items(), key=lambda kv: kv[1]):
        w.writerow([who, f"{acc:.6f}"])
    atomic_write_bytes(csv_path, out.getvalue().encode())
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist([100 * v for v in accuracy.values()], bins=min(20, max(5, len(accuracy) // 2)))
    ax.set_xlabel("accuracy on the client's own split (%)")
    ax.set_ylabel("clients")
    ax.set_title(f"{len(accuracy)} clients, last federated evaluation", fontsize=10)
    _save(fig, png_path)
    plt.close(fig)


def _markdown(res: RunResults, final: FinalReport, files: list[str]) -> str:
    cfg = res.config
    lines = [f"# fedslim run: {cfg.get('model')} on {cfg.get('dataset')}", "",
             f"strategy `{cfg.get('strategy')}`, uplink `{cfg.get('uplink')}`, downlink "
             f"`{cfg.get('downlink')}`, {final.rounds_completed} rounds "
             f"({final.rounds_aggregated} aggregated), seed {cfg.get('seed')}, started "
             f"{res.started_at}, {res.wall_seconds:.0f} s.", ""]
    if final.error:
        lines += [f"**error**: {final.error}", ""]
    rows = [("test accuracy", f"{final.test_accuracy:.4f}"),
            ("validation accuracy", f"{final.val_accuracy:.4f}"),
            ("test loss", f"{final.test_loss:.4f}")]
    comm = final.comm
    if comm is not None:
        rows += [("uplink (train replies)", f"{comm.uplink_bytes / 1e6:.3f} MB"
                  + (f", x{comm.uplink_ratio:.1f} vs float32" if comm.uplink_ratio else "")),
                 ("all traffic, both ways", f"{comm.total_bytes / 1e6:.3f} MB"
                  + (f", x{comm.total_ratio:.1f} vs float32" if comm.total_ratio else "")),
                 ("rejected replies", str(comm.rejected_replies))]
    if final.best is not None:
        rows.append(("best round (validation)", f"{final.best.round}: val "
                     f"{final.best.val_accuracy:.4f}, test {final.best.test_accuracy:.4f}"
                     + (f" (`{final.best.model_file}`)" if final.best.model_file else "")))
    if final.stopped_early:
        rows.append(("early stop", final.stopped_early))
    if final.student is not None:
        rows.append(("student", f"{final.student.test_accuracy:.4f} "
                                f"({final.student.params:,} parameters)"))
    if final.client_accuracy is not None:
        ca = final.client_accuracy
        rows.append((f"clients' own splits (round {ca.round})",
                     f"mean {ca.mean:.4f}, min {ca.min:.4f}, 10th pct {ca.p10:.4f}, "
                     f"median {ca.median:.4f}, max {ca.max:.4f} ({ca.clients} clients)"))
    lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    if CURVES_PNG in files:
        lines += [f"![accuracy per round and vs traffic]({CURVES_PNG})", ""]
    if final.confusion is not None:
        conf = final.confusion
        lines += ["## Where the model errs (test split)", "",
                  "| class | " + " | ".join(str(c) for c in range(len(conf.per_class_accuracy)))
                  + " |", "|---|" + "---|" * len(conf.per_class_accuracy),
                  "| accuracy | " + " | ".join(
                      "-" if math.isnan(a) else f"{a:.3f}" for a in conf.per_class_accuracy)
                  + " |", ""]
        if conf.most_confused:
            lines += ["Most confused (true -> predicted: test examples): " + ", ".join(
                f"{t} -> {p}: {n}" for t, p, n in conf.most_confused) + ".", ""]
        if CONFUSION_PNG in files:
            lines += [f"![confusion matrix]({CONFUSION_PNG})", ""]
    if CLIENTS_PNG in files:
        lines += [f"![per-client accuracy]({CLIENTS_PNG})", ""]
    lines += ["Files: " + ", ".join(f"`{f}`" for f in ["results.json", *files]) + ".", ""]
    return "\n".join(lines)


def write_run_report(outdir: Path, res: RunResults, final: FinalReport,
                     client_accuracy: dict[str, float]) -> list[str]:
    """Write the files above (those that have data); return their names."""
    files = [ROUNDS_CSV]
    _rounds_csv(res, outdir / ROUNDS_CSV)
    if any(r.central is not None for r in res.rounds):
        _curves(res, outdir / CURVES_PNG)
        files.append(CURVES_PNG)
    if final.confusion is not None:
        _confusion_png(final.confusion, outdir / CONFUSION_PNG)
        files.append(CONFUSION_PNG)
    if client_accuracy:
        _clients(client_accuracy, outdir / CLIENTS_CSV, outdir / CLIENTS_PNG)
        files += [CLIENTS_CSV, CLIENTS_PNG]
    files.append(REPORT_FILE)
    atomic_write_bytes(outdir / REPORT_FILE, _markdown(res, final, files).encode())
    return files
