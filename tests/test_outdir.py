"""A fresh output directory per run by default; an earlier run's results never overwritten
by accident (fedslim.outdir, and the preflight every entry point runs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedslim.cli import prepare_simulation
from fedslim.errors import ConfigError
from fedslim.outdir import check_fresh, expand
from fedslim.protocol import CHECKPOINT_FILE, RESULTS_FILE


def test_a_path_without_the_placeholder_is_kept():
    assert expand("outputs/main") == "outputs/main"
    assert expand("outputs/main", resume=True) == "outputs/main"


def test_each_run_gets_a_new_directory(tmp_path: Path):
    first = Path(expand(str(tmp_path / "{run}")))
    assert first.parent == tmp_path and re.fullmatch(r"\d{8}-\d{6}", first.name)
    first.mkdir()
    second = Path(expand(str(tmp_path / "{run}")))
    assert second != first and not second.exists()  # same second: a suffix, never reuse


def test_a_named_run_is_the_same_in_every_process(tmp_path: Path):
    a = expand(str(tmp_path / "x-{run}"), name="run-7")
    Path(a).mkdir()
    assert expand(str(tmp_path / "x-{run}"), name="run-7") == a == str(tmp_path / "x-run-7")


def test_resume_finds_the_newest_run_with_a_checkpoint(tmp_path: Path):
    import os
    for i, name in enumerate(["20260101-000000", "20260102-000000", "20260103-000000"]):
        (tmp_path / name).mkdir()
        if name != "20260103-000000":  # the newest directory never got a checkpoint
            (tmp_path / name / CHECKPOINT_FILE).write_bytes(b"x")
            os.utime(tmp_path / name / CHECKPOINT_FILE, (1000 + i, 1000 + i))
    assert expand(str(tmp_path / "{run}"), resume=True) == str(tmp_path / "20260102-000000")
    fresh = expand(str(tmp_path / "none-{run}"), resume=True)  # nothing to resume: new
    assert Path(fresh).parent == tmp_path and not Path(fresh).exists()


def test_placeholder_only_in_the_last_part(tmp_path: Path):
    with pytest.raises(ConfigError, match="output-dir"):
        expand(str(tmp_path / "{run}" / "x"))


def test_an_earlier_runs_results_are_not_overwritten(tmp_path: Path):
    (tmp_path / RESULTS_FILE).write_text("{}")
    with pytest.raises(ConfigError) as err:
        check_fresh(tmp_path, resume=False, overwrite=False)
    msg = str(err.value)
    assert "output-dir" in msg and "resume=true" in msg and "overwrite=true" in msg
    check_fresh(tmp_path, resume=True, overwrite=False)
    check_fresh(tmp_path, resume=False, overwrite=True)
    check_fresh(tmp_path / "empty", resume=False, overwrite=False)


def test_simulate_preflight_expands_once_for_every_process(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides: dict = {}
    cfg, out, _ = prepare_simulation(overrides, 2)
    assert out.parent == tmp_path / "outputs" / "fedslim" and out.is_dir()
    # the apps get the concrete directory, not the placeholder
    assert overrides["output-dir"] == str(out) == cfg.fed.output_dir
    (out / RESULTS_FILE).write_text("{}")
    with pytest.raises(ConfigError, match="earlier run"):
        prepare_simulation({"output-dir": str(out)}, 2)
    again: dict = {}
    assert prepare_simulation(again, 2)[1] != out  # the default never collides


def test_a_student_no_smaller_than_its_teacher_is_refused_before_start(tmp_path):
    from fedslim.config import parse_run_config
    from fedslim.preflight import check_student
    with pytest.raises(ConfigError) as err:
        check_student(parse_run_config({"distill": True, "model": "digits_student",
                                        "student-model": "digits_student"}))
    msg = str(err.value)
    assert "student-model" in msg and "no smaller than its teacher" in msg and "\n" not in msg
    check_student(parse_run_config({"distill": True}))  # the default pair is fine


def test_simulate_takes_a_fedslim_apps_pyproject_config_and_ignores_other_apps(tmp_path):
    from fedslim.cli import app_config_notice, app_run_config
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        '[tool.flwr.app.components]\nserverapp = "fedslim.server.app:app"\n'
        'clientapp = "fedslim.client.app:app"\n'
        '[tool.flwr.app.config]\nlocal-epochs = 1\nlearning-rate = 0.05\n')
    base = app_run_config(app)
    assert base == {"local-epochs": 1, "learning-rate": 0.05}
    notice = app_config_notice(base, app)
    assert notice is not None and "local-epochs=1" in notice
    assert "learning-rate" not in notice  # the default already: not news
    stock = tmp_path / "stock"
    stock.mkdir()
    (stock / "pyproject.toml").write_text(
        '[tool.flwr.app.components]\nserverapp = "quickstart.server_app:app"\n'
        '[tool.flwr.app.config]\nlr = 0.1\n')
    assert app_run_config(stock) == {}  # a stock app's keys are not fedslim's
    (app / "pyproject.toml").write_text("[tool.flwr.app\n")
    with pytest.raises(ConfigError, match="pyproject.toml"):
        app_run_config(app)
