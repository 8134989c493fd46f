"""The node's error-feedback residual across rounds and server restarts.

In ``context.state`` while the server's stream lasts; in two files per node (keyed by the
run's lineage) so that a resumed server -- a new stream -- continues from the residual the
node wrote after the last round the server recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from safetensors import safe_open
from safetensors.torch import load_file

from fedslim.client.held import node_key
from fedslim.compression import ErrorFeedback
from fedslim.flower_io import to_state
from fedslim.protocol import STATE_EF, STATE_EF_META, DownlinkHeader
from fedslim.server.storage import overwrite_model

log = logging.getLogger("flwr").getChild("fedslim")

StateDir = Callable[[Context], Path | None]


def ef_files(state_dir: StateDir | None, context: Context, head: DownlinkHeader
              ) -> tuple[Path, Path] | None:
    """The node's two residual slots (see :func:`load_residual`)."""
    if state_dir is None or not head.lineage:
        return None
    directory = state_dir(context)
    if directory is None:
        return None
    key = node_key(context)
    return directory / f"ef-{key}.0.safetensors", directory / f"ef-{key}.1.safetensors"


_ROUND_WIDTH = 20  # a residual file's round, padded: the final header has the length of
# the placeholder (-1, "being written") it replaces once the data is in


def _file_round(path: Path, lineage: int) -> int | None:
    """The round a residual file was written after, if it belongs to ``lineage``."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            info = fh.metadata() or {}
        written = int(info["round"]) if info.get("lineage") == str(lineage) else None
        return None if written is None or written < 0 else written
    except Exception as exc:  # a damaged file is a lost residual, not a failed round
        log.warning("ignoring error-feedback file %s: %s", path, exc)
        return None


def load_residual(context: Context, head: DownlinkHeader,
                    slots: tuple[Path, Path] | None) -> tuple[ErrorFeedback, Path | None]:
    """This node's residual: from ``context.state`` (same server stream), else from its
    file (same run lineage, the newest written before this round: the server resumed),
    else zero; and the slot it was read from.

    Two slots are kept: the newest residual and the one before. A node can finish round r
    (and write its residual) while the server dies before recording round r; the resumed
    server repeats round r, which must start from the residual written after round r - 1.
    The new residual is written into the slot *not* read (whose tensors are still mapped).
    """
    meta = context.state.config_records.get(STATE_EF_META)
    rec = context.state.array_records.get(STATE_EF)
    if rec is not None and meta is not None and meta.get("stream") == head.stream:
        last = meta.get("round")
        if _fresh(head, last if isinstance(last, int) else None):
            return ErrorFeedback.from_state(to_state(rec)), None
        return ErrorFeedback(), None
    if slots is not None:
        found = [(r, f) for f in slots if f.is_file()
                 and (r := _file_round(f, head.lineage)) is not None and r < head.server_round]
        if found and _fresh(head, max(found)[0]):
            newest = max(found)[1]
            try:
                return ErrorFeedback.from_state(load_file(str(newest)), copy=False), newest
            except Exception as exc:
                log.warning("ignoring error-feedback file %s: %s", newest, exc)
    return ErrorFeedback(), None  # a new run (old residuals do not apply), or stale


def _fresh(head: DownlinkHeader, last_round: int | None) -> bool:
    """Whether a residual written after ``last_round`` may still be used this round."""
    if not head.ef_reset_after or last_round is None:
        return True
    return head.server_round - last_round <= head.ef_reset_after


def persist_residual(ef: ErrorFeedback, slots: tuple[Path, Path] | None, loaded: Path | None,
             head: DownlinkHeader) -> None:
    """Write the residual into the slot it was not read from (or the older one), in place
    (the slot's cached pages are reused): the round goes in last, so a process killed
    mid-write leaves a file marked "being written" that no round will read. Lost on a
    power cut (no fsync): the residual restarts at zero."""
    if slots is None:
        return
    if loaded is None:  # nothing read this round: overwrite the older (or a missing) slot
        rounds = [(_file_round(f, head.lineage) if f.is_file() else None) for f in slots]
        older = [-1 if r is None else r for r in rounds]
        target = slots[0] if older[0] <= older[1] else slots[1]
    else:
        target = slots[1] if loaded == slots[0] else slots[0]
    lineage = str(head.lineage)
    try:
        overwrite_model(target, ef.residuals(),
                        {"lineage": lineage, "round": f"{-1:>{_ROUND_WIDTH}}"},
                        {"lineage": lineage, "round": f"{head.server_round:>{_ROUND_WIDTH}}"})
    except OSError as exc:  # no place to keep it: resuming will start it from zero
        log.warning("cannot persist the error-feedback residual to %s: %s", target, exc)
