"""Distillation strategy: FedAvg (compressed or not) plus a compact global student.

After each aggregation (every ``distill-every`` rounds, and always in the last), the server
builds a teacher from what the round produced and distils it into a persistent student on
its *unlabelled* proxy set (FedDF, Lin et al. 2020):

* ``ensemble``: mean logits of the participating clients' models, each reconstructed as
  *the global model the client started from + its decoded update* (so it works unchanged
  with compressed uplinks: the teacher is exactly what the server received);
* ``global``: the new aggregated global model; ``both``: the mean of the two.

The student warm-starts from the previous round, early-stops on the server's validation
split, and never sees test data; test accuracy is only reported.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from safetensors.torch import save as st_save

from fedslim.config import DistillConfig, Teacher
from fedslim.strategies.aggregate import apply_step
from fedslim.strategies.compressed import CompressedFedAvg
from fedslim.task.data import Splits
from fedslim.task.distill import combine_teachers, distill_student, ensemble_teacher
from fedslim.task.models import build_model, count_params
from fedslim.task.train import evaluate

STUDENT_PREFIX = "student/"


def serialized_size(state: dict[str, torch.Tensor]) -> int:
    """Bytes of a state dict as safetensors (what would be shipped or stored)."""
    return len(st_save({k: v.detach().cpu().contiguous() for k, v in state.items()}))


class DistillingFedAvg(CompressedFedAvg):
    """:class:`CompressedFedAvg` that also distils a compact student each round."""

    def __init__(self, *, distill: DistillConfig, splits: Splits, global_model: str,
                 device: torch.device, num_rounds: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dcfg = distill
        self.splits = splits
        self.device = device
        self.num_rounds = num_rounds
        c, k = splits.input_shape[0], splits.num_classes
        self.make_global = lambda: build_model(global_model, c, k)
        torch.manual_seed(self.seed + 1)
        self.student = build_model(distill.student_model, c, k)
        self.last_distill: dict[str, Any] | None = None

    def _client_models(self) -> list[torch.nn.Module]:
        """Each accepted client's model: the base global + its decoded update."""
        assert self.last_base is not None
        models = []
        for rep in self.last_accepted:
            m = self.make_global()
            m.load_state_dict(apply_step(self.last_base, rep.update))
            models.append(m)
        return models

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        rnd = server_round + self.round_offset
        self.last_distill = None
        due = rnd % self.dcfg.every == 0 or rnd == self.num_rounds
        if arrays is not None and due:
            self.last_distill = self._distill(rnd)
        return arrays, metrics

    def _distill(self, rnd: int) -> dict[str, Any]:
        assert self.global_state is not None
        t0 = time.perf_counter()
        global_model = self.make_global()
        global_model.load_state_dict(self.global_state)
        teachers = []
        if self.dcfg.teacher in (Teacher.ENSEMBLE, Teacher.BOTH):
            teachers.append(ensemble_teacher(self._client_models()))
        if self.dcfg.teacher in (Teacher.GLOBAL, Teacher.BOTH):
            teachers.append(ensemble_teacher([global_model]))
        teacher = combine_teachers(*teachers) if len(teachers) > 1 else teachers[0]
        # A never-distilled student is a random init: it must not win the val selection
        # against its own training. Some earlier round r < rnd was due (r % every == 0)
        # iff every < rnd; derived from the round, so it also holds after a resume.
        distilled_before = rnd > self.dcfg.every
        stats = distill_student(self.student, teacher, self.splits.proxy_x, self.splits.val,
                                self.dcfg, device=self.device, seed_parts=(self.seed, rnd),
                                keep_start=distilled_before)
        seconds = time.perf_counter() - t0
        test = self.splits.test
        x, y = test.tensors(self.device)
        with torch.no_grad():
            teacher_acc = (teacher(x).argmax(1) == y).float().mean().item()
        student_eval = evaluate(self.student, test, self.device)
        return {
            "round": rnd, "teacher": self.dcfg.teacher.value,
            "teacher_models": len(self.last_accepted) if self.dcfg.teacher is not
            Teacher.GLOBAL else 1,
            "teacher_test_accuracy": teacher_acc,
            "global_test_accuracy": evaluate(global_model, test, self.device).accuracy,
            "student_test_accuracy": student_eval.accuracy,
            "student_val_accuracy": stats.val_accuracy,
            "student_val_loss": stats.val_loss,
            "student_params": count_params(self.student),
            "global_params": count_params(global_model),
            "student_bytes": serialized_size(self.student.state_dict()),
            "global_bytes": serialized_size(self.global_state),
            "kl_before": stats.kl_before, "kl_after": stats.kl_after,
            "steps": stats.steps, "best_step": stats.best_step,
            "stopped_early": stats.stopped_early, "distill_seconds": seconds,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        state.update({STUDENT_PREFIX + k: v for k, v in self.student.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        student = {k[len(STUDENT_PREFIX):]: v for k, v in state.items()
                   if k.startswith(STUDENT_PREFIX)}
        if student:
            self.student.load_state_dict(student)
