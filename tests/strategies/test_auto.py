"""``auto``: the spec family, and ``Compressed`` with its defaults around a stock app."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

from fedslim.client import compression_mod
from fedslim.compression import parse_spec
from fedslim.compression.auto import AutoSpec, compresses, parse_auto, resolve
from fedslim.config import parse_run_config
from fedslim.errors import ConfigError, SpecError
from fedslim.strategies import Compressed
from tests.apps import initial_arrays, make_quickstart_app
from tests.loopback import LoopbackGrid


@pytest.mark.parametrize(("text", "spec"), [
    ("auto", AutoSpec()), (" auto ", AutoSpec()),
    ("auto:energy=0.6", AutoSpec(energy=0.6)),
    ("auto:bits=4,energy=0.5", AutoSpec(energy=0.5, bits=4))])
def test_auto_parses_and_prints_canonically(text: str, spec: AutoSpec) -> None:
    parsed = parse_auto(text)
    assert parsed == spec and parse_auto(str(parsed)) == parsed


@pytest.mark.parametrize("bad", ["auto:energy=2", "auto:energy=0", "auto:bits=9",
                                 "auto:speed=3", "auto:energy=x", "auto:energy"])
def test_bad_auto_options_are_one_spec_error(bad: str) -> None:
    with pytest.raises(SpecError):
        parse_auto(bad)


def test_auto_is_an_energy_pipeline_and_other_specs_are_not_auto() -> None:
    spec = AutoSpec(energy=0.5, bits=4).spec
    assert str(spec) == "energy:0.5|q:4|ans|pass:0" and parse_spec(str(spec)) == spec
    assert resolve(AutoSpec()) == AutoSpec().spec and resolve(spec) is spec
    assert parse_auto("topk:0.01|q:4") is None and parse_auto("none") is None
    assert compresses(AutoSpec()) and not compresses(parse_spec("none"))


def test_config_keys_take_auto_and_its_options() -> None:
    cfg = parse_run_config({})
    assert cfg.comp.uplink == AutoSpec() and cfg.comp.downlink_spec == AutoSpec()
    assert parse_run_config({"uplink": "none"}).comp.downlink_spec == parse_spec("none")
    cfg = parse_run_config({"uplink": "auto:energy=0.6", "downlink": "topk:0.05|q:4|ans"})
    assert cfg.comp.uplink == AutoSpec(energy=0.6)
    assert cfg.to_flat()["uplink"] == "auto:energy=0.6"
    with pytest.raises(ConfigError, match="run-config key 'uplink'"):
        parse_run_config({"uplink": "auto:energy=1.5"})
    with pytest.raises(ConfigError, match="warmup-rounds=3"):
        parse_run_config({"warmup-rounds": 3})


def test_compressed_with_no_arguments_compresses_both_ways_around_a_stock_app() -> None:
    strategy = Compressed(FedAvg(fraction_evaluate=1.0))
    assert strategy.uplink == AutoSpec().spec == strategy.downlink.spec
    grid = LoopbackGrid(make_quickstart_app([compression_mod]), 4)
    strategy.start(grid, initial_arrays(), num_rounds=3,
                   train_config=ConfigRecord({"lr": 0.1}), evaluate_config=ConfigRecord())
    strategy.collector.close()
    first, last = strategy.collector.history[0].comm, strategy.collector.history[-1].comm
    assert first is not None and last is not None
    # a stock app cannot build the round-0 model: it is sent once, then only deltas
    assert first.full_model_messages == 4 and last.full_model_messages == 0
    assert last.delta_messages > 0 and last.uplink_ratio is not None
    assert last.uplink_ratio > 2 and not strategy.collector.history[-1].rejects


def test_a_plain_uplink_makes_auto_downlink_plain() -> None:
    assert Compressed(FedAvg(), uplink="none").plain
    fixed = Compressed(FedAvg(), uplink="topk:0.01|q:4")
    assert fixed.downlink.spec == AutoSpec().spec and not fixed.plain
