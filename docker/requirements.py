"""Print what a fedslim deployment image installs: pyproject.toml's dependencies, minus
Flower's `simulation` extra (Ray: only `fedslim simulate` uses it; SuperLink, SuperNode and
the ServerApp/ClientApp processes do not).

    python3 docker/requirements.py pyproject.toml > requirements.txt

Standard library only (runs in the bare base image during the build).
"""

import re
import sys
import tomllib


def deployment_requirements(pyproject: str) -> list[str]:
    with open(pyproject, "rb") as fh:
        deps = tomllib.load(fh)["project"]["dependencies"]
    return [re.sub(r"^flwr\[simulation\]", "flwr", dep) for dep in deps]


if __name__ == "__main__":
    print("\n".join(deployment_requirements(sys.argv[1])))
