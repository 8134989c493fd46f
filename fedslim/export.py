"""``fedslim export RUN_DIR``: the run's model pruned and quantized, each file measured.

For the global model (or the best round's, or the distilled student) of a finished run,
writes under ``RUN_DIR/export/``: the dense int8 copy, and per sparsity and mode
(unstructured / structured, see :mod:`fedslim.task.prune`) the pruned model as float32 and
as int8, each in the format that stores only what is kept. Every file is read back and
the model it holds is evaluated on the run's test split (the same split as
``results.json``'s figures), so a figure is that of the file, not of the tensors in memory.
``export.json`` and ``export.csv`` hold the table the command prints.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedslim.config import parse_run_config
from fedslim.errors import ConfigError
from fedslim.protocol import MODEL_FILE, STUDENT_FILE
from fedslim.report import load_results
from fedslim.server.early_stop import BEST_MODEL_FILE
from fedslim.server.storage import atomic_write_bytes, save_model
from fedslim.task.data import load_splits
from fedslim.task.models import build_model
from fedslim.task.prune import apply, masks, pack, read_model_file, sparsity_of
from fedslim.task.ptq import quantize_state_int8
from fedslim.task.train import evaluate

EXPORT_DIR = "export"
WHICH = {"global": MODEL_FILE, "best": BEST_MODEL_FILE, "student": STUDENT_FILE}


@dataclass
class ExportRow:
    file: str
    mode: str            # dense | unstructured | structured
    sparsity: float      # measured share of zeros in the prunable weights
    int8: bool
    file_bytes: int
    test_accuracy: float
    delta_pp: float      # vs the dense float32 model


def export_run(run_dir: Path, sparsities: list[float], which: str = "global"
               ) -> list[ExportRow]:
    """Prune / quantize the run's model, write the files, evaluate each one read back.

    Raises
    ------
    ConfigError
        If the run directory, its results or the chosen model file is missing, or a
        sparsity is outside [0, 1).
    """
    if which not in WHICH:
        raise ConfigError(f"--which={which!r}: expected one of {', '.join(WHICH)}")
    bad = [s for s in sparsities if not 0.0 < s < 1.0]
    if bad:
        raise ConfigError(f"--sparsity {bad[0]}: expected a fraction in (0, 1)")
    source = run_dir / WHICH[which]
    if not source.is_file():
        raise ConfigError(f"{source} does not exist (a finished run writes {MODEL_FILE}; "
                          f"{BEST_MODEL_FILE} needs early-stop-patience, {STUDENT_FILE} "
                          "distill=true)")
    res = load_results(run_dir)
    cfg = parse_run_config(res.config)
    name = res.final.student.model if which == "student" and res.final and \
        res.final.student else cfg.train.model
    splits = load_splits(cfg.data, cfg.fed.seed)
    model = build_model(name, splits.input_shape, splits.num_classes)
    device = torch.device("cpu")
    dense = {k: v.float() if v.is_floating_point() else v
             for k, v in load_file(str(source)).items()}
    out = run_dir / EXPORT_DIR
    out.mkdir(exist_ok=True)

    def measure(file: str, mode: str, int8: bool) -> ExportRow:
        read = read_model_file(out / file)
        model.load_state_dict(read)
        state = {k: read[k] for k in model.state_dict()}  # the model's order: its classifier last
        acc = evaluate(model, splits.test, device).accuracy
        return ExportRow(file, mode, round(sparsity_of(state), 4), int8,
                         (out / file).stat().st_size, acc, 0.0)

    meta = {"model": name, "source": WHICH[which]}
    save_model(out / "dense.safetensors", dense, meta)
    rows = [measure("dense.safetensors", "dense", False)]
    save_model(out / "dense-int8.safetensors", quantize_state_int8(dense), meta)
    rows.append(measure("dense-int8.safetensors", "dense", True))
    for structured in (False, True):
        mode = "structured" if structured else "unstructured"
        for s in sparsities:
            kept = masks(dense, s, structured)
            pruned = apply(dense, kept, structured)
            for int8 in (False, True):
                file = f"{mode}-{round(100 * s)}{'-int8' if int8 else ''}.safetensors"
                tensors, fmeta = pack(pruned, kept, structured, int8)
                save_model(out / file, tensors, {**meta, **fmeta})
                rows.append(measure(file, mode, int8))
    base = rows[0].test_accuracy
    for r in rows:
        r.delta_pp = round(100 * (r.test_accuracy - base), 2)
    _write_table(out, rows)
    return rows


def _write_table(out: Path, rows: list[ExportRow]) -> None:
    data = [dataclasses.asdict(r) for r in rows]
    atomic_write_bytes(out / "export.json", (json.dumps(data, indent=2) + "\n").encode())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(data[0]))
    w.writeheader()
    w.writerows(data)
    atomic_write_bytes(out / "export.csv", buf.getvalue().encode())
