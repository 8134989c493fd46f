"""A new user's first hour: mistakes are one line before anything starts, the console is
quiet, Ctrl-C stops everything, nothing hangs (issue: a new user's first hour)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import session_processes
from tests.e2e.helpers import ROOT

ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def _fedslim(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedslim.cli", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,fragments", [
    (["--num-clients", "0"], ["--num-clients=0", "at least 1"]),
    (["--num-clients", "1"], ["--num-clients=1", "min-available-nodes=2", "wait"]),
    (["--num-clients", "3", "-c", "min-train-nodes=4", "-c", "min-available-nodes=4"],
     ["--num-clients=3", "min-available-nodes=4"]),
    (["-c", "model=nope"], ["'model'", "'nope'", "digits_cnn"]),
    (["-c", "strategy=fedsgd"], ["'strategy'", "'fedsgd'", "fedadam"]),
    (["-c", "uplink=topk:2"], ["'uplink'", "topk:2%", "topk:k=2"]),
    (["-c", "local-epochs=-3"], ["'local-epochs'", "-3", ">= 1"]),
    (["-c", "uplink=budget:x2000|q:4"], ["'uplink'", "302 bytes", "budget:x1008"]),
    (["-c", "uplink=budget:3.5B"], ["'uplink'", "whole number of bytes"]),
    (["-c", "uplink=lowrank:99"], ["'uplink'", "1..63"]),
    (["-c", "uplink=none", "-c", "keyframe-every=8"],
     ["keyframe-every=8", "compressing downlink", "downlink=none"]),
])
def test_user_mistakes_are_one_line_before_anything_starts(tmp_path, args, fragments):
    t0 = time.monotonic()
    proc = _fedslim("simulate", "--output-dir", str(tmp_path / "out"), *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 30  # before Ray: no simulation start-up at all
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not (tmp_path / "out" / "flower.log").exists()


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a directory")
    proc = _fedslim("simulate", "--output-dir", str(target))
    assert proc.returncode == 2
    assert "output-dir" in proc.stderr and "is a file" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_output_dir_that_cannot_be_created_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = _fedslim("simulate", "--output-dir", str(tmp_path / "file" / "sub"))
    assert proc.returncode == 2
    assert "output-dir" in proc.stderr and "cannot create" in proc.stderr


def test_bench_comm_names_its_settings_and_refuses_unknown_ones():
    help_text = subprocess.run([sys.executable, "-m", "fedslim.bench.comm", "--help"],
                               cwd=ROOT, env=ENV, capture_output=True, text=True,
                               timeout=60).stdout
    assert "topk 1% + q4, server momentum" in help_text and "default" in help_text
    proc = subprocess.run([sys.executable, "-m", "fedslim.bench.comm", "--settings", "nope"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'nope'" in proc.stderr and "none (FedAvg)" in proc.stderr


@pytest.mark.e2e
def test_main_job_prints_a_line_per_round_and_one_summary(tmp_path):
    """Default console: no Flower/Ray log lines, no ANSI codes when piped; resume=true on
    an empty directory says it starts fresh."""
    out = tmp_path / "out"
    proc = _fedslim("simulate", "--num-clients", "3", "--rounds", "2", "--output-dir", str(out),
                    "-c", "resume=true", timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) <= 8, lines
    assert sum(line.startswith("round ") for line in lines) == 2
    assert any("holds no checkpoint.safetensors; starting from round 1" in x for x in lines)
    assert any(x.startswith("done:") for x in lines)
    assert any("model.safetensors" in x and "flower.log" in x for x in lines)
    assert "\x1b[" not in proc.stdout + proc.stderr
    assert "INFO" not in proc.stdout + proc.stderr
    assert "[ROUND 2/2]" in (out / "flower.log").read_text()


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_the_whole_simulation_at_once(tmp_path, sig):
    """One Ctrl-C (or a launcher's SIGTERM, which Ray would otherwise take over) stops
    every process of the run at once, exit 130, no traceback."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedslim.cli", "simulate", "--num-clients", "3", "--rounds",
         "200", "--output-dir", str(out)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not _rounds_done(out):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.5)
        proc.send_signal(sig)  # one Ctrl-C / one SIGTERM
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr[-2000:]
    time.sleep(1)
    assert session_processes() == {}, "Ctrl-C left processes behind"
    assert _rounds_done(out)  # what completed is on disk and readable


def _rounds_done(out: Path) -> int:
    try:
        return len(json.loads((out / "results.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return 0


def test_a_fixed_spec_the_envelope_dominates_is_said_before_starting() -> None:
    """A small model's replies are mostly Flower's envelope: say what ratio is possible."""
    from fedslim.config import parse_run_config
    from fedslim.preflight import envelope_notice

    notice = envelope_notice(parse_run_config({"model": "digits_mlp",
                                               "uplink": "topk:0.01|q:4"}))
    assert notice is not None and "digits_mlp" in notice and "envelope" in notice
    assert "no reply of this model can be more than ~x128 smaller" in notice
    for quiet in ({"uplink": "topk:0.01|q:4"}, {"uplink": "auto"}, {"uplink": "none"},
                  {"uplink": "budget:x50|q:4|ans|pass:0", "model": "digits_mlp"}):
        assert envelope_notice(parse_run_config(quiet)) is None


def test_compression_under_an_adam_server_step_is_flagged_before_starting() -> None:
    """FedAdam with a compressing uplink measured -47 pp on the quickstart net: say so."""
    from fedslim.config import parse_run_config
    from fedslim.preflight import adaptive_server_notice

    for loud in ({"strategy": "fedadam"}, {"server-opt": "adam"},
                 {"strategy": "fedadam", "uplink": "topk:0.01|q:4"}):
        notice = adaptive_server_notice(parse_run_config(loud))
        assert notice is not None and "Adam" in notice and "-47 pp" in notice, loud
    for quiet in ({}, {"strategy": "fedprox"}, {"strategy": "fedadam", "uplink": "none"},
                  {"server-opt": "avgm"}):
        assert adaptive_server_notice(parse_run_config(quiet)) is None, quiet
