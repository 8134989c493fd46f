"""Sampling order that survives random node ids: the server asks each node once for its
partition id (``query.fedslim_hello``), then samples over partitions, not node ids."""

from __future__ import annotations

import random

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedslim.protocol import HELLO, answer_hello
from fedslim.strategies.common import discover_partitions, seeded_sample
from tests.apps import make_quickstart_app
from tests.loopback import LoopbackGrid


def _with_hello(answer=None) -> ClientApp:  # type: ignore[no-untyped-def]
    app = make_quickstart_app()

    @app.query(HELLO)
    def hello(msg: Message, context: Context) -> Message:
        pid = context.node_config["partition-id"]
        if answer is None:
            return answer_hello(msg, pid)
        return Message(RecordDict({HELLO: ConfigRecord({"partition-id": answer(pid)})}),
                       reply_to=msg)

    return app


def _renumbered(grid: LoopbackGrid, seed: int) -> LoopbackGrid:
    """The same partitions behind other (random, 63-bit) node ids, as a new run has."""
    rng = random.Random(seed)
    ids = {old: rng.getrandbits(63) for old in grid.apps}
    grid.apps = {ids[o]: a for o, a in grid.apps.items()}
    grid.contexts = {ids[o]: Context(run_id=1, node_id=ids[o], node_config=c.node_config,
                                     state=c.state, run_config=c.run_config)
                     for o, c in grid.contexts.items()}
    return grid


def _partitions_sampled(grid: LoopbackGrid, rounds: int = 6) -> list[list[int]]:
    known: dict[int, int | None] = {}
    discover_partitions(grid, known)
    picked = []
    for rnd in range(1, rounds + 1):
        nodes = seeded_sample(grid, 1, 0.3, 1, seed=7, server_round=rnd, salt=0,
                              partitions=known)
        picked.append(sorted(grid.contexts[n].node_config["partition-id"] for n in nodes))
    return picked


def test_the_same_seed_samples_the_same_partitions_under_other_node_ids():
    a = _partitions_sampled(_renumbered(LoopbackGrid(_with_hello(), 20), seed=1))
    b = _partitions_sampled(_renumbered(LoopbackGrid(_with_hello(), 20), seed=2))
    assert a == b
    assert len({tuple(r) for r in a}) > 1  # (and rounds differ from each other)


def test_nodes_without_an_answer_fall_back_to_node_id_order():
    grid = _renumbered(LoopbackGrid(make_quickstart_app(), 10), seed=3)  # no hello handler
    known: dict[int, int | None] = {}
    discover_partitions(grid, known)
    assert known == dict.fromkeys(grid.apps)  # asked once, none answered: all None
    sent = len(grid.sent)
    discover_partitions(grid, known)
    assert len(grid.sent) == sent  # not asked again
    nodes = seeded_sample(grid, 1, 0.5, 1, seed=7, server_round=1, salt=0, partitions=known)
    assert len(nodes) == 5 and set(nodes) <= set(grid.apps)


def test_hostile_partition_answers_are_ignored():
    bad = [lambda p: "x", lambda p: -1, lambda p: 1 << 40, lambda p: True, lambda p: 1.5]
    for answer in bad:
        grid = LoopbackGrid(_with_hello(answer), 4)
        known: dict[int, int | None] = {}
        discover_partitions(grid, known)
        assert known == dict.fromkeys(grid.apps), answer
    grid = LoopbackGrid(_with_hello(lambda p: 5), 4)  # all claim one partition: kept, and
    known = {}                                        # ties are broken by node id
    discover_partitions(grid, known)
    assert set(known.values()) == {5}
    assert len(seeded_sample(grid, 1, 0.5, 1, seed=1, server_round=1, salt=0,
                             partitions=known)) == 2
