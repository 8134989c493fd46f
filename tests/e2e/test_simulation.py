"""End-to-end: real Flower simulations (Ray backend) driven through the fedslim CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from fedslim.deploy.simulation import LocalSimulation
from fedslim.report import load_results
from fedslim.task.models import build_model
from tests.e2e.helpers import ROOT, simulate

pytestmark = pytest.mark.e2e


def test_three_clients_two_rounds(tmp_path):
    res = simulate(tmp_path / "run", 3, 2)
    rounds = res["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["replies"] == 3 and r["failures"] == 0
        assert 0.0 <= r["central"]["test"]["accuracy"] <= 1.0
        assert r["train"]["num-examples"] > 0 and r["federated_evaluate"]["num-examples"] > 0
    assert res["final"]["test_accuracy"] > 0.2  # chance is 0.1
    state = load_file(str(tmp_path / "run" / res["final"]["model_file"]))
    model = build_model(res["config"]["model"])
    model.load_state_dict(state)  # loads into the registry's architecture
    assert res["model"]["num_params"] == sum(p.numel() for p in model.parameters())
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()
    # what a person reads: report.md with the curves, the confusion matrix, the clients
    out = tmp_path / "run"
    for name in ("report.md", "rounds.csv", "curves.png", "confusion.png", "clients.csv",
                 "clients.png"):
        assert (out / name).stat().st_size > 0, name
    conf = res["final"]["confusion"]
    assert sum(map(sum, conf["matrix"])) == res["data"]["test"]
    assert res["final"]["client_accuracy"]["clients"] == 3
    report = (out / "report.md").read_text()
    assert f"{res['final']['test_accuracy']:.4f}" in report and "confusion.png" in report
    assert len((out / "rounds.csv").read_text().splitlines()) == 1 + 2


@pytest.mark.parametrize("uplink", ["none", "topk:0.1|q:4"])
def test_resume_equals_uninterrupted_run(tmp_path, uplink):
    """Interrupted after round 1 and resumed == uninterrupted, also with compression both
    ways: server momentum, the server's downlink residual and (from the nodes' files) each
    client's error-feedback residual all carry over."""
    full = tmp_path / "full"
    part = tmp_path / "part"
    extra = ("-c", f"uplink={uplink}", "-c", "server-opt=avgm")
    simulate(full, 3, 3, *extra)
    simulate(part, 3, 1, *extra)
    res = simulate(part, 3, 3, "-c", "resume=true", *extra)
    assert res["resumed_from_round"] == 1
    assert [r["round"] for r in res["rounds"]] == [1, 2, 3]
    a = load_file(str(full / "model.safetensors"))
    b = load_file(str(part / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_bad_config_fails_fast_with_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fedslim.cli", "simulate", "--num-clients", "2", "-c",
         "partitioning=random", "--output-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "partitioning" in proc.stderr and "unknown partitioner" in proc.stderr


def test_flwr_run_in_local_simulation(tmp_path):
    """`flwr run .` with the repo as-is, against a simulation SuperLink with 3 SuperNodes.

    The SuperLink is ours (free port, throw-away FLWR_HOME, tracked PID), not Flower's
    detached default on port 39091, so nothing outlives the test.
    """
    outdir = tmp_path / "out"
    with LocalSimulation(tmp_path / "sim") as sim:
        sim.run(ROOT, {"num-server-rounds": 2, "output-dir": str(outdir), "progress": False},
                num_supernodes=3, done=lambda: _final(outdir))
        pids = sim.pids()
    res = load_results(outdir)
    assert [r.round for r in res.rounds] == [1, 2]
    assert res.final is not None and res.final.test_accuracy > 0.2
    assert not [p for p in pids if _alive(p)]


def test_run_app_exits_non_zero_when_the_run_fails_or_the_config_is_bad(tmp_path):
    """`flwr run --stream` exits 0 when the ServerApp fails; `fedslim run-app` asks the
    SuperLink how the run ended. A key that does not parse never starts anything."""
    def run_app(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fedslim.cli", "run-app", str(ROOT), "--num-supernodes",
             "2", "-c", "num-server-rounds=1", "-c", f"output-dir={tmp_path / 'o'}", *extra],
            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    bad = run_app("-c", "model=nope")
    assert bad.returncode == 2 and "unknown model 'nope'" in bad.stderr
    assert "flwr run" not in bad.stdout  # nothing was started
    failed = run_app("-c", "dataset=npz", "-c", f"data-dir={tmp_path / 'missing'}")
    assert failed.returncode == 1
    assert "ended with status finished:failed" in failed.stderr


def _final(outdir) -> bool:
    try:
        return load_results(outdir).final is not None
    except Exception:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_kill_9_mid_run_then_resume_loses_no_completed_round(tmp_path):
    """SIGKILL of the whole simulation after round 2 (no clean-up can run): results.json and
    the checkpoint hold the completed rounds; resuming (compressed both ways) finishes the
    run exactly as an uninterrupted one. Two of three clients train per round: the resumed
    process has new (random) node ids, and must still pick the same partitions."""
    import signal as _signal

    from tests.conftest import session_processes

    extra = ("-c", "uplink=topk:0.1|q:4", "-c", "server-opt=avgm", "-c", "fraction-train=0.67")
    full, part = tmp_path / "full", tmp_path / "part"
    simulate(full, 3, 5, *extra)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedslim.cli", "simulate", "--num-clients", "3", "--rounds", "5",
         "--output-dir", str(part), "-c", "progress=false", *extra], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and _done_rounds(part) < 2 and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(_signal.SIGKILL)
    proc.wait()
    for pid in session_processes():  # Ray's processes, orphaned by the kill: ours to stop
        try:
            os.kill(pid, _signal.SIGKILL)
        except ProcessLookupError:
            pass
    done = _done_rounds(part)
    assert 2 <= done < 5, done
    res = simulate(part, 3, 5, "-c", "resume=true", *extra)
    assert res["resumed_from_round"] == done
    assert [r["round"] for r in res["rounds"]] == [1, 2, 3, 4, 5]
    a = load_file(str(full / "model.safetensors"))
    b = load_file(str(part / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def _done_rounds(outdir) -> int:
    try:
        return len(json.loads((outdir / "results.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return 0


def test_the_defaults_learn_and_compress_every_message(tmp_path):
    """`auto` both ways on the digits CNN, 10 nodes, Dirichlet 0.5: it starts slower than
    plain FedAvg (error feedback releases the rest of each update later) and is past 0.6 by
    round 10 (measured 0.71 at round 8, seed 42) at >= 50x on the uplink (measured ~120x)."""
    res = simulate(tmp_path / "run", 10, 10, "--partitioning", "dirichlet",
                   "--dirichlet-alpha", "0.5")
    comm = res["final"]["comm"]
    assert res["final"]["test_accuracy"] > 0.6
    assert comm["uplink_ratio"] > 50 and comm["rejected_replies"] == 0
    # downlink (train + evaluate messages) compressed too: all traffic >= 50x below float32
    assert comm["total_bytes"] * 50 < 2 * comm["uplink_none_bytes"]
    assert comm["total_ratio"] > 50  # the same, as the ledger reports it


def test_early_stopping_ends_the_federation_and_keeps_the_best_round(tmp_path):
    """A gain of more than 1.0 in accuracy is impossible: with patience 1 the federation
    stops after round 2 of 6, and round 1's model is the best one kept."""
    res = simulate(tmp_path / "run", 3, 6, "-c", "early-stop-patience=1",
                   "-c", "early-stop-min-delta=1.0", "-c", "local-epochs=1")
    final = res["final"]
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    assert final["error"] is None and final["rounds_completed"] == 2
    assert "stopped after round 2" in final["stopped_early"]
    assert final["best"]["round"] == 1 and final["best"]["model_file"] == "best-model.safetensors"
    assert (tmp_path / "run" / "best-model.safetensors").exists()
