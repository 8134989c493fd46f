"""Hostile clients in a real simulation: the server survives and the model stays sound.

    python -m fedslim.bench.adversarial --num-clients 10 --rounds 20 --seeds 42 1 2

Runs Flower's simulation engine with fedslim's apps, once honest and once per attack, in
which partition 0 misbehaves (the others are honest). An attack is a Flower client mod
placed *inside* ``compression_mod``, so the lie is encoded like an honest update (or, for
the metric attacks, rides in the reply's metrics). Prints, per attack, the final test
accuracy (mean over seeds) and its difference to the honest run, whether the model stayed
finite, and what the server did (rejects, defences). ``--no-defences`` turns the
server-side defences off for comparison. Each run is a subprocess (``--one`` runs one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedslim.bench.collude import COLLUDING, colluder_mod, is_colluding

NO_DEFENCES = {"defence-clip-ratio": 0.0, "defence-weight-ratio": 0.0,
               "defence-reject-ratio": 0.0}


def _weights_attack(kind: str, msg: Message, reply: Message) -> None:
    start = msg.content.array_records["arrays"].to_torch_state_dict()
    local = reply.content.array_records["arrays"].to_torch_state_dict()
    if kind == "scaled":  # update x 1e6
        out = {k: start[k] + 1e6 * (local[k] - start[k]) if v.is_floating_point() else v
               for k, v in local.items()}
    elif kind == "sign-flip-heavy":  # flipped update, claims 1e9 examples
        out = {k: start[k] - (local[k] - start[k]) if v.is_floating_point() else v
               for k, v in local.items()}
        reply.content.metric_records["metrics"]["num-examples"] = 10**9
    else:  # "huge": every weight 3e38 (finite; an average of two overflows)
        out = {k: torch.full_like(v, 3e38) if v.is_floating_point() else v
               for k, v in local.items()}
    reply.content["arrays"] = ArrayRecord(out)


REPLAY_STATE = "adversary.replay"


def _replay(msg: Message, context: Context, reply: Message) -> Message:
    """Answer every round with the first round's reply (every record of it: weights or
    payload, the uplink header, metrics), kept in the node's state, which outlives the Ray
    worker that handled the first message."""
    prefix = REPLAY_STATE + "."
    kept = {k[len(prefix):]: v for k, v in context.state.items() if k.startswith(prefix)}
    if not kept:  # the first reply goes out as it is, and is kept
        for name, record in reply.content.items():
            context.state[prefix + name] = record
        return reply
    return Message(content=RecordDict(kept), reply_to=msg)


def attack_mod(kind: str, attackers: int = 1) -> Mod:
    """The client mod for attack ``kind``: partitions ``< attackers`` attack, only in
    train. ``mixed``: partition ``i`` runs ``ATTACKS[i]`` (one simulation, every attack at
    once)."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        pid = int(str(context.node_config["partition-id"]))
        mine = (ATTACKS[pid] if pid < len(ATTACKS) else None) if kind == "mixed" else (
            kind if pid < attackers else None)
        if mine is None or reply.has_error() or msg.metadata.message_type != "train":
            return reply
        return _attack(mine, msg, context, reply)

    return mod


def _attack(kind: str, msg: Message, context: Context, reply: Message) -> Message:
    # (the replay runs outside compression_mod, on the reply as sent: no MetricRecord there
    # when the payload travels in the compact form)
    if kind in ("scaled", "sign-flip-heavy", "huge"):
        _weights_attack(kind, msg, reply)
    elif kind == "metric-list":  # partition-id as a list, a NaN loss
        metrics = reply.content.metric_records["metrics"]
        metrics["partition-id"] = [1, 2, 3]
        metrics["train-loss"] = float("nan")
    elif kind == "weight-inf":
        reply.content.metric_records["metrics"]["num-examples"] = 1e308
    elif kind == "replay":
        return _replay(msg, context, reply)
    return reply


ATTACKS = ["scaled", "sign-flip-heavy", "huge", "metric-list", "weight-inf", "replay"]
CHOICES = [*ATTACKS, "mixed", *COLLUDING]  # and ipm:<eps>


def attack_name(value: str) -> str:
    """argparse type: a known attack, or ``ipm:<eps>`` with eps > 0."""
    if value in CHOICES:
        return value
    if value.startswith("ipm:"):
        try:
            if float(value[4:]) > 0:
                return value
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"unknown attack {value!r}; expected one of "
                                     f"{', '.join(CHOICES)} or ipm:<eps> (eps > 0)")


def _only(kind: str) -> Mod:
    mixed = attack_mod("mixed")

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        pid = int(str(context.node_config["partition-id"]))
        if pid < len(ATTACKS) and ATTACKS[pid] == kind:
            return mixed(msg, context, call_next)
        return call_next(msg, context)

    return mod


def _except(kind: str) -> Mod:
    mixed = attack_mod("mixed")

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        pid = int(str(context.node_config["partition-id"]))
        if pid < len(ATTACKS) and ATTACKS[pid] == kind:
            return call_next(msg, context)
        return mixed(msg, context, call_next)

    return mod


def run_one(attack: str | None, overrides: dict[str, Any], num_clients: int,
            attackers: int = 1) -> None:
    """One federation in this process (what ``--one`` runs in a subprocess)."""
    from flwr.simulation import run_simulation

    from fedslim.client.app import make_client_app
    from fedslim.server.app import make_server_app

    # the replay works on encoded replies (outside compression_mod), the rest on weights
    outer = [attack_mod(attack, attackers)] if attack in ("replay", "mixed") else []
    inner = [attack_mod(attack, attackers)] if attack and attack != "replay" else []
    if attack and is_colluding(attack):
        inner = [colluder_mod(attack, attackers, overrides)]
    if attack == "mixed":  # each partition's own attack, on the side it works on
        outer, inner = [_only("replay")], [_except("replay")]
    run_simulation(server_app=make_server_app(overrides),
                   client_app=make_client_app(overrides, mods=outer, inner_mods=inner),
                   num_supernodes=num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"logging_level": "ERROR",
                                                 "log_to_driver": False}})


def federation(attack: str | None, overrides: dict[str, Any], num_clients: int,
               attackers: int = 1) -> dict[str, Any]:
    """Run one federation in a subprocess; return what its results.json says."""
    from fedslim.report import load_results

    with tempfile.TemporaryDirectory() as tmp:
        ov = {**overrides, "output-dir": tmp, "progress": False}
        proc = subprocess.run([sys.executable, "-m", "fedslim.bench.adversarial", "--one",
                               attack or "honest", "--overrides", json.dumps(ov),
                               "--num-clients", str(num_clients),
                               "--attackers", str(attackers)], capture_output=True,
                              text=True, timeout=1800)
        res = load_results(tmp)  # must exist: the server may never crash
        finite = _finite_model(Path(tmp))
    final = res.final
    return {"attack": attack or "honest", "exit_code": proc.returncode,
            "test_accuracy": final.test_accuracy if final else float("nan"),
            "error": final.error if final else "no final results",
            "model_finite": finite, "rounds": len(res.rounds),
            "rejects": sum(len(r.rejects) for r in res.rounds),
            "defences": sum(len(r.defences) for r in res.rounds)}


def _finite_model(outdir: Path) -> bool:
    from safetensors.torch import load_file

    path = outdir / "model.safetensors"
    return path.exists() and all(bool(torch.isfinite(t).all()) for t in
                                 load_file(str(path)).values() if t.is_floating_point())


def _summary(rows: list[dict[str, Any]], attacks: list[str]) -> None:
    honest = {r["seed"]: r["test_accuracy"] for r in rows if r["attack"] == "honest"}
    for attack in ["honest", *attacks]:
        rs = [r for r in rows if r["attack"] == attack and r["seed"] in honest]
        if not rs:
            continue
        diff = [100 * (r["test_accuracy"] - honest[r["seed"]]) for r in rs]
        print(f"  {attack:16s} acc {statistics.mean(r['test_accuracy'] for r in rs):.4f}  "
              f"vs honest {statistics.mean(diff):+.2f} pp (per seed "
              f"{', '.join(f'{d:+.2f}' for d in diff)})  finite "
              f"{all(r['model_finite'] for r in rs)}  crashes "
              f"{sum(r['exit_code'] != 0 for r in rs)}  rejects "
              f"{sum(r['rejects'] for r in rs)}  defences {sum(r['defences'] for r in rs)}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--attacks", nargs="*", default=ATTACKS, type=attack_name,
                   help=f"of {', '.join(CHOICES)}, ipm:<eps>")
    p.add_argument("--attackers", type=int, default=1,
                   help="partitions 0..K-1 attack together (default 1)")
    p.add_argument("--jobs", type=int, default=1, help="federations run at once")
    p.add_argument("--no-defences", action="store_true")
    p.add_argument("-c", "--run-config", action="append", default=[])
    p.add_argument("--out", type=Path, default=None,
                   help="append the rows to this JSON-lines file (rows already there for "
                        "the same seed and attack are kept, not re-run)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 1 <= args.attackers < args.num_clients:
        p.error(f"--attackers {args.attackers}: expected 1 .. {args.num_clients - 1}")
    if args.one is not None:
        run_one(None if args.one == "honest" else args.one, json.loads(args.overrides),
                args.num_clients, args.attackers)
        return
    from concurrent.futures import ThreadPoolExecutor

    from fedslim.config import parse_cli_overrides

    base = {"num-server-rounds": args.rounds, **parse_cli_overrides(args.run_config),
            **(NO_DEFENCES if args.no_defences else {})}
    done = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()] \
        if args.out and args.out.exists() else []
    have = {(r["seed"], r["attack"]) for r in done}
    todo = [(seed, attack) for seed in args.seeds for attack in [None, *args.attacks]
            if (seed, attack or "honest") not in have]

    def one(job: tuple[int, str | None]) -> dict[str, Any]:
        seed, attack = job
        row = {"seed": seed, "attackers": args.attackers,
               **federation(attack, {**base, "seed": seed}, args.num_clients,
                            args.attackers)}
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        return row

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = done + list(pool.map(one, todo))
    rows = [r for r in rows if r["seed"] in args.seeds]
    print(f"\n{args.num_clients} clients (partitions 0..{args.attackers - 1} hostile), "
          f"{args.rounds} rounds, seeds {args.seeds}, defences "
          f"{'off' if args.no_defences else 'on'}:")
    _summary(rows, args.attacks)


if __name__ == "__main__":
    main()
