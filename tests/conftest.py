"""Shared fixtures: keep Flower's home and all outputs inside pytest's tmp dirs."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture(autouse=True)
def _flwr_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr_home")))


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)
