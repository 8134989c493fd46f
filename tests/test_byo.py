"""Bring your own model and data: plug-ins, npz arrays of any shape, client settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Context, Message

from fedslim.client import compression_mod
from fedslim.config import parse_run_config
from fedslim.errors import ConfigError, DataError
from fedslim.server.app import run_server
from fedslim.task.data import client_data, load_splits
from tests.apps import make_quickstart_app
from tests.loopback import LoopbackGrid

BLOBS = {"plugins": "tests.plugins.blobs", "model": "blobs_net", "dataset": "blobs",
         "progress": False, "num-server-rounds": 3, "min-train-nodes": 2}


def test_plugin_names_resolve_and_unknown_ones_list_the_known():
    cfg = parse_run_config(BLOBS)
    assert cfg.train.model == "blobs_net" and cfg.data.dataset == "blobs"
    with pytest.raises(ConfigError, match="cannot import 'tests.plugins.nope'"):
        parse_run_config({"plugins": "tests.plugins.nope"})
    with pytest.raises(ConfigError, match="not module names"):
        parse_run_config({"plugins": "a b"})
    with pytest.raises(ConfigError, match=r"unknown dataset 'nope'.*blobs.*digits"):
        parse_run_config({**BLOBS, "dataset": "nope"})


def test_quickstart_client_reading_config_lr_runs_against_fedslims_server(tmp_path):
    """A stock quickstart ClientApp (reads msg.content["config"]["lr"]) + fedslim's
    ServerApp: `client.lr` reaches it; compressed both ways; the model learns."""
    seen: list[float] = []

    def spy(msg: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
        conf = msg.content.config_records.get("config", ConfigRecord())
        if "lr" in conf:
            seen.append(float(conf["lr"]))  # type: ignore[arg-type]
        return call_next(msg, context)

    cfg = parse_run_config({**BLOBS, "output-dir": str(tmp_path), "client.lr": "0.1",
                            "uplink": "topk:0.25|q:8", "downlink": "topk:0.25|q:8",
                            "shared-init": False})  # the quickstart mod cannot build it
    assert dict(cfg.client) == {"lr": 0.1}
    grid = LoopbackGrid(make_quickstart_app([compression_mod, spy]), 3)
    res = run_server(grid, cfg)
    assert seen and set(seen) == {0.1}
    assert res.final is not None and res.final.error is None
    assert all(r.rejects == [] and r.replies == 3 for r in res.rounds)
    assert res.final.test_accuracy > 0.6  # 4 classes: chance 0.25
    assert res.config["client.lr"] == 0.1


def test_no_round_aggregated_ends_with_a_clear_error_in_results(tmp_path):
    def drop_header(msg, context, call_next):  # type: ignore[no-untyped-def]
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train":
            del reply.content["fedslim.up"]
        return reply

    cfg = parse_run_config({**BLOBS, "output-dir": str(tmp_path), "client.lr": 0.1,
                            "uplink": "topk:0.25|q:8", "num-server-rounds": 2})
    res = run_server(LoopbackGrid(make_quickstart_app([drop_header, compression_mod]), 3), cfg)
    assert res.final is not None and res.final.rounds_aggregated == 0
    assert res.final.error and "no round aggregated" in res.final.error
    assert (tmp_path / "model.safetensors").exists()
    assert all(len(r.rejects) == 3 for r in res.rounds)


def _train_reasons_after(tmp_path, change):  # type: ignore[no-untyped-def]
    """One round where an app's train reply has its first tensor replaced by
    ``change(array)``: the reasons the server records for the train replies."""
    def mod(msg, context, call_next):  # type: ignore[no-untyped-def]
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train":
            arrays = next(iter(reply.content.array_records.values()))
            name = next(iter(arrays.keys()))
            arrays[name] = Array(change(arrays[name].numpy()))
        return reply

    cfg = parse_run_config({**BLOBS, "output-dir": str(tmp_path), "client.lr": 0.1,
                            "uplink": "topk:0.25|q:8", "num-server-rounds": 1,
                            "shared-init": False})
    res = run_server(LoopbackGrid(make_quickstart_app([compression_mod, mod]), 3), cfg)
    return [x.reason for x in res.rounds[0].rejects if x.phase == "train"]


def test_a_reply_with_a_reshaped_tensor_is_refused_on_the_node_with_its_name(tmp_path):
    """An app whose reply has the right names but another shape: the node says which
    tensor and both shapes (no broadcasting into a wrong update); the round goes on."""
    reasons = _train_reasons_after(tmp_path, lambda v: v.reshape(-1, 1) if v.ndim == 1
                                   else v.reshape(v.shape[0], -1)[:, :1])
    assert len(reasons) == 3 and all("has shape" in r for r in reasons), reasons


def test_a_complex_reply_is_refused_not_cut_to_its_real_part(tmp_path):
    reasons = _train_reasons_after(tmp_path, lambda v: v.astype(np.complex64))
    assert len(reasons) == 3 and all("complex64" in r for r in reasons), reasons


def test_a_client_without_the_mod_is_rejected_loudly_and_failed_evaluations_count(tmp_path):
    """Under downlink compression a stock client (no mod) is told what is missing (train
    rejects), still gets full models to evaluate; evaluation failures are rejects too."""
    cfg = parse_run_config({**BLOBS, "output-dir": str(tmp_path), "client.lr": 0.1,
                            "downlink": "topk:0.25|q:8", "num-server-rounds": 2,
                            "shared-init": False})
    res = run_server(LoopbackGrid(make_quickstart_app(), 3), cfg)
    for r in res.rounds:
        train = [x for x in r.rejects if x.phase == "train"]
        assert len(train) == 3 and all("compression_mod" in x.reason for x in train)
        assert r.evaluate_replies == 3 and r.evaluate_failures == 0

    def broken_eval(msg, context, call_next):  # type: ignore[no-untyped-def]
        if msg.metadata.message_type == "evaluate":
            raise RuntimeError("evaluation crashed (injected)")
        return call_next(msg, context)

    cfg = parse_run_config({**BLOBS, "output-dir": str(tmp_path / "b"), "client.lr": 0.1,
                            "downlink": "topk:0.25|q:8", "num-server-rounds": 2,
                            "shared-init": False})
    res = run_server(LoopbackGrid(make_quickstart_app([compression_mod, broken_eval]), 3), cfg)
    for r in res.rounds:
        assert r.evaluate_failures == 3 and r.evaluate_replies == 0 and r.replies == 3
        assert all("evaluation crashed" in x.reason for x in r.rejects if x.phase == "evaluate")


def _write_npz(path, x, y):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y)


@pytest.mark.parametrize("shape,layout,model_in", [
    ((12,), "as-is", (12,)),                # feature vectors
    ((20, 3), "channels-last", (3, 20)),    # sequences, channels last
    ((6, 6, 2), "channels-last", (2, 6, 6)),  # images, channels last
    ((1, 8, 8), "as-is", (1, 8, 8)),        # images, channels first
])
def test_npz_any_shape_keeps_its_test_split_and_standardizes_on_train(tmp_path, shape, layout,
                                                                      model_in):
    rng = np.random.default_rng(0)
    x = (rng.normal(5.0, 3.0, (300, *shape))).astype(np.float32)
    y = rng.integers(0, 3, 300)
    xt = rng.integers(0, 255, (50, *shape)).astype(np.uint8)  # integer features
    _write_npz(tmp_path / "train.npz", x, y)
    _write_npz(tmp_path / "test.npz", xt, rng.integers(0, 3, 50))
    cfg = parse_run_config({"dataset": "npz", "data-dir": str(tmp_path), "layout": layout,
                            "normalize": "standardize", "model": "mlp"}).data
    s = load_splits(cfg, 0)
    assert s.input_shape == model_in and len(s.test) == 50  # the file's own test split
    assert len(s.clients) + len(s.val) + len(s.proxy_x) == 300
    flat = s.clients.x.reshape(len(s.clients), -1).astype(np.float64)
    np.testing.assert_allclose(flat.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(flat.std(0), 1.0, atol=1e-3)
    train, _ = client_data(cfg, 0, 0, 2)
    assert train.x.shape[1:] == model_in
    pooled = parse_run_config({"dataset": "npz", "data-dir": str(tmp_path),
                               "layout": layout, "keep-test-split": False}).data
    p = load_splits(pooled, 0)
    assert len(p.clients) + len(p.val) + len(p.test) + len(p.proxy_x) == 350


def test_npz_mistakes_are_data_errors_naming_the_file(tmp_path):
    cfg = lambda: parse_run_config({"dataset": "npz", "data-dir": str(tmp_path)}).data  # noqa: E731
    with pytest.raises(DataError, match="no train.npz"):
        load_splits(cfg(), 0)
    np.savez(tmp_path / "train.npz", x=np.zeros((4, 2)), y=np.array([0.5, 1, 2, 3]))
    with pytest.raises(DataError, match="integer labels"):
        load_splits(cfg(), 1)
    np.savez(tmp_path / "train.npz", x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4))
    with pytest.raises(DataError, match="not a readable .npz"):  # never unpickled
        load_splits(cfg(), 2)
    with pytest.raises(ConfigError, match="needs data-dir"):
        parse_run_config({"dataset": "npz"})


def test_client_settings_are_typed_and_checked():
    cfg = parse_run_config({"client.lr": "0.01", "client.epochs": "3", "client.name": "x",
                            "client.fast": "true"})
    assert dict(cfg.client) == {"lr": 0.01, "epochs": 3, "name": "x", "fast": True}
    assert parse_run_config(cfg.to_flat()).client == cfg.client
    with pytest.raises(ConfigError, match="client."):
        parse_run_config({"client.": 1})
    with pytest.raises(ConfigError, match="finite"):
        parse_run_config({"client.lr": float("nan")})


def test_models_for_vectors_and_images():
    from fedslim.task.models import build_model

    assert build_model("mlp", (20,), 4)(torch.randn(2, 20)).shape == (2, 4)
    with pytest.raises(Exception, match=r"images of shape \(C, H, W\)"):
        build_model("digits_cnn", (20,), 4)
