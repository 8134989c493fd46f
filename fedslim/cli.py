"""The ``fedslim`` command: run simulations, print the configuration reference, benchmark.

    fedslim simulate --num-clients 10 --rounds 20 --partitioning dirichlet --dirichlet-alpha 0.5
    fedslim config --format markdown
    fedslim tune --trials 20 -c model=digits_tiny
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from fedslim.config import (
    RunConfig,
    key_table,
    parse_cli_overrides,
    parse_run_config,
    typed_value,
)
from fedslim.console import FRAMEWORK_LOG, framework_logs
from fedslim.deploy.processes import TAG_ENV, freeze_tree
from fedslim.errors import ConfigError, FedslimError
from fedslim.preflight import (
    adaptive_server_notice,
    check_budget,
    check_data_dir,
    check_federation_size,
    check_init_from,
    check_output_dir,
    check_student,
    envelope_notice,
)
from fedslim.protocol import RESULTS_FILE
from fedslim.report import ResultsError, load_results

cli = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="fedslim: communication-efficient federated training on Flower.")


def simulation_backend_config(num_cpus_per_client: float, gpus_per_client: float,
                              verbose: bool = False) -> dict[str, Any]:
    init_args: dict[str, Any] = {"num_cpus": os.cpu_count() or 1}
    if not verbose:  # Ray's own start-up chatter and its workers' output stay off the console
        init_args.update({"logging_level": "ERROR", "log_to_driver": False})
    return {"client_resources": {"num_cpus": num_cpus_per_client,
                                 "num_gpus": gpus_per_client},
            "init_args": init_args}


def app_run_config(app_dir: Path) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the Flower app in ``app_dir`` (flattened as ``flwr run``
    reads it) when the app's ServerApp is fedslim's; empty without a pyproject.toml, for
    another app (its keys are not fedslim's: a stock Flower app's directory) or without
    that table.

    Raises
    ------
    ConfigError
        If the file is not valid TOML or its config holds values Flower does not accept.
    """
    import tomllib

    from flwr.common.config import flatten_dict

    path = app_dir / "pyproject.toml"
    if not path.is_file():
        return {}
    try:
        app = tomllib.loads(path.read_text(encoding="utf-8")).get("tool", {}).get(
            "flwr", {}).get("app", {})
        server = str(app.get("components", {}).get("serverapp", ""))
        if not server.startswith("fedslim."):
            return {}
        config = app.get("config", {})
        return dict(flatten_dict(config)) if isinstance(config, dict) else {}
    except (tomllib.TOMLDecodeError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read [tool.flwr.app.config]: {exc}") from None


def app_config_notice(base: dict[str, Any], app_dir: Path) -> str | None:
    """One line naming the app's keys that differ from fedslim's defaults (none: None)."""
    defaults = parse_run_config().to_flat()
    changed = {k: v for k, v in base.items() if defaults.get(k, object()) != v}
    if not changed:
        return None
    shown = ", ".join(f"{k}={v}" for k, v in changed.items())
    return (f"run config from {app_dir / 'pyproject.toml'}: {shown} "
            "(flags and -c override it; --app-dir NONE ignores it)")


def prepare_simulation(overrides: dict[str, Any], num_clients: int
                       ) -> tuple[RunConfig, Path, str | None]:
    """Every check that can fail on user input, before anything starts.

    Returns the parsed config, the (created) output directory and a notice, if any;
    ``overrides["output-dir"]`` is set to that directory (``{run}`` expanded).
    Raises ConfigError naming the key or flag.
    """
    import_path_for_workers()
    cfg = parse_run_config(overrides=overrides)
    check_federation_size(cfg, num_clients)
    check_data_dir(cfg)
    check_budget(cfg)
    check_init_from(cfg)
    check_student(cfg)
    outdir, notice = check_output_dir(cfg)
    if str(outdir) != cfg.fed.output_dir:  # `{run}` expanded: every process uses this one
        overrides["output-dir"] = str(outdir)
        cfg = parse_run_config(overrides=overrides)
    notes = [n for n in (notice, envelope_notice(cfg), adaptive_server_notice(cfg)) if n]
    return cfg, outdir, "\n".join(notes) or None


def run_simulation_with(overrides: dict[str, Any], num_clients: int,
                        cpus_per_client: float = 1.0, gpus_per_client: float = 0.0
                        ) -> Path:
    """Run the fedslim ServerApp/ClientApp in Flower's simulation engine (Ray backend).

    Returns the output directory. Raises ConfigError before anything starts if the
    overrides are invalid.
    """
    cfg, outdir, _ = prepare_simulation(overrides, num_clients)
    _run(cfg, overrides, num_clients, cpus_per_client, gpus_per_client, outdir)
    return outdir


def import_path_for_workers() -> None:
    """Plug-in modules in the current directory must import in Ray's worker processes too:
    put the current directory on ``sys.path`` here and on ``PYTHONPATH`` for them."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if cwd not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([cwd, *parts])


def _run(cfg: RunConfig, overrides: dict[str, Any], num_clients: int, cpus_per_client: float,
         gpus_per_client: float, outdir: Path) -> None:
    # Ray's "will no longer override accelerator env vars" FutureWarning: opt in to the
    # future behaviour (nothing is lent a GPU unless asked) and keep the console quiet.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Large tensors on transparent huge pages in the ClientApp processes (PyTorch reads
    # this when a process starts): a fresh model-sized buffer faults in 2 MB pages, not
    # 4 kB ones (encoding a 10M-parameter update: 105 ms -> 24 ms in the codec).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    _keep_our_sigterm_handler()
    with framework_logs(outdir / FRAMEWORK_LOG, cfg.fed.verbose):
        from flwr.simulation import run_simulation

        from fedslim.client.app import make_client_app
        from fedslim.server.app import make_server_app

        run_simulation(
            server_app=make_server_app(overrides), client_app=make_client_app(overrides),
            num_supernodes=num_clients,
            backend_config=simulation_backend_config(
                cpus_per_client, gpus_per_client, cfg.fed.verbose))


def _keep_our_sigterm_handler() -> None:
    """``ray.init`` replaces the process's SIGTERM handler with ``sys.exit``, which ends
    nothing while Flower's ServerApp thread waits (the run went on after a SIGTERM). Ray
    installs it through one helper; make that helper leave ours in place."""
    try:
        import ray._private.utils as ray_utils
    except ImportError:  # no Ray: nothing replaces our handler
        return
    if hasattr(ray_utils, "set_sigterm_handler"):
        ray_utils.set_sigterm_handler = lambda handler: None


def _interrupted(tag: str, outdir: Path) -> NoReturn:
    """Ctrl-C / SIGTERM: stop every process this run started, say so, exit 130.

    Every process of the run is frozen first (SIGSTOP), then all are killed at once and
    this process ends at once: Ray's core worker in this process ends it with exit code 1
    as soon as it sees its raylet die, so nothing may come between the kills and our exit.
    The ServerApp runs in a thread that cannot be joined while it waits for replies, hence
    ``os._exit``; nothing is lost: results.json and the checkpoint are rewritten
    atomically after every round.
    """
    for stream in (sys.stdout, sys.stderr):  # (a flush racing a writer must not stop us)
        with contextlib.suppress(Exception):
            stream.flush()
    problem, frozen = "", []
    try:
        frozen = freeze_tree(tag)
    except BaseException as exc:  # whatever happens here, the process still ends with 130
        problem = f" (while stopping: {type(exc).__name__}: {exc})"
    with contextlib.suppress(OSError):
        os.write(2, f"interrupted: the simulation was stopped; completed rounds are in "
                    f"{outdir / RESULTS_FILE} (continue with -c resume=true){problem}\n"
                 .encode())
    for pid in frozen:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    os._exit(130)


def _error(message: str, code: int) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@cli.command()
def simulate(
    num_clients: Annotated[int, typer.Option(help="Number of simulated SuperNodes.")] = 10,
    rounds: Annotated[int | None, typer.Option(help="num-server-rounds")] = None,
    partitioning: Annotated[str | None, typer.Option(
        help="partitioning: iid | dirichlet | pathological")] = None,
    dirichlet_alpha: Annotated[float | None, typer.Option(help="dirichlet-alpha")] = None,
    output_dir: Annotated[str | None, typer.Option(help="output-dir")] = None,
    run_config: Annotated[list[str] | None, typer.Option(
        "--run-config", "-c", help="key=value run-config override (repeatable)")] = None,
    app_dir: Annotated[str, typer.Option(
        help="A Flower app directory whose pyproject.toml [tool.flwr.app.config] is the "
        "base run config, as `flwr run` reads it (NONE: fedslim's defaults only)")] = ".",
    cpus_per_client: Annotated[float, typer.Option(help="Ray CPUs per client")] = 1.0,
    gpus_per_client: Annotated[float, typer.Option(help="Ray GPU share per client")] = 0.0,
    verbose: Annotated[bool, typer.Option(
        "--verbose", help="Show Flower's and Ray's logs (default: <output-dir>/flower.log)")
    ] = False,
) -> None:
    """Run a federation in Flower's simulation engine: one line per round, then a summary.

    The run config is fedslim's defaults, then the app's pyproject.toml (`--app-dir`,
    default: the current directory; as `flwr run` reads it), then the flags and `-c`.
    """
    import_path_for_workers()
    app_notice = None
    try:
        base = {} if app_dir == "NONE" else app_run_config(Path(app_dir))
        app_notice = app_config_notice(base, Path(app_dir)) if base else None
        overrides: dict[str, Any] = {**base, **parse_cli_overrides(run_config)}
        for key, value in (("num-server-rounds", rounds), ("partitioning", partitioning),
                           ("dirichlet-alpha", dirichlet_alpha), ("output-dir", output_dir)):
            if value is not None:
                overrides[key] = value
        if verbose:
            overrides["verbose"] = True
        cfg, outdir, notice = prepare_simulation(overrides, num_clients)
    except FedslimError as exc:
        _error(str(exc), 2)
    for line in (app_notice, notice):
        if line:
            typer.secho(line, fg=typer.colors.YELLOW, err=True)
    tag = f"fedslim-simulate-{os.getpid()}-{time.time_ns()}"
    os.environ[TAG_ENV] = tag  # every process Ray starts inherits it: how we find them
    # The handler stops everything itself: a KeyboardInterrupt raised inside Flower's
    # simulation loop leaves its ServerApp thread waiting and the process hanging.
    # (ray.init would replace the SIGTERM one: see _keep_our_sigterm_handler.)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: _interrupted(tag, outdir))
    try:
        _run(cfg, overrides, num_clients, cpus_per_client, gpus_per_client, outdir)
    except FedslimError as exc:
        _error(str(exc), 1)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM
                          else signal.default_int_handler)
    _report(outdir, cfg.fed.progress)


def _report(outdir: Path, progress: bool) -> None:
    try:
        res = load_results(outdir)
    except ResultsError as exc:
        _error(f"the run ended without valid results: {exc}", 1)
    final = res.final
    if final is None:
        _error(f"the run ended before its final results; see {outdir / FRAMEWORK_LOG}", 1)
    if final.error:
        _error(f"{final.error}; results in {outdir / RESULTS_FILE}", 1)
    if not progress:  # the ServerApp printed nothing: one line here
        typer.echo(f"done: test accuracy {final.test_accuracy:.4f}; results in "
                   f"{outdir / RESULTS_FILE}")


@cli.command("run-app")
def run_app(
    app_dir: Annotated[Path, typer.Argument(help="Flower app directory (with pyproject.toml)")
                       ] = Path("."),
    num_supernodes: Annotated[int, typer.Option(help="Simulated SuperNodes.")] = 10,
    run_config: Annotated[list[str] | None, typer.Option(
        "--run-config", "-c", help="key=value run-config override (repeatable)")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds for the whole run.")] = 3600.0,
) -> None:
    """`flwr run` an app in simulation on a SuperLink that fedslim starts and stops.

    Flower's default `local` connection leaves a SuperLink running in the background on
    127.0.0.1:39091 after `flwr run` returns; this command starts its own on a free port
    (with a throw-away FLWR_HOME), prints the run's output as it comes, and stops that
    SuperLink and everything it started when the run ends, fails or is interrupted.
    """
    import tempfile

    from fedslim.deploy.simulation import LocalSimulation

    if num_supernodes < 1:
        _error(f"--num-supernodes={num_supernodes}: needs at least 1", 2)
    if not (app_dir / "pyproject.toml").is_file():
        _error(f"APP_DIR {str(app_dir)!r} has no pyproject.toml: not a Flower app", 2)
    try:
        overrides = {k: typed_value(v) for k, v in parse_cli_overrides(run_config).items()}
        base = app_run_config(app_dir)
        if base:  # a fedslim app: its config with the overrides must parse, before anything
            if str(app_dir.resolve()) not in sys.path:  # its plug-ins live there
                sys.path.insert(0, str(app_dir.resolve()))
            parse_run_config({**base, **overrides})
        with tempfile.TemporaryDirectory(prefix="fedslim-run-app-") as tmp, \
                LocalSimulation(Path(tmp)) as sim:
            sim.run(app_dir, overrides, num_supernodes=num_supernodes, timeout=timeout,
                    echo=True)
    except ConfigError as exc:
        _error(str(exc), 2)
    except FedslimError as exc:
        _error(str(exc), 1)
    except KeyboardInterrupt:  # the with-blocks above have stopped every process
        _error("interrupted; the SuperLink and the run were stopped", 130)


@cli.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A finished run's output directory")],
    sparsity: Annotated[list[float] | None, typer.Option(
        help="Share of weights to prune (repeatable; default 0.5, 0.8, 0.9)")] = None,
    which: Annotated[str, typer.Option(help="global | best | student")] = "global",
) -> None:
    """Prune (unstructured and structured) and int8-quantize a run's model; write each file
    under RUN_DIR/export/ and print its size and test accuracy (of the file read back)."""
    from fedslim.export import export_run

    try:
        rows = export_run(run_dir, sparsity or [0.5, 0.8, 0.9], which)
    except (FedslimError, ResultsError) as exc:
        _error(str(exc), 2)
    typer.echo(f"{'file':<34} {'zeros':>6} {'bytes':>9} {'test acc':>8} {'vs dense':>9}")
    for r in rows:
        typer.echo(f"{r.file:<34} {r.sparsity:>6.1%} {r.file_bytes:>9,} "
                   f"{r.test_accuracy:>8.4f} {r.delta_pp:>+8.2f}pp")
    typer.echo(f"wrote {run_dir / 'export'}/: the files above, export.json, export.csv")


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


_TUNED_KEYS = ("uplink", "server-opt", "server-momentum", "seed")


def _tune_plan(extra: list[str], num_clients: int, rounds: int, output_dir: str,
               min_ratio: float, lows: dict[str, tuple[float, float]]) -> tuple[float, int]:
    """Every check of ``fedslim tune`` before its first trial: (top ratio, model bytes)."""
    overrides = parse_cli_overrides(extra)
    clash = sorted(set(overrides) & set(_TUNED_KEYS))
    if clash:
        raise ConfigError(f"-c {clash[0]}=... is what tune searches (or --seed sets); "
                          f"leave out {', '.join(clash)}")
    for flag, (value, low) in lows.items():
        if value < low:
            raise ConfigError(f"{flag} must be >= {low:g}, got {value:g}")
    cfg, _, _ = prepare_simulation({**overrides, "output-dir": output_dir,
                                    "num-server-rounds": rounds}, num_clients)
    from fedslim import tune as search
    from fedslim.task.data import load_splits
    from fedslim.task.models import build_model, count_params

    splits = load_splits(cfg.data, cfg.fed.seed)
    model_bytes = 4 * count_params(build_model(cfg.train.model, splits.input_shape,
                                               splits.num_classes))
    return search.check_reachable(min_ratio, model_bytes, cfg.train.model), model_bytes


@cli.command()
def tune(
    trials: Annotated[int, typer.Option(help="Settings to try in the search.")] = 20,
    num_clients: Annotated[int, typer.Option(help="Simulated SuperNodes per run.")] = 10,
    rounds: Annotated[int, typer.Option(help="num-server-rounds of each run")] = 20,
    seed: Annotated[int, typer.Option(
        help="the sampler's seed and the first scoring seed (the others follow it)")] = 42,
    score_seeds: Annotated[int, typer.Option(
        help="federations (seeds seed, seed+1, ...) behind each trial's val score")] = 2,
    confirm_seeds: Annotated[int, typer.Option(
        help="fresh seeds (seed+1000, ...) the chosen setting is re-run on")] = 3,
    min_ratio: Annotated[float, typer.Option(
        help="choose among settings with at least this uplink reduction")] = 50.0,
    output_dir: Annotated[str, typer.Option(help="where tune.json, trials.csv, pareto.png go")
                          ] = "outputs/tune",
    run_config: Annotated[list[str] | None, typer.Option(
        "--run-config", "-c", help="key=value for every run: model, dataset, partitioning...")
    ] = None,
) -> None:
    """Search the uplink compression and server momentum on the validation split (optuna),
    each trial scored over several seeds: prints the Pareto front (uplink reduction vs val
    accuracy), then the chosen setting re-run on fresh seeds next to an uncompressed run."""
    import_path_for_workers()
    extra = list(run_config or [])
    try:
        top, model_bytes = _tune_plan(extra, num_clients, rounds, output_dir, min_ratio, {
            "--trials": (trials, 1), "--rounds": (rounds, 1), "--min-ratio": (min_ratio, 1),
            "--score-seeds": (score_seeds, 1), "--confirm-seeds": (confirm_seeds, 0)})
    except FedslimError as exc:
        _error(str(exc), 2)
    try:
        import optuna  # noqa: F401
    except ImportError:
        _error("fedslim tune needs optuna: pip install 'fedslim[tune]' (or -e \".[dev]\")", 2)
    from fedslim import tune as search

    seeds = [seed + i for i in range(score_seeds)]
    fresh = [seed + search.CONFIRM_OFFSET + i for i in range(confirm_seeds)]
    typer.echo(f"tune: {trials} trials x seeds {seeds} of budget:x{search.MIN_RATIO:g}.."
               f"x{top:,.0f} (model {model_bytes / 1e6:.3f} MB), q:2/4/8, ans, pass:0 or not, "
               f"server momentum 0..{search.MOMENTUM_RANGE[1]}; scored on validation")

    def line(result: search.TrialResult | None, failure: str | None) -> None:
        if result is None:
            typer.echo(failure)
            return
        typer.echo(f"trial {result.number:>3}: {result.uplink:<28} momentum "
                   f"{result.server_momentum:.2f} -> uplink x{result.uplink_ratio:,.1f}, "
                   f"val {result.val_accuracy:.4f} (per seed "
                   f"{', '.join(f'{v:.4f}' for v in result.val_per_seed)})")

    run = search.subprocess_runner(num_clients, rounds, extra)
    results = search.run_search(trials, seeds, seed, top, run, line)
    front, chosen = search.conclude(results, min_ratio)
    confirmation = (search.confirm(chosen, fresh, run) if chosen is not None and fresh
                    else None)
    for text in search.summary_lines(front, chosen, confirmation, min_ratio):
        typer.echo(text)
    meta = {"n_trials": trials, "num_clients": num_clients, "rounds": rounds, "seed": seed,
            "score_seeds": seeds, "confirm_seeds": fresh, "min_ratio": min_ratio,
            "run_config": extra, "max_budget_ratio": top, "model_bytes": model_bytes}
    written = search.save(Path(output_dir), results, confirmation, chosen, meta)
    typer.echo(f"wrote {', '.join(str(p) for p in written)}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
