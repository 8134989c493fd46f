"""The suite's generated data sets and models of other shapes (digits32, motifs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedslim.config import parse_run_config
from fedslim.errors import RegistryError
from fedslim.task.data import load_splits
from fedslim.task.generated import make_motifs, motif_pairs, motif_shapes
from fedslim.task.models import build_model, count_params


def test_motifs_are_seeded_and_labelled_by_the_order_of_two_shapes() -> None:
    a, b = make_motifs(500, seed=3), make_motifs(500, seed=3)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert a.x.shape == (500, 1, 96) and a.x.dtype == np.float32
    assert set(np.unique(a.y)) == set(range(10)) and len(set(motif_pairs())) == 10
    # without noise, the first half holds the first shape and the second half the second
    clean = make_motifs(50, seed=1, noise=0.0, drift=0.0)
    shapes, pairs = motif_shapes(), motif_pairs()
    for x, y in zip(clean.x[:, 0], clean.y, strict=True):
        first, second = pairs[y]
        for half, shape in ((x[:48], shapes[first]), (x[48:], shapes[second])):
            corr = max(float(np.dot(half[i:i + 16], shape)) for i in range(len(half) - 15))
            assert corr > 0.5 * float(np.dot(shape, shape))
    assert pairs[0][::-1] in pairs  # the reversed pair is another class


def test_digits32_is_three_channel_32x32_in_minus_one_to_one() -> None:
    splits = load_splits(parse_run_config({"dataset": "digits32"}).data, 42)
    assert splits.input_shape == (3, 32, 32)
    x = splits.clients.x
    assert x.min() >= -1.0 and x.max() <= 1.0 and np.array_equal(x[:, 0], x[:, 2])


@pytest.mark.parametrize(("name", "shape", "params"), [
    ("quickstart_cnn", (3, 32, 32), 62_006), ("seq_cnn", (1, 96), 33_162)])
def test_the_suite_models_have_their_documented_size(name: str, shape: tuple[int, ...],
                                                     params: int) -> None:
    model = build_model(name, shape)
    assert count_params(model) == params
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize(("name", "shape"), [("quickstart_cnn", (1, 8, 8)),
                                             ("seq_cnn", (1, 8, 8)), ("seq_cnn", (1, 4))])
def test_a_model_refuses_examples_of_another_shape(name: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(RegistryError, match=name):
        build_model(name, shape)
