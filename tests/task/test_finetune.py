"""trainable=all|head|schedule:N|lora:R: what moves, what stays, the rank of an update."""

from __future__ import annotations

import pytest
import torch

from fedslim.config import parse_run_config
from fedslim.errors import ConfigError
from fedslim.task.finetune import layers, parse_trainable, trained_names, training_scope
from fedslim.task.models import seeded_model


def _model() -> torch.nn.Module:
    return seeded_model("digits_cnn", 3, (1, 8, 8), 10)


def _train(model: torch.nn.Module, steps: int = 5) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1,
                          momentum=0.9, weight_decay=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _changed(model: torch.nn.Module, spec: str, server_round: int = 1) -> set[str]:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with training_scope(model, parse_trainable(spec), server_round, (1, 2)):
        _train(model)
    assert all(p.requires_grad for p in model.parameters())  # restored
    assert model.state_dict().keys() == before.keys()         # names unchanged
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def test_head_trains_only_the_classifier():
    assert _changed(_model(), "head") == {"head.3.weight", "head.3.bias"}


def test_schedule_unfreezes_one_more_layer_every_n_rounds():
    groups = layers(_model())
    assert [len(trained_names(_model(), parse_trainable("schedule:2"), r)) for r in
            (1, 2, 3, 5, 7, 99)] == [2, 2, 4, 6, 8, 8]
    assert _changed(_model(), "schedule:2", 3) == set(groups[-1] + groups[-2])


def test_lora_updates_have_rank_r_and_biases_train():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    changed = _changed(model, "lora:2")
    assert changed == set(before)  # every weight (as factors) and every bias moved
    for k, v in model.state_dict().items():
        if v.ndim >= 2:
            delta = (v - before[k]).flatten(1)
            assert torch.linalg.matrix_rank(delta) <= 2, k


def test_all_is_plain_training():
    assert _changed(_model(), "all") == set(_model().state_dict())


@pytest.mark.parametrize("bad", ["some", "schedule:0", "lora:", "head:1", "lora:-1"])
def test_bad_specs_are_one_line(bad):
    with pytest.raises(ConfigError, match="trainable"):
        parse_run_config({"trainable": bad})


def test_lora_and_sparse_training_are_refused_together():
    with pytest.raises(ConfigError, match="sparse-training"):
        parse_run_config({"trainable": "lora:4", "sparse-training": True})
