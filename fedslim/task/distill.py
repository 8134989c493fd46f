"""Server-side ensemble distillation into a compact student (in the spirit of FedDF).

FedDF (Lin et al., 2020) fuses client models by distilling their averaged logits into a
model on *unlabelled* server-side data. Here the distilled model is a separate, smaller
*student* that the server keeps across rounds (warm start) and exports. Only the proxy
inputs are used for the loss; the labelled server ``val`` split is used for early stopping
and model selection only, and ``test`` is never touched here.

The teacher is any callable mapping an input batch on the device to logits, so the same
loop serves every :class:`~fedslim.config.Teacher` choice: an ensemble of client models,
the aggregated global model, or the mean of both (:func:`combine_teachers`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedslim.config import Augment, DistillConfig
from fedslim.errors import ConfigError, DataError
from fedslim.task.augment import augment
from fedslim.task.data import ArrayData
from fedslim.task.train import EvalStats, evaluate, make_generator, predict_logits

TeacherFn = Callable[[torch.Tensor], torch.Tensor]
"""Inputs ``(B, C, H, W)`` on the device -> logits ``(B, K)`` on the same device."""

_CHUNK = 1024  # rows per forward pass when scoring a whole set (bounds peak memory)


def ensemble_teacher(models: Sequence[nn.Module]) -> TeacherFn:
    """A teacher whose logits are the mean of ``models``' logits.

    Averaging logits (not probabilities) is what FedDF does; it keeps the ensemble's
    relative confidences and lets the temperature soften them afterwards. Every call puts
    the models in eval mode (BatchNorm uses running statistics; a teacher is never
    trained here) and moves them to the input's device, which is a no-op once they are
    there.

    Raises
    ------
    ValueError
        If ``models`` is empty: an empty ensemble has no defined output.
    """
    members = list(models)
    if not members:
        raise ValueError("ensemble_teacher needs at least one model, got none")

    @torch.no_grad()
    def teacher(x: torch.Tensor) -> torch.Tensor:
        outs = []
        for m in members:  # one forward per model, never per example
            m.to(x.device).eval()
            outs.append(m(x))
        return torch.stack(outs).mean(0)

    return teacher


def combine_teachers(*teachers: TeacherFn) -> TeacherFn:
    """Mean of several teachers' logits (``Teacher.BOTH``: client ensemble + global model).

    Raises
    ------
    ValueError
        If no teacher is given.
    """
    if not teachers:
        raise ValueError("combine_teachers needs at least one teacher, got none")

    @torch.no_grad()
    def teacher(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([t(x) for t in teachers]).mean(0)

    return teacher


@dataclass(frozen=True)
class DistillStats:
    """What one distillation did.

    ``kl_before`` / ``kl_after`` are the mean ``KL(teacher || student)`` at the
    distillation temperature on the *un-augmented* proxy set (not scaled by ``T**2``),
    before training and for the restored best state. ``val_loss`` / ``val_accuracy`` are
    the cross-entropy and accuracy of that restored state on the server's val split (NaN
    when the split is empty) and ``best_step`` the optimizer step it was taken at (0 = the
    warm-start state).
    """

    steps: int
    seconds: float
    kl_before: float
    kl_after: float
    val_loss: float
    val_accuracy: float
    best_step: int
    stopped_early: bool


def _as_inputs(x: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(x).to(device=device, dtype=torch.float32)


@torch.no_grad()
def teacher_logits(teacher: TeacherFn, x: torch.Tensor | np.ndarray, device: torch.device,
                   batch_size: int = _CHUNK) -> torch.Tensor:
    """The teacher's logits on all of ``x``, in chunks of ``batch_size`` rows, on ``device``."""
    xt = _as_inputs(x, device)
    if len(xt) == 0:
        return torch.empty(0, device=device)
    return torch.cat([teacher(xt[i:i + batch_size]) for i in range(0, len(xt), batch_size)])


def _kl(student_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float,
        reduction: str) -> torch.Tensor:
    """``KL(softmax(t/T) || softmax(s/T))`` per batch (``batchmean`` or ``sum`` over rows)."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(t_logits / temperature, dim=1),
                    reduction=reduction, log_target=True)


@torch.no_grad()
def _kl_on_set(student: nn.Module, t_logits: torch.Tensor, x: torch.Tensor,
               temperature: float, device: torch.device, batch_size: int) -> float:
    if len(x) == 0:
        return float("nan")
    s_logits = predict_logits(student, x, device, batch_size)
    return float(_kl(s_logits, t_logits, temperature, "sum")) / len(x)


def kl_to_teacher(student: nn.Module, teacher: TeacherFn, x: torch.Tensor | np.ndarray,
                  temperature: float, device: torch.device, batch_size: int = _CHUNK) -> float:
    """Mean ``KL(teacher || student)`` over the rows of ``x`` at ``temperature``.

    This is the distillation objective without the ``T**2`` gradient scale, so values
    are comparable across temperatures' losses only at equal ``T``. The student is left in
    eval mode. Returns NaN for an empty ``x``.
    """
    xt = _as_inputs(x, device)
    t_logits = teacher_logits(teacher, xt, device, batch_size)
    return _kl_on_set(student, t_logits, xt, temperature, device, batch_size)


def _batch_order(n: int, batch: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    """Row indices for ``steps`` batches: back-to-back random permutations of ``range(n)``.

    Sampling epoch-wise without replacement visits every proxy row equally often; one
    ``argsort`` of a random matrix draws all the permutations at once.
    """
    epochs = math.ceil(steps * batch / n)
    return torch.argsort(torch.rand(epochs, n, generator=gen), dim=1).flatten()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def distill_student(student: nn.Module, teacher: TeacherFn, proxy_x: torch.Tensor | np.ndarray,
                    val: ArrayData, cfg: DistillConfig, *, device: torch.device,
                    seed_parts: tuple[int, ...], keep_start: bool = True) -> DistillStats:
    """Train ``student`` in place to match ``teacher`` on the unlabelled proxy inputs.

    Loss: ``KL(softmax(t/T) || softmax(s/T)) * T**2`` (Hinton et al.; the ``T**2`` keeps
    gradient magnitudes comparable across temperatures), optimised with
    ``Adam(lr=cfg.lr)`` for at most ``cfg.steps`` steps of ``cfg.batch_size`` rows (capped
    at the proxy size). Each batch is augmented with ``cfg.augment`` and the teacher scores
    the *same* augmented batch, so the pair is consistent. Without augmentation the teacher
    is run once over the whole proxy set and its logits are indexed per batch.

    Model selection uses the labelled ``val`` split: the warm-start state is evaluated first
    (step 0; skipped with ``keep_start=False``), then every ``cfg.eval_every`` steps and at
    the last step. The state with the lowest val **cross-entropy** is kept; training stops
    after ``cfg.patience`` evaluations without a lower one, and the best state is restored,
    so distillation never leaves the student worse on val than it started.
    ``keep_start=False`` (for a student that has never been distilled) leaves the starting
    state out of the running: a random init's near-uniform outputs have a val loss of about
    ln(classes) that a student distilled from a weak early teacher may not beat within the
    patience window, and restoring the init would waste the round. (Loss, not accuracy: on a
    val split of a few hundred rows accuracy moves in steps of one example, so a student
    that is still improving often ties or dips by one example and was stopped and rolled
    back; the loss is continuous. Measured in ``docs/results/distill``.) With an empty
    ``val`` nothing is selected and the last state is kept.

    The student is *not* re-initialised: the caller keeps it across rounds. Proxy labels
    do not exist here by construction. Batch order and augmentation draw from
    ``make_generator(*seed_parts)``, so a run is reproducible on CPU.

    Raises
    ------
    DataError
        If ``proxy_x`` is empty or not a ``(N, C, H, W)`` array.
    ConfigError
        If the teacher's and the student's numbers of classes differ.
    """
    t0 = time.perf_counter()
    x_all = _as_inputs(proxy_x, device)
    if x_all.ndim < 2 or len(x_all) == 0:
        raise DataError(f"proxy_x must be a non-empty (N, ...) array, got shape "
                        f"{tuple(x_all.shape)}")
    student.to(device)
    temp = cfg.temperature
    # Teacher logits on the un-augmented set: needed for the KL report in any case, and
    # they are the training targets when there is no augmentation.
    t_all = teacher_logits(teacher, x_all, device)
    s_probe = predict_logits(student, x_all[:1], device)
    if t_all.ndim != 2 or t_all.shape[1] != s_probe.shape[1]:
        raise ConfigError(f"teacher gives logits of shape {tuple(t_all.shape)} but the "
                          f"student (student-model) has {s_probe.shape[1]} classes")
    kl_before = _kl_on_set(student, t_all, x_all, temp, device, _CHUNK)

    sel = _Selection(student, val, device, keep_start)
    step, stopped_early = _train(student, teacher, x_all, t_all, cfg, sel,
                                 make_generator(*seed_parts), device)
    best = sel.restore(step)
    kl_after = _kl_on_set(student, t_all, x_all, temp, device, _CHUNK)
    return DistillStats(steps=step, seconds=time.perf_counter() - t0, kl_before=kl_before,
                        kl_after=kl_after,
                        val_loss=best.loss if best is not None else float("nan"),
                        val_accuracy=best.accuracy if best is not None else float("nan"),
                        best_step=sel.best_step, stopped_early=stopped_early)


class _Selection:
    """Model selection on the val split: the state with the lowest val cross-entropy."""

    def __init__(self, student: nn.Module, val: ArrayData, device: torch.device,
                 keep_start: bool) -> None:
        self.student, self.val, self.device = student, val, device
        self.active = len(val) > 0
        self.best = evaluate(student, val, device) if self.active and keep_start else None
        self.best_state = _snapshot(student) if self.best is not None else {}
        self.best_step, self.since_best = 0, 0

    def check(self, step: int) -> None:
        now = evaluate(self.student, self.val, self.device)  # leaves it in eval mode
        self.student.train()
        if self.best is None or now.loss < self.best.loss:
            self.best, self.best_step = now, step
            self.best_state, self.since_best = _snapshot(self.student), 0
        else:
            self.since_best += 1

    def restore(self, step: int) -> EvalStats | None:
        if self.active:
            self.student.load_state_dict(self.best_state)
        else:
            self.best_step = step
        return self.best


def _train(student: nn.Module, teacher: TeacherFn, x_all: torch.Tensor, t_all: torch.Tensor,
           cfg: DistillConfig, sel: _Selection, gen: torch.Generator,
           device: torch.device) -> tuple[int, bool]:
    """The distillation steps; (steps taken, stopped early)."""
    n, temp = len(x_all), cfg.temperature
    batch = min(cfg.batch_size, n)
    order = _batch_order(n, batch, cfg.steps, gen).to(device)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    student.train()
    step = 0
    while step < cfg.steps:
        idx = order[step * batch:(step + 1) * batch]
        if cfg.augment is Augment.NONE:
            xb, tb = x_all[idx], t_all[idx]
        else:
            xb = augment(x_all[idx], cfg.augment, gen)
            with torch.no_grad():
                tb = teacher(xb)
        opt.zero_grad(set_to_none=True)
        loss = _kl(student(xb), tb, temp, "batchmean") * (temp * temp)
        loss.backward()
        opt.step()
        step += 1
        if sel.active and (step % cfg.eval_every == 0 or step == cfg.steps):
            sel.check(step)
            if sel.since_best >= cfg.patience and step < cfg.steps:
                return step, True
    return step, False
