"""An in-process Flower Grid for fast strategy-stack tests.

Every message crosses Flower's real serialization both ways (each inflatable object is
deflated to bytes and the message inflated again from them, as a SuperLink stores and
forwards it) and is handled by a real ``ClientApp`` (mods included) with a per-node
``Context`` whose ``state`` persists across rounds, as a SuperNode keeps it. Ray and the
network are left out, so a whole strategy stack runs in well under a second; the e2e
tests run the same parts in real simulations and deployments.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

from fedslim.flower_io import message_bytes

SUPERLINK = 0


def wire(msg: Message) -> Message:
    """``msg`` after a trip through Flower's serialization (a new, equal object)."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    out = inflate_object_from_contents(msg.object_id, contents)
    assert isinstance(out, Message)
    return out


class LoopbackGrid(Grid):
    """Nodes ``1..n`` each run ``client_app`` (or ``apps[i]``) in this process."""

    def __init__(self, client_app: ClientApp | Callable[[int], ClientApp], num_nodes: int,
                 run_config: dict[str, bool | float | int | str] | None = None) -> None:
        self.apps = {i + 1: client_app(i) if not isinstance(client_app, ClientApp)
                     else client_app for i in range(num_nodes)}
        self.contexts = {
            node: Context(run_id=1, node_id=node,
                          node_config={"partition-id": node - 1, "num-partitions": num_nodes},
                          state=RecordDict(), run_config=dict(run_config or {}))
            for node in self.apps}
        # What a ServerApp process has set when a strategy builds messages.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK, 0
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self.bytes_down: list[int] = []   # each message's size as it crossed the wire
        self.bytes_up: list[int] = []
        self._run = None

    # -- the parts of Grid the strategies use ------------------------------------------
    def get_node_ids(self) -> Iterable[int]:
        return list(self.apps)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            msg.metadata.__dict__["_run_id"] = 1
            msg.metadata.__dict__["_src_node_id"] = SUPERLINK
            msg.metadata.__dict__["_created_at"] = time.time()
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            arrived = wire(msg)
            self.bytes_down.append(message_bytes(arrived))
            TaskIdentity.node_id = node
            try:
                reply = self.apps[node](arrived, self.contexts[node])
            except Exception as exc:  # as a SuperNode does: an error reply
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"),
                                reply_to=arrived)
            finally:
                TaskIdentity.node_id = SUPERLINK
            reply.metadata.__dict__["_src_node_id"] = node
            back = wire(reply)
            self.bytes_up.append(message_bytes(back))
            self.received.append(back)
            replies.append(back)
        return replies

    # -- unused by strategies ----------------------------------------------------------
    def set_run(self, run_id: int) -> None:  # pragma: no cover
        pass

    @property
    def run(self):  # type: ignore[no-untyped-def]  # pragma: no cover
        return self._run

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError
