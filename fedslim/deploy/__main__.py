"""``python -m fedslim.deploy``: a SuperLink and N SuperNodes on loopback, one run, cleanup.

    python -m fedslim.deploy --num-clients 4 --rounds 3 -c local-epochs=1 --output-dir out/dep
    python -m fedslim.deploy --tls ...      # the same over TLS (a fresh CA per deployment)
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from fedslim.config import parse_cli_overrides
from fedslim.deploy.launcher import (
    default_app_dir,
    resolve_run_config,
    run_local_deployment,
)
from fedslim.errors import ConfigError, FedslimError
from fedslim.preflight import adaptive_server_notice, envelope_notice
from fedslim.protocol import MODEL_FILE
from fedslim.report import load_results

cli = typer.Typer(add_completion=False)


def _interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # `kill <launcher>` should clean up like Ctrl-C does (the finally blocks run).
    raise KeyboardInterrupt


@cli.command()
def deploy(
    num_clients: Annotated[int, typer.Option(help="SuperNodes to start.")] = 3,
    rounds: Annotated[int | None, typer.Option(help="num-server-rounds")] = None,
    run_config: Annotated[list[str] | None, typer.Option(
        "--run-config", "-c", help="key=value run-config override (repeatable)")] = None,
    output_dir: Annotated[str | None, typer.Option(help="output-dir (results.json etc.)")
                          ] = None,
    app_dir: Annotated[Path | None, typer.Option(
        help="Flower app directory (default: the fedslim checkout, else the cwd)")] = None,
    workdir: Annotated[Path | None, typer.Option(
        help="Logs, FLWR_HOME and run-config file (default: <output-dir>/deploy)")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds for the whole deployment.")
                       ] = 3600.0,
    restart_nodes: Annotated[bool, typer.Option(
        "--restart-nodes", help="Start a SuperNode again when it dies (default: go on "
        "with the others while min-train-nodes remain).")] = False,
    tls: Annotated[bool, typer.Option(
        "--tls", help="Every API over TLS: a fresh CA and SuperLink certificate in "
        "<workdir>/certs; SuperNodes and flwr verify it.")] = False,
) -> None:
    """Run fedslim on a local SuperLink + SuperNodes (real processes, 127.0.0.1)."""
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        overrides: dict[str, Any] = parse_cli_overrides(run_config)
        if rounds is not None:
            overrides["num-server-rounds"] = rounds
        if output_dir is not None:
            overrides["output-dir"] = output_dir
        app = (app_dir or default_app_dir()).resolve()
        # Plug-ins named in the run config live in the app (as for its own processes).
        if str(app) not in sys.path:
            sys.path.insert(0, str(app))
        cfg, send = resolve_run_config(overrides)
        overrides["output-dir"] = send["output-dir"]  # `{run}` expanded once
        for notice in (envelope_notice(cfg), adaptive_server_notice(cfg)):
            if notice is not None:
                typer.secho(notice, fg=typer.colors.YELLOW, err=True)
        outdir = Path(str(send["output-dir"]))
        work = (workdir or outdir / "deploy").resolve()
        results = run_local_deployment(num_clients, overrides, app,
                                       work, timeout, restart_nodes, tls)
    except ConfigError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except FedslimError as exc:  # DeployError, or any other fedslim rejection
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.secho("interrupted; all deployment processes were stopped",
                    fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    final = load_results(results).final
    typer.echo(f"results: {results}")
    typer.echo(f"model:   {results.parent / MODEL_FILE}")
    typer.echo(f"logs:    {work / 'logs'}")
    if final is not None:
        typer.echo(f"final test accuracy: {final.test_accuracy:.4f}")


def main() -> None:
    cli(prog_name="python -m fedslim.deploy")


if __name__ == "__main__":
    main()
