"""Downlink versioning: which global model version each node holds, and what to send it.

The server numbers the global models it broadcasts. With a compressing ``downlink``
pipeline, the step from one version to the next is encoded like a client update, with the
server's own :class:`~fedslim.compression.ErrorFeedback` residual (what the codec dropped is
sent later, DoubleSqueeze-style), and the server *decodes its own payload* to get the
next version. Client and server apply the same decoded delta with the same
:func:`~fedslim.flower_io.apply_delta`, so their copies stay bit-identical.

Per node, a message is one of three kinds:

* ``current`` - the node holds this version already: no arrays at all;
* ``delta``   - the node holds the previous version: the payload of the last step;
* ``full``    - anything else (first contact, missed rounds, a failed reply): the full
  float32 model, exactly as stock Flower sends it.

A node's version is only trusted once it has answered a message carrying it; an error
reply or a rejected update makes the server forget it (full model next time).
"""

from __future__ import annotations

from typing import Literal

import torch
from flwr.app import ArrayRecord, RecordDict

from fedslim.compression import ErrorFeedback, PipelineSpec, encode_update
from fedslim.flower_io import apply_delta, payload_record, state_crc, state_record, to_state
from fedslim.protocol import DELTA
from fedslim.strategies.aggregate import State, float_keys

Kind = Literal["full", "delta", "current"]


class Downlink:
    """Global versions, the last step's payload, and the version each node holds."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self.compress = not spec.is_identity
        self.version = 0
        self.state: State = {}
        self.crc = 0
        self.delta: bytes | None = None          # takes version - 1 to version
        self.ef = ErrorFeedback()
        self.held: dict[int, int] = {}           # node -> version it acknowledged
        self.sent: dict[int, int] = {}           # node -> version last sent to it
        self._published: ArrayRecord | None = None

    # -- the server's side of the versions ---------------------------------------------
    def sync(self, arrays: ArrayRecord) -> State:
        """Make ``arrays`` the current version (a new one, sent in full, unless it is
        what :meth:`publish` returned or bit-identical to the current version)."""
        if arrays is self._published:
            return self.state
        state = to_state(arrays)
        crc = state_crc(state)
        if self.version and crc == self.crc and state.keys() == self.state.keys():
            return self.state
        self.state, self.crc, self.delta = state, crc, None
        self.version += 1
        self._published = arrays
        return self.state

    def publish(self, target: State) -> ArrayRecord:
        """Take the wrapped strategy's new global; return the version nodes will hold.

        Without downlink compression that is ``target`` itself. With it, the step
        ``target - current`` plus the residual is encoded, and the *decoded* step is
        applied, so the returned model is exactly what every node reconstructs.
        """
        if self.compress:
            keys = float_keys(self.state)
            wanted = self.ef.apply({k: target[k].float() - self.state[k] for k in keys})
            payload, sent = encode_update(wanted, self.spec, return_reconstruction=True)
            self.ef.record(wanted, sent)
            self.delta = payload
            new = apply_delta(self.state, sent)
        else:
            new = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
                   for k, v in target.items()}
            self.delta = None
        self.state, self.crc = new, state_crc(new)
        self.version += 1
        self._published = state_record(new)
        return self._published

    # -- per node ------------------------------------------------------------------------
    def kind_for(self, node: int) -> Kind:
        held = self.held.get(node) if self.compress else None
        if held == self.version:
            return "current"
        if held is not None and held == self.version - 1 and self.delta is not None:
            return "delta"
        return "full"

    def content_for(self, node: int, content: RecordDict, arrays_key: str
                    ) -> tuple[RecordDict, Kind, int]:
        """A copy of ``content`` for ``node``: (new content, kind, base version or -1)."""
        kind = self.kind_for(node)
        out = RecordDict({k: v for k, v in content.items()
                          if kind == "full" or k != arrays_key})
        base = -1
        if kind == "delta":
            assert self.delta is not None
            out[DELTA] = payload_record(self.delta)
            base = self.version - 1
        elif kind == "current":
            base = self.version
        self.sent[node] = self.version
        return out, kind, base

    def acknowledge(self, node: int) -> None:
        """``node`` answered: it holds what it was last sent."""
        if node in self.sent:
            self.held[node] = self.sent[node]

    def forget(self, node: int) -> None:
        """``node``'s copy is unknown (error, rejected reply): full model next time."""
        self.held.pop(node, None)

    # -- checkpoint ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"residual/{k}": v for k, v in self.ef.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ef = ErrorFeedback.from_state({k[len("residual/"):]: v for k, v in state.items()
                                            if k.startswith("residual/")})
