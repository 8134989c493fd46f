"""Static checks of docker/ that run everywhere (the compose runs themselves are opt-in:
tests/e2e/test_deploy.py -k compose)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def test_the_image_installs_every_dependency_but_ray() -> None:
    out = subprocess.run([sys.executable, str(DOCKER / "requirements.py"),
                          str(DOCKER.parent / "pyproject.toml")], capture_output=True,
                         text=True, check=True, timeout=60).stdout.split()
    declared = tomllib.loads((DOCKER.parent / "pyproject.toml").read_text())["project"][
        "dependencies"]
    assert len(out) == len(declared)
    assert not any("simulation" in req or req.startswith("ray") for req in out)
    assert [r for r in out if r.startswith("flwr")][0].startswith("flwr>=")
    assert set(declared) - set(out) == {r for r in declared if r.startswith("flwr[")}


@pytest.mark.parametrize("name", ["compose.yaml", "compose.tls.yaml"])
def test_compose_files_are_consistent(name: str) -> None:
    spec = yaml.safe_load((DOCKER / name).read_text())
    services = spec["services"]
    assert set(services) == {"superlink", "supernode-0", "supernode-1", "supernode-2", "run"}
    for svc in services.values():
        assert svc["init"] is True  # PID 1 forwards SIGTERM
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):  # a file shipped in docker/
                assert (DOCKER / source).is_file(), f"{name}: {source} missing"
    text = (DOCKER / name).read_text()
    commands = " ".join(str(s.get("command")) for s in services.values())
    if name == "compose.tls.yaml":
        connection = tomllib.loads((DOCKER / "flwr_home_tls" / "config.toml").read_text())[
            "superlink"]["compose"]
        assert "--insecure" not in commands and "insecure" not in connection
        assert connection["root-certificates"] == "/certs/ca.crt"
        assert "volumes" in spec and "certs" in spec["volumes"]
    # Shell `$` must be escaped as `$$`, or compose substitutes it away.
    for line in text.splitlines():
        stripped = line.split("#", 1)[0] if not line.lstrip().startswith("-") else line
        for i, ch in enumerate(stripped):
            if ch == "$" and not (stripped[i + 1: i + 2] in ("{", "$")
                                  or stripped[i - 1: i] == "$"):
                pytest.fail(f"{name}: unescaped $ in {line.strip()!r}")
