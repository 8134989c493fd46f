"""The distillation strategy's teacher is built from the right client models."""

import torch

from fedslim.config import parse_run_config
from fedslim.strategies.compressed import DecodedReply
from fedslim.strategies.distill import DistillingFedAvg
from fedslim.task.data import load_splits
from fedslim.task.distill import ensemble_teacher
from fedslim.task.models import build_model


def _strategy(**kw):
    cfg = parse_run_config({"distill": True, "distill-steps": 20, "distill-eval-every": 10,
                            **kw})
    splits = load_splits(cfg.data, 0)
    return DistillingFedAvg(comp=cfg.comp, distill=cfg.distill, splits=splits,
                            global_model=cfg.train.model, device=torch.device("cpu"),
                            num_rounds=3, seed=0), splits


def test_client_models_are_base_plus_decoded_update():
    strat, _ = _strategy()
    torch.manual_seed(0)
    base = build_model("digits_cnn").state_dict()
    updates = [{k: torch.randn_like(v) * 0.01 for k, v in base.items()} for _ in range(3)]
    strat.last_base = base
    strat.last_accepted = [DecodedReply(update=u, weight=1.0, metrics=None) for u in updates]
    models = strat._client_models()
    assert len(models) == 3
    for m, u in zip(models, updates, strict=True):
        for k, v in m.state_dict().items():
            torch.testing.assert_close(v, base[k] + u[k], rtol=0, atol=0)
    # The ensemble teacher's logits are the mean of exactly these models' logits.
    x = torch.randn(5, 1, 8, 8)
    want = torch.stack([m.eval()(x) for m in models]).mean(0)
    torch.testing.assert_close(ensemble_teacher(models)(x), want)


def test_distill_round_reports_and_lowers_kl():
    strat, splits = _strategy(**{"distill-teacher": "both"})
    torch.manual_seed(1)
    base = build_model("digits_cnn").state_dict()
    strat.global_state = base
    strat.last_base = base
    strat.last_accepted = [DecodedReply(update={k: torch.zeros_like(v) for k, v in base.items()},
                                        weight=1.0, metrics=None)]
    row = strat._distill(rnd=1)
    assert row["teacher"] == "both" and row["student_params"] <= 0.25 * row["global_params"]
    assert row["kl_after"] <= row["kl_before"]
    assert row["student_bytes"] < row["global_bytes"]
    state = strat.state_dict()
    assert any(k.startswith("student/") for k in state)
    fresh, _ = _strategy()
    fresh.load_state_dict(state)
    for k, v in fresh.student.state_dict().items():
        assert torch.equal(v, strat.student.state_dict()[k])


def test_only_a_never_distilled_student_leaves_its_init_out_of_selection(monkeypatch):
    import fedslim.strategies.distill as mod

    seen = []
    real = mod.distill_student

    def spy(*args, keep_start, **kw):
        seen.append(keep_start)
        return real(*args, keep_start=keep_start, **kw)

    monkeypatch.setattr(mod, "distill_student", spy)
    strat, _ = _strategy(**{"distill-every": 2})
    base = build_model("digits_cnn").state_dict()
    strat.global_state = strat.last_base = base
    strat.last_accepted = [DecodedReply(update={k: torch.zeros_like(v) for k, v in base.items()},
                                        weight=1.0, metrics=None)]
    for rnd in (2, 3):  # the rounds that are due with every=2 and num_rounds=3
        strat._distill(rnd=rnd)
    assert seen == [False, True]
