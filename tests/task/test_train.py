import numpy as np
import pytest
import torch

from fedslim.config import Augment, DevicePref, parse_run_config
from fedslim.errors import ConfigError
from fedslim.task.augment import augment
from fedslim.task.data import ArrayData, load_splits
from fedslim.task.models import build_model
from fedslim.task.train import evaluate, round_lr, select_device, train_local

CPU = torch.device("cpu")


def _data(n=256):
    s = load_splits(parse_run_config().data, 0)
    return ArrayData(s.clients.x[:n], s.clients.y[:n])


def test_one_training_step_lowers_the_loss():
    cfg = parse_run_config({"local-epochs": 1, "batch-size": 256}).train
    data = _data(256)
    torch.manual_seed(0)
    model = build_model("digits_cnn")
    before = evaluate(model, data, CPU).loss
    stats = train_local(model, data, cfg, server_round=1, seed_parts=(0, 0), device=CPU)
    assert stats.steps == 1
    assert evaluate(model, data, CPU).loss < before


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_training_is_deterministic_on_cpu(opt):
    cfg = parse_run_config({"optimizer": opt, "learning-rate": 0.01, "clip-norm": 1.0,
                            "augment": "noise+shift"}).train
    states = []
    for _ in range(2):
        torch.manual_seed(1)
        model = build_model("digits_student")
        train_local(model, _data(), cfg, server_round=3, seed_parts=(5, 2), device=CPU)
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_lr_decays_across_rounds():
    cfg = parse_run_config({"learning-rate": 0.1, "lr-decay": 0.5}).train
    assert round_lr(cfg, 1) == 0.1 and round_lr(cfg, 3) == pytest.approx(0.025)


def test_device_selection():
    assert select_device(DevicePref.CPU) == CPU
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device(DevicePref.AUTO).type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda"):
            select_device(DevicePref.CUDA)


def test_augment_shapes_and_shift_moves_pixels():
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(16, 1, 8, 8)
    x[:, :, 4, 4] = 1.0
    out = augment(x, Augment.SHIFT, gen, max_shift=1)
    assert out.shape == x.shape and torch.allclose(out.sum((1, 2, 3)), torch.ones(16))
    assert (out[:, 0, 4, 4] == 0).any()
    assert augment(x, Augment.NONE, gen) is x
    noisy = augment(x, Augment.NOISE, gen)
    assert not torch.equal(noisy, x)


def test_evaluate_empty_is_nan_not_crash():
    empty = ArrayData(np.zeros((0, 1, 8, 8), np.float32), np.zeros(0, np.int64))
    ev = evaluate(build_model("digits_cnn"), empty, CPU)
    assert ev.num_examples == 0 and np.isnan(ev.accuracy)
