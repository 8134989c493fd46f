"""Distillation as a composed step: ``Distilled(strategy, Distiller(...))``.

After each aggregation (every ``distill-every`` rounds, and always in the last) the
:class:`Distiller` builds a teacher from what the round produced and distils it into a
persistent compact student on the server's *unlabelled* proxy set (FedDF, Lin et al. 2020):

* ``ensemble``: mean logits of the accepted clients' models -- the plain weights the
  wrapped strategy aggregates, which under :class:`~fedslim.strategies.compressed.Compressed`
  are *the global model the client started from + its decoded update* (so the teacher is
  exactly what the server received);
* ``global``: the new aggregated global model; ``both``: the mean of the two.

The student warm-starts from the previous round, early-stops on the server's validation
split and never sees test data; test accuracy is only reported. The Distiller owns the
student, its checkpoint state and its export (float32 + int8 safetensors).

:class:`Distilled` is a strategy wrapper, so it composes with any strategy; put it *inside*
``Compressed`` so it sees decoded weights.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy
from safetensors.torch import save as st_save

from fedslim.config import DistillConfig, Teacher
from fedslim.flower_io import to_state
from fedslim.protocol import STUDENT_FILE, STUDENT_INT8_FILE
from fedslim.report import DistillReport, RoundCollector, StudentReport
from fedslim.server.storage import save_model
from fedslim.strategies.stream import StreamingStrategy, Update, streams
from fedslim.strategies.uplink import reply_order
from fedslim.strategies.wrapper import StrategyWrapper
from fedslim.task.data import Splits
from fedslim.task.distill import combine_teachers, distill_student, ensemble_teacher
from fedslim.task.models import build_model, count_params
from fedslim.task.ptq import dequantize_state_int8, quantize_state_int8
from fedslim.task.train import evaluate

State = dict[str, torch.Tensor]


def serialized_size(state: State) -> int:
    """Bytes of a state dict as safetensors (what would be shipped or stored)."""
    return len(st_save({k: v.detach().cpu().contiguous() for k, v in state.items()}))


class Distiller:
    """Owns the student: distils it from a round's models, checkpoints and exports it."""

    def __init__(self, cfg: DistillConfig, splits: Splits, global_model: str,
                 device: torch.device, seed: int) -> None:
        self.cfg, self.splits, self.device, self.seed = cfg, splits, device, seed
        self.global_model = global_model
        torch.manual_seed(seed + 1)
        self.student = self._build(cfg.student_model)

    def _build(self, name: str) -> torch.nn.Module:
        return build_model(name, self.splits.input_shape, self.splits.num_classes)

    def _model(self, state: State) -> torch.nn.Module:
        m = self._build(self.global_model)
        m.load_state_dict(state)
        return m

    def due(self, rnd: int, num_rounds: int) -> bool:
        return rnd % self.cfg.every == 0 or rnd == num_rounds

    def distill(self, rnd: int, client_states: list[State], global_state: State
                ) -> DistillReport:
        """One distillation from this round's client models and new global model."""
        t0 = time.perf_counter()
        global_model = self._model(global_state)
        teachers = []
        if self.cfg.teacher in (Teacher.ENSEMBLE, Teacher.BOTH):
            teachers.append(ensemble_teacher([self._model(s) for s in client_states]))
        if self.cfg.teacher in (Teacher.GLOBAL, Teacher.BOTH):
            teachers.append(ensemble_teacher([global_model]))
        teacher = combine_teachers(*teachers) if len(teachers) > 1 else teachers[0]
        # A never-distilled student is a random init: it must not win the val selection
        # against its own training. Some earlier round r < rnd was due (r % every == 0)
        # iff every < rnd; derived from the round, so it also holds after a resume.
        stats = distill_student(self.student, teacher, self.splits.proxy_x, self.splits.val,
                                self.cfg, device=self.device, seed_parts=(self.seed, rnd),
                                keep_start=rnd > self.cfg.every)
        seconds = time.perf_counter() - t0
        test = self.splits.test
        x, y = test.tensors(self.device)
        with torch.no_grad():
            teacher_acc = (teacher(x).argmax(1) == y).float().mean().item()
        return DistillReport(
            round=rnd, teacher=self.cfg.teacher.value,
            teacher_models=len(client_states) if self.cfg.teacher is not Teacher.GLOBAL else 1,
            teacher_test_accuracy=teacher_acc,
            global_test_accuracy=evaluate(global_model, test, self.device).accuracy,
            student_test_accuracy=evaluate(self.student, test, self.device).accuracy,
            student_val_accuracy=stats.val_accuracy, student_val_loss=stats.val_loss,
            student_params=count_params(self.student),
            global_params=count_params(global_model),
            student_bytes=serialized_size(self.student.state_dict()),
            global_bytes=serialized_size(global_state),
            kl_before=stats.kl_before, kl_after=stats.kl_after, steps=stats.steps,
            best_step=stats.best_step, stopped_early=stats.stopped_early,
            distill_seconds=seconds)

    def export(self, outdir: Path, global_params: int) -> StudentReport:
        """Save the student (float32) and a post-training int8 copy; measure both."""
        state = {k: v.detach().cpu() for k, v in self.student.state_dict().items()}
        meta = {"model": self.cfg.student_model, "fedslim": "distilled-student"}
        fp32_bytes = save_model(outdir / STUDENT_FILE, state, meta)
        q = quantize_state_int8(state)
        int8_bytes = save_model(outdir / STUDENT_INT8_FILE, q, {**meta, "quantized": "int8"})
        qmodel = self._build(self.cfg.student_model)
        qmodel.load_state_dict(dequantize_state_int8(q))
        params = count_params(self.student)
        return StudentReport(
            model=self.cfg.student_model, params=params,
            param_fraction_of_global=params / global_params, file=STUDENT_FILE,
            file_bytes=fp32_bytes,
            test_accuracy=evaluate(self.student, self.splits.test, self.device).accuracy,
            val_accuracy=evaluate(self.student, self.splits.val, self.device).accuracy,
            int8_file=STUDENT_INT8_FILE, int8_file_bytes=int8_bytes,
            int8_test_accuracy=evaluate(qmodel, self.splits.test, self.device).accuracy)

    def state_dict(self) -> State:
        return {f"student/{k}": v for k, v in self.student.state_dict().items()}

    def load_state_dict(self, state: State) -> None:
        student = {k[len("student/"):]: v for k, v in state.items() if k.startswith("student/")}
        if student:
            self.student.load_state_dict(student)


class Distilled(StrategyWrapper):
    """Runs ``distiller`` after each of ``strategy``'s aggregations that is due."""

    def __init__(self, strategy: Strategy, distiller: Distiller, *, num_rounds: int,
                 arrays_key: str = "arrays", collector: RoundCollector | None = None) -> None:
        super().__init__(strategy, collector, reports=True)
        self.collector: RoundCollector = self.collector or RoundCollector()
        self.distiller = distiller
        self.num_rounds = num_rounds
        self.arrays_key = arrays_key

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None or not self.distiller.due(server_round, self.num_rounds):
            return arrays, metrics
        ok = [m for m in replies
              if not m.has_error() and self.arrays_key in m.content.array_records]
        clients = [to_state(m.content.array_records[self.arrays_key])
                   for m in self._teachers(server_round, ok)]
        self._distill(server_round, clients, arrays)
        return arrays, metrics

    @property
    def streaming(self) -> bool:
        return streams(self.strategy)

    def aggregate_updates(self, server_round: int, updates: Sequence[Update]
                          ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Streaming: only the (at most ``max_teachers``) teachers' models are decoded and
        held at once, after the wrapped strategy has folded every update."""
        inner = self.strategy
        assert isinstance(inner, StreamingStrategy)  # (streaming is True only then)
        arrays, metrics = inner.aggregate_updates(server_round, updates)
        if arrays is None or not self.distiller.due(server_round, self.num_rounds):
            return arrays, metrics
        by_msg = {id(u.msg): u for u in updates}
        chosen = self._teachers(server_round, [u.msg for u in updates])
        self._distill(server_round, [by_msg[id(m)].weights() for m in chosen], arrays)
        return arrays, metrics

    def _teachers(self, server_round: int, replies: list[Message]) -> list[Message]:
        """At most ``max_teachers`` replies, in a fixed order: a seeded sample if more."""
        ordered = sorted(replies, key=reply_order)
        limit = self.distiller.cfg.max_teachers
        if len(ordered) <= limit:
            return ordered
        rng = random.Random(f"{self.distiller.seed}/{server_round}/teachers")
        return sorted(rng.sample(ordered, limit), key=reply_order)

    def _distill(self, server_round: int, clients: list[State], arrays: ArrayRecord) -> None:
        report = self.distiller.distill(server_round, clients, to_state(arrays))
        self.collector.open(server_round).distill = report

    def own_state(self) -> State:
        return self.distiller.state_dict()

    def load_own_state(self, state: State) -> None:
        self.distiller.load_state_dict(state)
