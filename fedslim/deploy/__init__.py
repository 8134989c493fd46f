"""Drive fedslim as a real Flower deployment (SuperLink + SuperNodes as processes).

``python -m fedslim.deploy --num-clients 4 --rounds 3`` runs one on loopback; see
``docs/deployment.md`` for Docker/Podman compose and multi-machine set-ups.
"""

from fedslim.deploy.launcher import (
    CONNECTION,
    DeployError,
    LocalDeployment,
    default_app_dir,
    run_local_deployment,
)
from fedslim.deploy.processes import TAG_ENV, tagged_processes

__all__ = ["CONNECTION", "TAG_ENV", "DeployError", "LocalDeployment", "default_app_dir",
           "run_local_deployment", "tagged_processes"]
