"""Distillation as a composed step: the Distiller, its reports and state; Distilled in a stack."""

import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg

from fedslim.client.app import make_client_app
from fedslim.config import parse_run_config
from fedslim.report import RoundCollector
from fedslim.strategies import Compressed, Distilled, Distiller
from fedslim.strategies.uplink import reply_order
from fedslim.task.data import load_splits
from fedslim.task.distill import ensemble_teacher
from fedslim.task.models import build_model
from tests.loopback import LoopbackGrid


def _distiller(**kw):
    cfg = parse_run_config({"distill": True, "distill-steps": 20, "distill-eval-every": 10,
                            **kw})
    splits = load_splits(cfg.data, 0)
    return Distiller(cfg.distill, splits, cfg.train.model, torch.device("cpu"), seed=0), splits


def test_distill_round_reports_lowers_kl_and_round_trips_state():
    dist, _ = _distiller(**{"distill-teacher": "both"})
    torch.manual_seed(1)
    base = build_model("digits_cnn").state_dict()
    report = dist.distill(1, [base, base], base)
    assert report.teacher == "both" and report.teacher_models == 2
    assert report.student_params <= 0.25 * report.global_params
    assert report.kl_after <= report.kl_before
    assert report.student_bytes < report.global_bytes
    fresh, _ = _distiller()
    fresh.load_state_dict(dist.state_dict())
    for k, v in fresh.student.state_dict().items():
        assert torch.equal(v, dist.student.state_dict()[k])


def test_only_a_never_distilled_student_leaves_its_init_out_of_selection(monkeypatch):
    import fedslim.strategies.distill as mod

    seen = []
    real = mod.distill_student

    def spy(*args, keep_start, **kw):
        seen.append(keep_start)
        return real(*args, keep_start=keep_start, **kw)

    monkeypatch.setattr(mod, "distill_student", spy)
    dist, _ = _distiller(**{"distill-every": 2})
    base = build_model("digits_cnn").state_dict()
    assert [r for r in (1, 2, 3) if dist.due(r, num_rounds=3)] == [2, 3]
    for rnd in (2, 3):
        dist.distill(rnd, [base], base)
    assert seen == [False, True]


def test_distilled_teaches_from_exactly_the_decoded_client_models(monkeypatch):
    """Under Compressed, the ensemble = base global + each client's decoded update."""
    import fedslim.strategies.distill as mod

    dist, _ = _distiller()
    captured = {}
    real_distill = dist.distill

    def spy(rnd, client_states, global_state):
        captured["clients"] = client_states
        return real_distill(rnd, client_states, global_state)

    monkeypatch.setattr(dist, "distill", spy)
    collector = RoundCollector()
    inner = FedAvg(fraction_evaluate=0.0)
    seen_replies = []
    real_agg = inner.aggregate_train

    def agg(server_round, replies):
        replies = list(replies)
        seen_replies.extend(replies)
        return real_agg(server_round, replies)

    monkeypatch.setattr(inner, "aggregate_train", agg)
    strategy = Compressed(Distilled(inner, dist, num_rounds=1, collector=collector),
                          uplink="topk:0.1|q:4", collector=collector)
    grid = LoopbackGrid(make_client_app({"local-epochs": 1}), 3)
    torch.manual_seed(0)
    strategy.start(grid, ArrayRecord(build_model("digits_cnn").state_dict()), num_rounds=1)
    assert len(captured["clients"]) == 3
    # (teachers come in a fixed order: partition id, then node id)
    for state, reply in zip(captured["clients"], sorted(seen_replies, key=reply_order),
                            strict=True):
        want = reply.content["arrays"].to_torch_state_dict()
        for k in want:
            assert torch.equal(state[k], want[k].float() if want[k].is_floating_point()
                               else want[k])
    assert collector.current is not None and collector.current.distill is not None
    # The ensemble teacher's logits are the mean of exactly these models' logits.
    models = []
    for s in captured["clients"]:
        m = build_model("digits_cnn")
        m.load_state_dict(s)
        models.append(m)
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(ensemble_teacher(models)(x),
                               torch.stack([m.eval()(x) for m in models]).mean(0))
    assert mod  # the module under test
