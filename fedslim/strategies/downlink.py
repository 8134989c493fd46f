"""Downlink versioning: which global model version each node holds, and what to send it.

The server numbers the global models it broadcasts. With a compressing ``downlink``
pipeline, the step from one version to the next is encoded like a client update, with the
server's own :class:`~fedslim.compression.ErrorFeedback` residual (what the codec dropped is
sent later, DoubleSqueeze-style), and the server *decodes its own payload* to get the
next version. Client and server apply the same decoded delta with the same
:func:`~fedslim.flower_io.apply_delta`, so their copies stay bit-identical.

Per node, a message is one of three kinds:

* ``current`` - the node holds this version already: no arrays at all;
* ``delta``   - the node holds an earlier version that is at most ``max_chain`` steps old:
  the payloads of the steps it missed, in order (a catch-up chain), when their bytes are
  fewer than the full model's; the node applies them one by one, exactly as the server
  did, so the copies stay bit-identical;
* ``init``    - with ``shared_init``, a node the server knows nothing about builds the run's
  seeded round-0 model itself (checked by CRC) and gets the chain from there, when the
  chain is short and cheap enough; a node that fails to gets the full model from then on;
* ``key``     - with ``key_every`` (and ``shared_init``): every ``key_every``-th version is a
  *keyframe*, the whole model's drift from the round-0 model encoded with ``key_spec``
  (e.g. ``q:8|ans``) and decoded by the server itself, so the keyframe *is* the next
  version (what it rounded off joins the downlink residual and is sent in later steps). A
  node whose copy is too old for a chain builds the round-0 model, applies the keyframe
  and the steps since: a compressed full model for nodes that come back rarely (at 1% per
  round, every ~100 rounds);
* ``full``    - anything else (first contact, a copy too old, a failed reply): the full
  float32 model, exactly as stock Flower sends it.

Of the kinds that apply, the one with the fewest bytes is sent.

A node's version is only trusted once it has answered a message carrying it; an error
reply or a rejected update makes the server forget it (full model next time).
"""

from __future__ import annotations

from collections import deque
from typing import Literal

import torch
from flwr.app import ArrayRecord, RecordDict

from fedslim.compression import ErrorFeedback, PipelineSpec, encode_update
from fedslim.flower_io import apply_delta, chain_record, state_crc, state_record, to_state
from fedslim.protocol import DELTA, KEY_BASE
from fedslim.strategies.aggregate import State, float_keys

Kind = Literal["full", "delta", "current", "init", "key"]


class Downlink:
    """Global versions, the last step's payload, and the version each node holds."""

    MAX_CHAIN = 32

    def __init__(self, spec: PipelineSpec, max_chain: int = MAX_CHAIN, key_every: int = 0,
                 key_spec: PipelineSpec | None = None) -> None:
        self.spec = spec
        self.compress = not spec.is_identity
        self.max_chain = max_chain
        # keyframes: only with a compressing downlink and a shared round-0 model
        self.key_every = key_every if self.compress else 0
        self.key_spec = key_spec if key_spec is not None else PipelineSpec()
        self.key: bytes | None = None            # the last keyframe's payload
        self.key_version = 0
        self.init_state: State = {}              # the round-0 model (keyframes build on it)
        self.version = 0
        self.state: State = {}
        self.crc = 0
        # steps[i] takes version (first_step + i) to (first_step + i + 1); the last ones only
        self.steps: deque[bytes] = deque(maxlen=max_chain)
        self.full_bytes = 0                      # array bytes of the full model
        self.ef = ErrorFeedback()
        self.held: dict[int, int] = {}           # node -> version it acknowledged
        self.sent: dict[int, int] = {}           # node -> version last sent to it
        self.init_version = 0                    # version nodes can build themselves (0: none)
        self.init_crc = 0
        self.no_init: set[int] = set()           # nodes that failed to build it
        self._planned: dict[int, Kind] = {}
        self._published: ArrayRecord | None = None

    def share_init(self) -> None:
        """Declare the current version buildable by every node (the seeded round-0 model)."""
        self.init_version, self.init_crc = self.version, self.crc
        if self.key_every:
            self.init_state = {k: v.clone() for k, v in self.state.items()}

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
        self.state, self.crc = state, crc
        self.steps.clear()  # an outside change: no chain leads to this version
        self.key = None     # nor from a keyframe
        self.full_bytes = sum(v.numel() * v.element_size() for v in state.values())
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
            if self._keyframe_due():
                new = self._keyframe(wanted, keys)
            else:
                # Schema-bound: every node holds the model (all float32 here).
                payload, sent = encode_update(wanted, self.spec, return_reconstruction=True,
                                              schema_bound=True)
                self.ef.record(wanted, sent)
                self.steps.append(payload)
                new = apply_delta(self.state, sent)
        else:
            new = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
                   for k, v in target.items()}
        self.state, self.crc = new, state_crc(new)
        self.version += 1
        self._published = state_record(new)
        return self._published

    def _keyframe_due(self) -> bool:
        """Whether the next version is a keyframe: every ``key_every``-th since the first
        keyframe could be made (the round-0 model is shared and the other tensors -- not
        float, never sent in steps -- are still the round-0 model's)."""
        if not (self.key_every and self.init_state and self.init_version):
            return False
        if (self.version + 1 - self.init_version) % self.key_every:
            return False
        init = self.init_state
        return init.keys() == self.state.keys() and all(
            (init[k].dtype, init[k].shape) == (v.dtype, v.shape)
            and (v.is_floating_point() or torch.equal(init[k], v))
            for k, v in self.state.items())

    def _keyframe(self, wanted: State, keys: list[str]) -> State:
        """The next version as a keyframe: ``init + decoded(current + wanted - init)``; what
        the keyframe codec rounds off stays in the residual."""
        drift = {k: self.state[k] + wanted[k] - self.init_state[k] for k in keys}
        payload, sent = encode_update(drift, self.key_spec, return_reconstruction=True,
                                      schema_bound=True)
        new = apply_delta(self.init_state, sent)
        self.ef.record(wanted, {k: new[k] - self.state[k] for k in keys})
        self.key, self.key_version = payload, self.version + 1
        self.steps.clear()  # steps lead on from the keyframe
        return new

    # -- per node ------------------------------------------------------------------------
    def chain_for(self, held: int) -> list[bytes] | None:
        """The step payloads from version ``held`` to the current one, if kept."""
        missed = self.version - held
        if not 0 < missed <= len(self.steps):
            return None
        return list(self.steps)[len(self.steps) - missed:]

    def _key_chain(self) -> list[bytes] | None:
        """The keyframe and the steps since it, if they lead to the current version."""
        if self.key is None:
            return None
        rest = [] if self.version == self.key_version else self.chain_for(self.key_version)
        return None if rest is None else [self.key, *rest]

    def plan(self, node: int) -> tuple[Kind, int, list[bytes]]:
        """(kind, base version, payloads) for ``node``: the cheapest exact update (base -1:
        the full model; :data:`~fedslim.protocol.KEY_BASE`: a keyframe chain)."""
        held = self.held.get(node) if self.compress else None
        if held == self.version:
            return "current", self.version, []
        options: list[tuple[int, Kind, int, list[bytes]]] = [
            (self.full_bytes, "full", -1, [])]
        if held is not None:
            chain = self.chain_for(held)
            if chain is not None:
                options.append((sum(map(len, chain)), "delta", held, chain))
        if self.init_version and node not in self.no_init:
            if held is None:
                chain = [] if self.version == self.init_version else self.chain_for(
                    self.init_version)
                if chain is not None:
                    options.append((sum(map(len, chain)), "init", self.init_version, chain))
            chain = self._key_chain()
            if chain is not None:
                options.append((sum(map(len, chain)), "key", KEY_BASE, chain))
        # fewest bytes; on a tie the earlier option (full before delta before init/key)
        _, kind, base, chain = min(options, key=lambda o: o[0])
        return kind, base, chain

    def content_for(self, node: int, content: RecordDict, arrays_key: str
                    ) -> tuple[RecordDict, Kind, int]:
        """A copy of ``content`` for ``node``: (new content, kind, base version or -1)."""
        kind, base, chain = self.plan(node)
        out = RecordDict({k: v for k, v in content.items()
                          if kind == "full" or k != arrays_key})
        if chain:
            out[DELTA] = chain_record(chain)
        self.sent[node] = self.version
        self._planned[node] = kind
        return out, kind, base

    def acknowledge(self, node: int) -> None:
        """``node`` answered: it holds what it was last sent."""
        if node in self.sent:
            self.held[node] = self.sent[node]

    def forget(self, node: int, init_failed: bool = False) -> None:
        """``node``'s copy is unknown (error, rejected reply): no chain from it next time.
        ``init_failed``: the node said it cannot build the round-0 model it was asked to
        (:data:`~fedslim.protocol.INIT_FAILED`): it gets the full model from then on."""
        self.held.pop(node, None)
        if init_failed and self._planned.get(node) in ("init", "key"):
            self.no_init.add(node)

    # -- checkpoint ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"residual/{k}": v for k, v in self.ef.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ef = ErrorFeedback.from_state({k[len("residual/"):]: v for k, v in state.items()
                                            if k.startswith("residual/")})
