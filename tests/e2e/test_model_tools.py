"""The model-side toolkit end to end: a run, `fedslim export` (pruned + int8 files read back
and evaluated), recovery rounds from a pruned file with the mask fixed, and init-from's
one-line refusal."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fedslim.task.prune import read_model_file
from tests.e2e.helpers import ROOT, run_fedslim, simulate

pytestmark = pytest.mark.e2e


def test_export_then_recovery_rounds_keep_the_mask(tmp_path):
    dense = tmp_path / "dense"
    simulate(dense, 3, 2, "-c", "local-epochs=1")
    proc = run_fedslim(["export", str(dense), "--sparsity", "0.8"])
    assert "unstructured-80-int8.safetensors" in proc.stdout
    rows = json.loads((dense / "export" / "export.json").read_text())
    by_file = {r["file"]: r for r in rows}
    assert by_file["unstructured-80.safetensors"]["sparsity"] == 0.8
    assert by_file["structured-80-int8.safetensors"]["file_bytes"] < \
        by_file["dense.safetensors"]["file_bytes"] / 10
    pruned = dense / "export" / "unstructured-80.safetensors"
    rec = tmp_path / "recover"
    res = simulate(rec, 3, 1, "-c", f"init-from={pruned}", "-c", "sparse-training=true",
                   "-c", "local-epochs=1")
    assert res["final"]["error"] is None and res["rounds"][0]["replies"] == 3
    start, after = read_model_file(pruned), read_model_file(rec / "model.safetensors")
    for name, w in start.items():
        if w.ndim >= 2 and bool((w == 0).any()):
            assert bool((after[name][w == 0] == 0).all()), name  # pruned stays pruned
            assert not torch.equal(after[name], w)                # the rest trained


def test_init_from_a_file_that_does_not_fit_is_one_line_before_start(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    proc = subprocess.run(
        [sys.executable, "-m", "fedslim.cli", "simulate", "--num-clients", "2",
         "--output-dir", str(tmp_path / "o"), "-c", f"init-from={tmp_path / 'other.safetensors'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "init-from" in err[0] and "does not fit" in err[0]
    assert "Traceback" not in proc.stderr


def test_fine_tuning_the_head_moves_only_the_head(tmp_path):
    """init-from + trainable=head in a real federation: every other tensor of the final
    global model is bit-identical to the file it started from, and the uplink carries
    little more than the head (frozen tensors' updates are zero)."""
    from safetensors.torch import save_file

    from fedslim.task.models import seeded_model
    start = {k: v.contiguous() for k, v in
             seeded_model("digits_cnn", 7, (1, 8, 8), 10).state_dict().items()}
    save_file(start, str(tmp_path / "pre.safetensors"))
    res = simulate(tmp_path / "ft", 3, 2, "-c", f"init-from={tmp_path / 'pre.safetensors'}",
                   "-c", "trainable=head", "-c", "local-epochs=1")
    assert res["final"]["error"] is None and res["rounds"][-1]["replies"] == 3
    after = read_model_file(tmp_path / "ft" / "model.safetensors")
    moved = {k for k in start if not torch.equal(after[k], start[k])}
    assert moved == {"head.3.weight", "head.3.bias"}
