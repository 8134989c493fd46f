"""Pruning masks, the kept-values file format, init-from and gradient masking."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from fedslim.errors import ConfigError, DecodeError
from fedslim.task.models import seeded_model
from fedslim.task.prune import (
    apply,
    load_init,
    mask_gradients,
    masks,
    pack,
    prunable,
    read_model_file,
    sparsity_of,
    unpack,
    zero_masks,
)


def _state() -> dict[str, torch.Tensor]:
    return seeded_model("digits_cnn", 42, (1, 8, 8), 10).state_dict()


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9])
def test_each_layer_loses_its_share_and_the_classifier_is_kept(structured, sparsity):
    state = _state()
    kept = masks(state, sparsity, structured)
    pruned = apply(state, kept, structured)
    names = prunable(state)
    assert names and "head.3.weight" not in names  # the classifier: rows are classes
    assert torch.equal(pruned["head.3.weight"], state["head.3.weight"])
    for name in names:
        zeros = float((pruned[name] == 0).float().mean())
        step = 1 / len(state[name]) if structured else 1 / state[name].numel()
        assert sparsity - step - 1e-9 <= zeros <= sparsity + 1e-9, (name, zeros)
        # the largest magnitudes (unstructured) / the largest rows (structured) survive
        kept_w = pruned[name][pruned[name] != 0].abs()
        dropped = state[name][pruned[name] == 0].abs()
        if not structured:
            assert kept_w.min() >= dropped.max()
    if structured:
        w = pruned["features.0.weight"].flatten(1)
        dead = (w == 0).all(1)
        assert dead.any() and bool((pruned["features.0.bias"][dead] == 0).all())
    assert abs(sparsity_of(pruned) - sparsity) < 0.03


@pytest.mark.parametrize("structured", [False, True])
def test_the_file_holds_only_what_is_kept_and_reads_back(tmp_path, structured):
    state = _state()
    kept = masks(state, 0.8, structured)
    pruned = apply(state, kept, structured)
    sizes = {}
    for int8 in (False, True):
        tensors, meta = pack(pruned, kept, structured, int8)
        save_file(tensors, str(tmp_path / f"{int8}.safetensors"), meta)
        back = read_model_file(tmp_path / f"{int8}.safetensors")
        sizes[int8] = (tmp_path / f"{int8}.safetensors").stat().st_size
        for k, v in pruned.items():
            tol = 0.0 if not int8 or v.ndim < 2 else float(v.abs().max()) / 127 / 2 + 1e-7
            assert torch.allclose(back[k].float(), v.float(), atol=tol), k
            assert bool((back[k][v == 0] == 0).all())  # pruned entries exactly zero
    dense = sum(v.numel() * 4 for v in state.values())
    assert sizes[False] < 0.3 * dense and sizes[True] < 0.1 * dense


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 7), sparsity=st.floats(0, 0.95),
       structured=st.booleans(), int8=st.booleans(), seed=st.integers(0, 1000))
def test_pack_unpack_round_trip(rows, cols, sparsity, structured, int8, seed):
    g = torch.Generator().manual_seed(seed)
    state = {"a.weight": torch.randn(rows, cols, generator=g),
             "a.bias": torch.randn(rows, generator=g),
             "b.weight": torch.randn(3, rows, generator=g)}
    kept = masks(state, sparsity, structured)
    pruned = apply(state, kept, structured)
    tensors, meta = pack(pruned, kept, structured, int8)
    back = unpack(tensors, meta)
    assert back.keys() == state.keys()
    for k, v in pruned.items():
        assert back[k].shape == v.shape
        assert bool((back[k][v == 0] == 0).all())
        if not int8:
            assert torch.equal(back[k], v)


def test_a_lying_file_is_refused_before_allocating():
    state = {"a.weight": torch.randn(4, 4), "b.weight": torch.randn(2, 4)}
    kept = masks(state, 0.5, False)
    tensors, meta = pack(apply(state, kept, False), kept, False, False)
    huge = dict(meta)
    huge["fedslim-pruned"] = meta["fedslim-pruned"].replace("[4, 4]", "[65536, 65536]")
    with pytest.raises(DecodeError):
        unpack(tensors, huge)
    short = dict(tensors)
    short["a.weight.__values__"] = short["a.weight.__values__"][:-1]
    with pytest.raises(DecodeError, match="kept values"):
        unpack(short, meta)


def test_init_from_checks_names_and_shapes(tmp_path):
    model = seeded_model("digits_cnn", 1, (1, 8, 8), 10)
    good = {k: v.clone() + 1 for k, v in model.state_dict().items()
            if v.is_floating_point()}
    save_file(good, str(tmp_path / "good.safetensors"))
    load_init(model, tmp_path / "good.safetensors")
    assert torch.equal(model.state_dict()["head.3.bias"], good["head.3.bias"])
    save_file(seeded_model("digits_student", 1, (1, 8, 8), 10).state_dict(),
              str(tmp_path / "student.safetensors"))
    with pytest.raises(ConfigError, match="does not fit the model.*other shapes"):
        load_init(model, tmp_path / "student.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ConfigError, match="cannot read"):
        load_init(model, tmp_path / "junk.safetensors")


def test_masked_gradients_keep_zeros_under_sgd_momentum_and_weight_decay():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    with torch.no_grad():
        model[0].weight[:, :3] = 0
    zeros = zero_masks(model.state_dict())
    assert set(zeros) == {"0.weight"}
    hooks = mask_gradients(model, zeros)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(8, 6)),
                                          torch.randint(0, 2, (8,))).backward()
        opt.step()
    for h in hooks:
        h.remove()
    assert bool((model[0].weight[:, :3] == 0).all()) and bool((model[0].weight[:, 3:] != 0).all())
