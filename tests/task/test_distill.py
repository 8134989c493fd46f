import copy
import inspect

import numpy as np
import pytest
import torch
from torch import nn

from fedslim.config import parse_run_config
from fedslim.errors import ConfigError, DataError
from fedslim.task.data import ArrayData, load_splits
from fedslim.task.distill import (
    DistillStats,
    combine_teachers,
    distill_student,
    ensemble_teacher,
    kl_to_teacher,
)
from fedslim.task.models import build_model
from fedslim.task.train import evaluate, predict_logits, train_local

CPU = torch.device("cpu")


def _dcfg(**kw):
    return parse_run_config({f"distill-{k.replace('_', '-')}": v for k, v in kw.items()}).distill


@pytest.fixture(scope="module")
def splits():
    return load_splits(parse_run_config().data, 0)


@pytest.fixture(scope="module")
def trained_cnn(splits):
    """A digits_cnn teacher trained briefly on the clients' pool (~98% test accuracy)."""
    cfg = parse_run_config({"local-epochs": 3, "optimizer": "adam", "learning-rate": 0.005,
                            "batch-size": 64}).train
    torch.manual_seed(0)
    model = build_model("digits_cnn")
    train_local(model, splits.clients, cfg, server_round=1, seed_parts=(0,), device=CPU)
    return model.eval()


def _fresh_student(seed=1):
    torch.manual_seed(seed)
    return build_model("digits_student")


@pytest.mark.parametrize("aug", ["none", "noise+shift"])
def test_distillation_lowers_kl_and_learns_without_labels(splits, trained_cnn, aug):
    cfg = _dcfg(steps=150, lr=3e-3, augment=aug, patience=100, eval_every=25)
    student = _fresh_student()
    stats = distill_student(student, ensemble_teacher([trained_cnn]), splits.proxy_x,
                            splits.val, cfg, device=CPU, seed_parts=(0, 1))
    assert isinstance(stats, DistillStats)
    assert stats.steps == 150 and not stats.stopped_early
    assert stats.kl_after < 0.25 * stats.kl_before
    assert stats.val_accuracy > 0.7  # chance is 0.1
    now = evaluate(student, splits.val, CPU)
    assert (now.accuracy, now.loss) == (stats.val_accuracy, stats.val_loss)
    assert stats.kl_after == pytest.approx(
        kl_to_teacher(student, ensemble_teacher([trained_cnn]), splits.proxy_x, 3.0, CPU),
        rel=1e-5)


def test_ensemble_is_the_mean_of_member_logits(splits):
    torch.manual_seed(0)
    models = [build_model("digits_cnn") for _ in range(3)]
    x = torch.from_numpy(splits.proxy_x[:50])
    members = [predict_logits(m, x, CPU) for m in models]
    torch.testing.assert_close(ensemble_teacher(models)(x), torch.stack(members).mean(0))
    pair = ensemble_teacher(models[:2])(x)
    assert not torch.allclose(pair, members[0]) and not torch.allclose(pair, members[1])
    both = combine_teachers(ensemble_teacher(models[:2]), ensemble_teacher(models[2:]))(x)
    torch.testing.assert_close(both, (pair + members[2]) / 2)
    with pytest.raises(ValueError):
        ensemble_teacher([])
    with pytest.raises(ValueError):
        combine_teachers()


def test_early_stopping_restores_the_best_val_state(splits, trained_cnn):
    # Warm start from a good model and distil towards an anti-teacher: val loss can only
    # rise, so the best state is the warm start (step 0) and it must come back bit-exact.
    student = copy.deepcopy(trained_cnn)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    start_eval = evaluate(student, splits.val, CPU)
    ensemble = ensemble_teacher([trained_cnn])
    anti = lambda x: -ensemble(x)  # noqa: E731
    cfg = _dcfg(steps=500, lr=1e-2, eval_every=5, patience=2, augment="none")
    stats = distill_student(student, anti, splits.proxy_x, splits.val, cfg, device=CPU,
                            seed_parts=(3,))
    assert stats.stopped_early and stats.steps == 10 and stats.best_step == 0
    assert stats.val_accuracy == start_eval.accuracy == evaluate(student, splits.val, CPU).accuracy
    assert stats.val_loss == start_eval.loss
    for k, v in student.state_dict().items():
        assert torch.equal(v, start[k]), k


def test_a_fresh_student_never_falls_back_to_its_init(splits, trained_cnn):
    # Anti-teacher again: with keep_start=False the init is not a candidate, so the kept
    # state is one the distillation produced (the first evaluation, as loss only rises).
    ensemble = ensemble_teacher([trained_cnn])
    anti = lambda x: -ensemble(x)  # noqa: E731
    cfg = _dcfg(steps=500, lr=1e-2, eval_every=5, patience=2, augment="none")
    student = _fresh_student()
    start = {k: v.clone() for k, v in student.state_dict().items()}
    stats = distill_student(student, anti, splits.proxy_x, splits.val, cfg, device=CPU,
                            seed_parts=(3,), keep_start=False)
    assert stats.best_step >= 5 and stats.stopped_early
    assert stats.val_loss == evaluate(student, splits.val, CPU).loss
    assert not all(torch.equal(v, start[k]) for k, v in student.state_dict().items())


def test_restored_state_is_the_best_one_seen(splits, trained_cnn, monkeypatch):
    import fedslim.task.distill as distill_mod

    seen = []

    def spy(model, data, device):
        out = evaluate(model, data, device)
        seen.append(out.loss)
        return out

    monkeypatch.setattr(distill_mod, "evaluate", spy)
    cfg = _dcfg(steps=200, lr=1e-2, eval_every=10, patience=2, augment="noise+shift")
    student = _fresh_student(2)
    stats = distill_student(student, ensemble_teacher([trained_cnn]), splits.proxy_x,
                            splits.val, cfg, device=CPU, seed_parts=(4,))
    monkeypatch.undo()
    # evaluations (val loss) at steps 0, 10, 20, ...; the kept one is the first minimum
    assert len(seen) == 1 + stats.steps // 10
    best = min(seen)
    assert stats.val_loss == best == evaluate(student, splits.val, CPU).loss
    assert stats.best_step == 10 * seen.index(best)
    # stopping: `patience` evaluations after the minimum never went below it
    first_best = seen.index(best)
    assert stats.stopped_early == (len(seen) - 1 - first_best >= 2 and stats.steps < 200)
    if stats.stopped_early:
        assert len(seen) - 1 - first_best == 2


def test_same_seed_gives_identical_students(splits, trained_cnn):
    # enough steps that a fresh student gets below its initial val loss, so the kept state
    # is a trained one (best_step > 0) and the comparison is not between three inits
    cfg = _dcfg(steps=120, eval_every=20, augment="noise+shift")
    states = []
    for seed in (7, 7, 8):
        student = _fresh_student()
        stats = distill_student(student, ensemble_teacher([trained_cnn]), splits.proxy_x,
                                splits.val, cfg, device=CPU, seed_parts=(seed, 1))
        assert stats.best_step > 0, stats
        states.append(student.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_takes_only_unlabelled_inputs_as_array_or_tensor(splits, trained_cnn):
    params = inspect.signature(distill_student).parameters
    assert not any("label" in p or p in ("y", "proxy_y") for p in params)
    assert isinstance(splits.proxy_x, np.ndarray)  # the server never has proxy labels
    cfg = _dcfg(steps=20, eval_every=10)
    states = []
    for proxy in (splits.proxy_x, torch.from_numpy(splits.proxy_x)):
        student = _fresh_student()
        distill_student(student, ensemble_teacher([trained_cnn]), proxy, splits.val, cfg,
                        device=CPU, seed_parts=(0,))
        states.append(student.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


class _Recorder(nn.Module):
    """Wraps a student and records the inputs it is trained on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        if self.training:
            self.seen.append(x.detach().clone())
        return self.inner(x)


@pytest.mark.parametrize("aug", ["none", "noise", "shift", "noise+shift"])
def test_teacher_scores_the_same_augmented_batch(splits, trained_cnn, aug):
    calls = []
    base = ensemble_teacher([trained_cnn])

    def teacher(x):
        calls.append(x.detach().clone())
        return base(x)

    student = _Recorder(_fresh_student())
    cfg = _dcfg(steps=6, eval_every=3, batch_size=32, augment=aug)
    distill_student(student, teacher, splits.proxy_x, splits.val, cfg, device=CPU,
                    seed_parts=(0,))
    assert len(student.seen) == 6
    if aug == "none":  # teacher run once on the whole proxy set, then indexed
        assert len(calls) == 1 and len(calls[0]) == len(splits.proxy_x)
        return
    assert len(calls) == 1 + 6
    for xs, xt in zip(student.seen, calls[1:], strict=True):
        assert torch.equal(xs, xt)


def test_empty_val_keeps_the_last_state(splits, trained_cnn):
    empty = ArrayData(np.zeros((0, 1, 8, 8), np.float32), np.zeros(0, np.int64))
    stats = distill_student(_fresh_student(), ensemble_teacher([trained_cnn]), splits.proxy_x,
                            empty, _dcfg(steps=12, eval_every=5), device=CPU, seed_parts=(0,))
    assert stats.steps == 12 and stats.best_step == 12 and np.isnan(stats.val_accuracy)
    assert stats.kl_after < stats.kl_before


def test_rejects_bad_proxy_and_class_mismatch(splits, trained_cnn):
    teacher = ensemble_teacher([trained_cnn])
    with pytest.raises(DataError, match="proxy_x"):
        distill_student(_fresh_student(), teacher, np.zeros((0, 1, 8, 8), np.float32),
                        splits.val, _dcfg(), device=CPU, seed_parts=(0,))
    with pytest.raises(ConfigError, match="classes"):
        distill_student(build_model("digits_student", num_classes=5), teacher, splits.proxy_x,
                        splits.val, _dcfg(), device=CPU, seed_parts=(0,))


def test_kl_to_teacher_is_zero_for_itself_and_batch_invariant(splits, trained_cnn):
    teacher = ensemble_teacher([trained_cnn])
    assert kl_to_teacher(trained_cnn, teacher, splits.proxy_x, 3.0, CPU) == pytest.approx(
        0.0, abs=1e-6)
    student = _fresh_student()
    a = kl_to_teacher(student, teacher, splits.proxy_x, 2.0, CPU, batch_size=7)
    b = kl_to_teacher(student, teacher, splits.proxy_x, 2.0, CPU)
    assert a > 0 and a == pytest.approx(b, rel=1e-5)
