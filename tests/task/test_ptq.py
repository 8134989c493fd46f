import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedslim.config import parse_run_config
from fedslim.errors import DecodeError, EncodeError
from fedslim.task.data import load_splits
from fedslim.task.models import build_model
from fedslim.task.ptq import SCALE_SUFFIX, dequantize_state_int8, quantize_state_int8
from fedslim.task.train import evaluate, train_local

CPU = torch.device("cpu")


def _check_round_trip(t: torch.Tensor) -> None:
    q = quantize_state_int8({"w": t})
    assert q["w"].dtype == torch.int8 and q["w"].shape == t.shape
    scale = q["w" + SCALE_SUFFIX]
    assert scale.dtype == torch.float32 and scale.shape == (t.shape[0],)
    back = dequantize_state_int8(q)["w"]
    assert back.dtype == torch.float32 and torch.isfinite(back).all()
    err = (back - t).abs().flatten(1)
    bound = scale[:, None] / 2 * (1 + 1e-5) + 1e-12  # float32 rounding of q * scale
    assert (err <= bound).all()


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=2, max_size=4),
       log_mag=st.floats(-6, 4), seed=st.integers(0, 2**31 - 1),
       zero_rows=st.integers(0, 3))
def test_round_trip_error_is_at_most_half_a_scale(shape, log_mag, seed, zero_rows):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen) * 10.0 ** log_mag
    t[:zero_rows] = 0.0
    _check_round_trip(t)


def test_zero_and_extreme_rows_do_not_produce_nan():
    t = torch.tensor([[0.0, 0.0, 0.0], [1e-30, -1e-30, 0.0], [3e38, -3e38, 1.0],
                      [1e-44, 0.0, -1e-45]])
    _check_round_trip(t)
    q = quantize_state_int8({"w": t})
    assert q["w" + SCALE_SUFFIX][0] == 1.0 and (q["w"][0] == 0).all()
    assert q["w"][2].tolist() == [127, -127, 0]


def test_small_tensors_and_non_floats_are_kept():
    state = {"w": torch.randn(4, 3), "b": torch.randn(4, dtype=torch.float64),
             "n": torch.tensor(7), "i": torch.arange(6).reshape(2, 3)}
    q = quantize_state_int8(state)
    assert set(q) == {"w", "w" + SCALE_SUFFIX, "b", "n", "i"}
    assert q["b"].dtype == torch.float32 and torch.equal(q["b"], state["b"].float())
    assert torch.equal(q["n"], state["n"]) and torch.equal(q["i"], state["i"])
    back = dequantize_state_int8(q)
    assert set(back) == set(state) and torch.equal(back["i"], state["i"])


def test_batchnorm_model_round_trips_through_safetensors():
    model = build_model("resnet8", (3, 32, 32), 10)
    back = dequantize_state_int8(st_load(st_save(quantize_state_int8(model.state_dict()))))
    build_model("resnet8", (3, 32, 32), 10).load_state_dict(back, strict=True)
    assert back["stem.1.num_batches_tracked"].dtype == torch.int64


def test_quantized_student_keeps_accuracy_and_is_small():
    splits = load_splits(parse_run_config().data, 0)
    cfg = parse_run_config({"local-epochs": 3, "optimizer": "adam", "learning-rate": 0.005,
                            "batch-size": 64}).train
    torch.manual_seed(0)
    model = build_model("digits_student")
    train_local(model, splits.clients, cfg, server_round=1, seed_parts=(0,), device=CPU)
    float_acc = evaluate(model, splits.test, CPU).accuracy
    assert float_acc > 0.8  # a real model, not a near-constant one

    float_bytes = st_save({k: v.contiguous() for k, v in model.state_dict().items()})
    int8_bytes = st_save(quantize_state_int8(model.state_dict()))
    assert len(int8_bytes) < 0.30 * len(float_bytes)

    restored = build_model("digits_student")
    restored.load_state_dict(dequantize_state_int8(st_load(int8_bytes)), strict=True)
    q_acc = evaluate(restored, splits.test, CPU).accuracy
    assert abs(q_acc - float_acc) <= 0.01


def _good():
    return quantize_state_int8({"conv.weight": torch.randn(4, 2, 3, 3),
                                "conv.bias": torch.randn(4)})


@pytest.mark.parametrize("corrupt, match", [
    (lambda q: q.pop("conv.weight" + SCALE_SUFFIX), "no scale"),
    (lambda q: q["conv.weight" + SCALE_SUFFIX].__setitem__(1, math.nan), "non-finite"),
    (lambda q: q["conv.weight" + SCALE_SUFFIX].__setitem__(0, math.inf), "non-finite"),
    (lambda q: q["conv.weight" + SCALE_SUFFIX].__setitem__(2, -1.0), "non-positive"),
    (lambda q: q.__setitem__("conv.weight" + SCALE_SUFFIX, torch.ones(3)), "shape"),
    (lambda q: q.__setitem__("conv.weight" + SCALE_SUFFIX, torch.ones(4, 1)), "shape"),
    (lambda q: q.__setitem__("conv.weight" + SCALE_SUFFIX, torch.ones(4, dtype=torch.int32)),
     "float"),
    (lambda q: q.__setitem__("conv.bias" + SCALE_SUFFIX, torch.ones(4)), "belong"),
    (lambda q: q.__setitem__("ghost" + SCALE_SUFFIX, torch.ones(4)), "belong"),
])
def test_malformed_inputs_raise_decode_error(corrupt, match):
    q = _good()
    dequantize_state_int8(q)  # the untouched dict decodes
    corrupt(q)
    with pytest.raises(DecodeError, match=match):
        dequantize_state_int8(q)


def test_unencodable_inputs_raise_encode_error():
    with pytest.raises(EncodeError, match="NaN"):
        quantize_state_int8({"w": torch.tensor([[1.0, math.nan]])})
    with pytest.raises(EncodeError, match="reserved"):
        quantize_state_int8({"w" + SCALE_SUFFIX: torch.ones(2)})
    with pytest.raises(EncodeError, match="already int8"):
        quantize_state_int8({"w": torch.ones(2, 2, dtype=torch.int8)})
