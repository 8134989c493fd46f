"""docs/extending.md, run as written: a model and a data set defined outside the fedslim
package (examples/byo-model-data), through `fedslim simulate`, `flwr run` (via `fedslim
run-app`) and `python -m fedslim.deploy`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedslim.report import load_results
from tests.e2e.helpers import ROOT

pytestmark = pytest.mark.e2e
EXAMPLE = ROOT / "examples" / "byo-model-data"
COMMON = ["-c", "plugins=vibration", "-c", "model=vib_cnn", "-c", "dataset=npz",
          "-c", "layout=channels-last", "-c", "normalize=standardize"]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the example (outside the repository), with its data made up."""
    app = tmp_path_factory.mktemp("byo") / "app"
    shutil.copytree(EXAMPLE, app, ignore=shutil.ignore_patterns("data", "outputs"))
    subprocess.run([sys.executable, "make_data.py", "--train", "900", "--test", "300"],
                   cwd=app, check=True, capture_output=True, timeout=60)
    return app


def _run(cmd: list[str], cwd: Path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_fedslim_simulate_with_a_plugin_model_on_npz_data(app: Path) -> None:
    out = app / "out-sim"
    _run([sys.executable, "-m", "fedslim.cli", "simulate", "--num-clients", "3", "--rounds",
          "3", "--output-dir", str(out), "-c", f"data-dir={app / 'data'}", *COMMON,
          # 3 rounds: plain FedAvg (`auto` starts slower) and 2 local epochs (the app's
          # pyproject, which simulate reads in this directory, says 1)
          "-c", "uplink=none", "-c", "local-epochs=2"], app)
    res = load_results(out)
    assert res.model["name"] == "vib_cnn" and res.data["test"] == 300  # test.npz kept
    assert res.final is not None and res.final.test_accuracy > 0.35  # 4 classes


def test_flwr_run_of_the_example_app(app: Path) -> None:
    out = app / "out-flwr"
    _run([sys.executable, "-m", "fedslim.cli", "run-app", ".", "--num-supernodes", "3",
          "-c", "num-server-rounds=2", "-c", f"data-dir={app / 'data'}",
          "-c", f"output-dir={out}"], app)
    res = load_results(out)
    assert res.config["model"] == "vib_cnn" and res.final is not None
    assert res.final.error is None and len(res.rounds) == 2


def test_simulate_and_flwr_run_give_the_same_model_for_the_same_app(app: Path) -> None:
    """`fedslim simulate` in the app's directory reads its pyproject.toml as `flwr run`
    does: the same config, hence (same seed) the same model bits, as the run above."""
    flwr_out = app / "out-flwr"
    if not (flwr_out / "model.safetensors").exists():
        pytest.skip("needs test_flwr_run_of_the_example_app's run")
    out = app / "out-sim-same"
    _run([sys.executable, "-m", "fedslim.cli", "simulate", "--num-clients", "3",
          "--rounds", "2", "--output-dir", str(out), "-c", f"data-dir={app / 'data'}"], app)
    ours, theirs = load_results(out), load_results(flwr_out)
    free = {"output-dir"}
    assert {k: v for k, v in ours.config.items() if k not in free} == \
        {k: v for k, v in theirs.config.items() if k not in free}
    assert (out / "model.safetensors").read_bytes() == (flwr_out / "model.safetensors"
                                                        ).read_bytes()


def test_deployment_of_the_example_app(app: Path) -> None:
    out = app / "out-deploy"
    _run([sys.executable, "-m", "fedslim.deploy", "--app-dir", ".", "--num-clients", "2",
          "--rounds", "1", "--output-dir", str(out), "-c", f"data-dir={app / 'data'}",
          *COMMON], app)
    res = load_results(out)
    assert res.final is not None and res.final.error is None and res.rounds[0].replies == 2
