"""The ``fedslim`` command: run simulations, print the configuration reference, benchmark.

    fedslim simulate --num-clients 10 --rounds 20 --partition dirichlet --alpha 0.5
    fedslim config --format markdown
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from fedslim.config import key_table, parse_cli_overrides, parse_run_config
from fedslim.errors import FedslimError
from fedslim.protocol import MODEL_FILE, RESULTS_FILE
from fedslim.report import ResultsError, load_results

cli = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="fedslim: communication-efficient federated training on Flower.")


def simulation_backend_config(num_cpus_per_client: float, gpus_per_client: float
                              ) -> dict[str, Any]:
    return {"client_resources": {"num_cpus": num_cpus_per_client,
                                 "num_gpus": gpus_per_client},
            "init_args": {"num_cpus": os.cpu_count() or 1}}


def run_simulation_with(overrides: dict[str, Any], num_clients: int,
                        cpus_per_client: float = 1.0, gpus_per_client: float = 0.0
                        ) -> Path:
    """Run the fedslim ServerApp/ClientApp in Flower's simulation engine (Ray backend).

    Returns the output directory. Raises ConfigError before anything starts if the
    overrides are invalid.
    """
    from flwr.simulation import run_simulation

    from fedslim.client.app import make_client_app
    from fedslim.server.app import make_server_app

    cfg = parse_run_config(overrides=overrides)  # validate early, with a clear error
    run_simulation(
        server_app=make_server_app(overrides), client_app=make_client_app(overrides),
        num_supernodes=num_clients,
        backend_config=simulation_backend_config(cpus_per_client, gpus_per_client),
    )
    return Path(cfg.fed.output_dir).expanduser().resolve()


@cli.command()
def simulate(
    num_clients: Annotated[int, typer.Option(help="Number of simulated SuperNodes.")] = 10,
    rounds: Annotated[int | None, typer.Option(help="num-server-rounds")] = None,
    partition: Annotated[str | None, typer.Option(help="iid | dirichlet | pathological")] = None,
    alpha: Annotated[float | None, typer.Option(help="dirichlet-alpha")] = None,
    output_dir: Annotated[str | None, typer.Option(help="output-dir")] = None,
    run_config: Annotated[list[str] | None, typer.Option(
        "--run-config", "-c", help="key=value run-config override (repeatable)")] = None,
    cpus_per_client: Annotated[float, typer.Option(help="Ray CPUs per client")] = 1.0,
    gpus_per_client: Annotated[float, typer.Option(help="Ray GPU share per client")] = 0.0,
) -> None:
    """Run a federation in Flower's simulation engine and print where results went."""
    overrides: dict[str, Any] = parse_cli_overrides(run_config)
    for key, value in (("num-server-rounds", rounds), ("partitioning", partition),
                       ("dirichlet-alpha", alpha), ("output-dir", output_dir)):
        if value is not None:
            overrides[key] = value
    try:
        outdir = run_simulation_with(overrides, num_clients, cpus_per_client, gpus_per_client)
    except FedslimError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    try:
        res = load_results(outdir)
    except ResultsError as exc:
        typer.secho(f"error: the run ended without valid results: {exc}", fg=typer.colors.RED,
                    err=True)
        raise typer.Exit(1) from None
    typer.echo(f"results: {outdir / RESULTS_FILE}")
    typer.echo(f"model:   {outdir / MODEL_FILE}")
    if res.final is not None:
        typer.echo(f"final test accuracy: {res.final.test_accuracy:.4f}")


@cli.command("config")
def config_cmd(
    fmt: Annotated[str, typer.Option("--format", help="toml | markdown | json")] = "markdown",
) -> None:
    """Print every run-config key with its default (TOML for pyproject, or a docs table)."""
    rows = key_table()
    if fmt == "toml":
        for key, _t, default, _h in rows:
            typer.echo(f"{key} = {json.dumps(default)}")
    elif fmt == "json":
        typer.echo(json.dumps(parse_run_config().to_flat(), indent=2))
    elif fmt == "markdown":
        typer.echo("| key | type | default | meaning |\n|---|---|---|---|")
        for key, t, default, h in rows:
            typer.echo(f"| `{key}` | {t} | `{json.dumps(default)}` | {h} |")
    else:
        typer.secho(f"error: --format must be toml, markdown or json, not {fmt!r}",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(2)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
