import pytest
import torch

from fedslim.errors import RegistryError
from fedslim.task.models import MODELS, build_model, count_params, register_model


def test_digits_models_sizes():
    big = count_params(build_model("digits_cnn"))
    small = count_params(build_model("digits_student"))
    assert 120_000 <= big <= 180_000
    assert small <= 0.25 * big


def test_resnet8_student_is_compact():
    assert count_params(build_model("resnet8_student", (3, 32, 32))) <= 0.25 * count_params(
        build_model("resnet8", (3, 32, 32)))


# Models built for one input shape (Flower's quickstart Net: 32x32 images; seq_cnn: 1-D).
SHAPE_BOUND = {"quickstart_cnn": [(3, 32, 32)], "seq_cnn": []}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_every_model_runs_on_every_input_size(name, shape):
    if name in SHAPE_BOUND and shape not in SHAPE_BOUND[name]:
        with pytest.raises(RegistryError, match=name):  # refused with one line, not a crash
            build_model(name, shape, 10)
        return
    model = build_model(name, shape, 10)
    out = model(torch.randn(4, *shape))
    assert out.shape == (4, 10)


def test_unknown_model_lists_known():
    with pytest.raises(RegistryError) as err:
        build_model("vgg99")
    assert "vgg99" in str(err.value) and "digits_cnn" in str(err.value)


def test_duplicate_registration_is_an_error():
    with pytest.raises(RegistryError, match="already registered"):
        register_model("digits_cnn")(lambda c, n: torch.nn.Linear(1, 1))


def test_sequence_model_runs_on_sequences():
    model = build_model("seq_cnn", (1, 96), 6)
    assert model(torch.randn(4, 1, 96)).shape == (4, 6)
