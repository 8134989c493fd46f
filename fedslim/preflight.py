"""Checks that must pass before any process starts: bad input is one line, not a hang.

Used by ``fedslim simulate`` and ``python -m fedslim.deploy``: a user mistake raises one
:class:`~fedslim.errors.ConfigError` naming the flag or key, the value and what is
allowed, before Ray, a SuperLink or a SuperNode is started.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fedslim import outdir
from fedslim.compression import encode_update
from fedslim.compression.auto import compresses
from fedslim.compression.spec import PipelineSpec
from fedslim.config import RunConfig, ServerOpt
from fedslim.errors import ConfigError
from fedslim.protocol import CHECKPOINT_FILE


def check_federation_size(cfg: RunConfig, num_clients: int, flag: str = "--num-clients"
                          ) -> None:  # fedslim.deploy's flag has the same name
    """Refuse a federation the server would wait for forever."""
    if num_clients < 1:
        raise ConfigError(f"{flag}={num_clients}: a federation needs at least 1 client")
    for key, need in (("min-available-nodes", cfg.fed.min_available_nodes),
                      ("min-train-nodes", cfg.fed.min_train_nodes)):
        if num_clients < need:
            raise ConfigError(
                f"{flag}={num_clients} is below {key}={need}: the server would wait for "
                f"nodes that never come; use {flag} >= {need} or -c {key}={num_clients}")


def check_output_dir(cfg: RunConfig) -> tuple[Path, str | None]:
    """Create ``output-dir`` (``{run}`` expanded: :mod:`fedslim.outdir`) or fail in one
    line; return it and a notice, if any. A directory with an earlier run's results is
    refused unless ``resume`` or ``overwrite``.

    ``resume=true`` on a directory without a checkpoint starts from round 1 and says so
    (the notice); it is not an error, so the same command can start and continue a run.
    """
    raw = outdir.expand(cfg.fed.output_dir, cfg.fed.resume)
    out = Path(raw).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run-config key 'output-dir' (--output-dir): {raw!r} is a file, "
                          "not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"run-config key 'output-dir' (--output-dir): cannot create {raw!r}:"
                          f" {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"run-config key 'output-dir' (--output-dir): {raw!r} is not "
                          "writable")
    outdir.check_fresh(out, cfg.fed.resume, cfg.fed.overwrite)
    notice = None
    if cfg.fed.resume and not (out / CHECKPOINT_FILE).exists():
        notice = (f"resume=true: {out} holds no {CHECKPOINT_FILE}; starting from round 1")
    return out, notice


def check_data_dir(cfg: RunConfig) -> None:
    """A ``data-dir`` that the data set needs must exist."""
    if cfg.data.data_dir and not Path(cfg.data.data_dir).expanduser().is_dir():
        raise ConfigError(f"run-config key 'data-dir': {cfg.data.data_dir!r} is not a "
                          "directory")


MIN_REPLY_BYTES = 600
"""A compressed train reply cannot be smaller: Flower's envelope with the app's metrics
(~0.45 kB in the compact form, message header included), fedslim's ~40-byte uplink header
and at least 64 bytes of update. (The client mod checks the exact figure per reply.)"""


ENVELOPE_BYTES = MIN_REPLY_BYTES - 64
"""What a compressed reply carries besides its update (see MIN_REPLY_BYTES)."""
ENVELOPE_SHARE = 0.5
"""Say so before starting when the envelope is more than this share of a reply."""


def _model_state(cfg: RunConfig) -> dict[str, torch.Tensor]:
    from fedslim.task.data import load_splits
    from fedslim.task.models import build_model

    splits = load_splits(cfg.data, cfg.fed.seed)
    model = build_model(cfg.train.model, splits.input_shape, splits.num_classes)
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def check_init_from(cfg: RunConfig) -> None:
    """An ``init-from`` file must exist and fit the model (one line naming what differs)."""
    if not cfg.fed.init_from:
        return
    from fedslim.task.data import load_splits
    from fedslim.task.models import build_model
    from fedslim.task.prune import load_init

    path = Path(cfg.fed.init_from).expanduser()
    if not path.is_file():
        raise ConfigError(f"run-config key 'init-from': {cfg.fed.init_from!r} is not a file")
    splits = load_splits(cfg.data, cfg.fed.seed)
    load_init(build_model(cfg.train.model, splits.input_shape, splits.num_classes), path)


def check_student(cfg: RunConfig) -> None:
    """With ``distill=true``, the student must have fewer parameters than the global model."""
    if not cfg.distill.distill:
        return
    from fedslim.task.data import load_splits
    from fedslim.task.models import build_model, count_params

    splits = load_splits(cfg.data, cfg.fed.seed)
    shape, classes = splits.input_shape, splits.num_classes
    student = count_params(build_model(cfg.distill.student_model, shape, classes))
    teacher = count_params(build_model(cfg.train.model, shape, classes))
    if student >= teacher:
        raise ConfigError(
            f"run-config key 'student-model': {cfg.distill.student_model} has {student:,} "
            f"parameters, not fewer than model={cfg.train.model}'s {teacher:,}: the "
            "distilled student would be no smaller than its teacher; choose a smaller "
            "student-model (or model)")


def check_budget(cfg: RunConfig) -> None:
    """Refuse an uplink byte budget no reply can fit (every reply would be rejected)."""
    uplink = cfg.comp.uplink
    topk = uplink.topk if isinstance(uplink, PipelineSpec) else None
    if topk is None or not topk.is_budget:
        return
    numel = sum(v.numel() for v in _model_state(cfg).values())
    budget = topk.budget_for(numel)
    if budget < MIN_REPLY_BYTES:
        most = max(1, (4 * numel) // MIN_REPLY_BYTES)
        raise ConfigError(
            f"run-config key 'uplink': {str(cfg.comp.uplink)!r} allows {budget} bytes per "
            f"reply for model={cfg.train.model!r} ({4 * numel} bytes of float32), below the "
            f"~{MIN_REPLY_BYTES} bytes Flower's envelope and metrics need; use budget:"
            f"{MIN_REPLY_BYTES} or more (for this model at most budget:x{most})")


def reply_estimate(spec: PipelineSpec, shapes: dict[str, torch.Tensor]) -> int:
    """Payload bytes of one update of these tensors through ``spec``: a seeded heavy-tailed
    stand-in for a real update, encoded as the client mod encodes (schema-bound)."""
    gen = torch.Generator().manual_seed(0)
    update = {k: torch.randn(v.shape, generator=gen) * torch.rand(v.shape, generator=gen) ** 3
              for k, v in shapes.items()}
    return len(encode_update(update, spec, generator=gen, schema_bound=True,
                             spec_implied=True))


def envelope_notice(cfg: RunConfig) -> str | None:
    """A fixed uplink spec whose replies the envelope dominates on this model: what ratio is
    possible and why, before anything starts (``budget:`` sizes whole replies and is checked
    by :func:`check_budget`; ``auto`` sizes its payloads from each update)."""
    uplink = cfg.comp.uplink
    if not isinstance(uplink, PipelineSpec) or uplink.is_identity or (
            uplink.topk is not None and uplink.topk.is_adaptive):
        return None
    state = _model_state(cfg)
    dense = 4 * sum(v.numel() for v in state.values())
    payload = reply_estimate(uplink, state)
    if ENVELOPE_BYTES <= ENVELOPE_SHARE * (payload + ENVELOPE_BYTES):
        return None
    return (f"note: uplink={uplink} on model={cfg.train.model!r} ({dense / 1e3:,.1f} kB of "
            f"float32): the payload is ~{payload:,} bytes but Flower's envelope and the "
            f"metrics add ~{ENVELOPE_BYTES} to every reply, so replies will be ~x"
            f"{dense / (payload + ENVELOPE_BYTES):,.0f} smaller, not ~x{dense / payload:,.0f}; "
            f"no reply of this model can be more than ~x{dense / MIN_REPLY_BYTES:,.0f} "
            "smaller")


def adaptive_server_notice(cfg: RunConfig) -> str | None:
    """A compressing uplink under an Adam server step: say what was measured, before start.

    Adam normalises each coordinate by its own running magnitude, so the sparse,
    error-feedback-delayed coordinates of a compressed update get outsized steps.
    """
    adam = cfg.fed.strategy == "fedadam" or (
        cfg.fed.strategy == "fedslim" and cfg.comp.server_opt is ServerOpt.ADAM)
    if not adam or not compresses(cfg.comp.uplink):
        return None
    return (f"note: uplink={cfg.comp.uplink} under an Adam server step (strategy="
            f"{cfg.fed.strategy}) can cost much accuracy: measured -47 pp on model="
            "'quickstart_cnn' (0.457 vs 0.928 uncompressed, 30 rounds) while the digits CNN "
            "matched; see docs/compression.md ('Known failure: FedAdam')")
