"""``auto``: the spec family, the energy controller, and ``Compressed`` steered by it."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg
from hypothesis import given, settings
from hypothesis import strategies as st

from fedslim.client import compression_mod
from fedslim.compression import parse_spec
from fedslim.compression.auto import AutoSpec, parse_auto
from fedslim.errors import SpecError
from fedslim.strategies import Compressed
from fedslim.strategies.control import ControlConfig, EnergyController, loss_key, pick_loss
from tests.apps import initial_arrays, make_quickstart_app
from tests.loopback import LoopbackGrid


# -- the spec family --------------------------------------------------------------------
@pytest.mark.parametrize(("text", "spec"), [
    ("auto", AutoSpec()), (" auto ", AutoSpec()),
    ("auto:energy=0.6", AutoSpec(energy=0.6)),
    ("auto:bits=4,low=0.3,energy=0.5,high=0.9", AutoSpec(energy=0.5, low=0.3, high=0.9,
                                                        bits=4))])
def test_auto_parses_and_prints_canonically(text: str, spec: AutoSpec) -> None:
    parsed = parse_auto(text)
    assert parsed == spec and parse_auto(str(parsed)) == parsed


@pytest.mark.parametrize("bad", ["auto:energy=2", "auto:low=0.6,energy=0.5", "auto:bits=9",
                                 "auto:speed=3", "auto:energy=x", "auto:energy"])
def test_bad_auto_options_are_one_spec_error(bad: str) -> None:
    with pytest.raises(SpecError):
        parse_auto(bad)


def test_other_specs_are_not_auto() -> None:
    assert parse_auto("topk:0.01|q:4") is None and parse_auto("none") is None


def test_the_level_is_clamped_to_the_range() -> None:
    auto = AutoSpec(energy=0.5, low=0.3, high=0.8)
    assert auto.at(0.9) == auto.at(0.8) and auto.at(0.1) == auto.at(0.3)
    spec = auto.at(0.5)
    assert spec == parse_spec(str(spec)) and spec.topk is not None
    assert spec.topk.energy == 0.5


# -- the controller ---------------------------------------------------------------------
def test_drift_loosens_at_once_and_slack_tightens_slowly() -> None:
    ctrl = EnergyController(AutoSpec(energy=0.5, low=0.2, high=0.95))
    ctrl.observe(1.0)
    assert ctrl.energy == 0.5                 # nothing to compare with yet
    ctrl.observe(1.2)                         # 20% above the best: drift
    assert ctrl.energy == 0.75
    ctrl.observe(0.9)
    assert ctrl.energy == 0.75                # one good round is not slack yet
    ctrl.observe(0.8)                         # two in a row: dropped energy x1.25
    assert ctrl.energy == round(1 - 0.25 * 1.25, 3)


def test_no_signal_changes_nothing_and_a_non_finite_loss_is_drift() -> None:
    ctrl = EnergyController(AutoSpec())
    ctrl.observe(None)
    assert ctrl.energy == AutoSpec().energy and ctrl.losses == []
    ctrl.observe(math.nan)
    assert ctrl.energy > AutoSpec().energy and ctrl.losses == []


@settings(max_examples=60, deadline=None)
@given(losses=st.lists(st.one_of(st.floats(0.0, 10.0), st.just(math.inf)), max_size=40))
def test_the_level_stays_in_range_and_is_deterministic(losses: list[float]) -> None:
    auto = AutoSpec(energy=0.5, low=0.25, high=0.9)
    a, b = EnergyController(auto), EnergyController(auto)
    for loss in losses:
        a.observe(loss)
        b.observe(loss)
        assert 0.25 <= a.energy <= 0.9 and a.energy == b.energy


def test_state_round_trips() -> None:
    ctrl = EnergyController(AutoSpec(), ControlConfig(patience=1))
    for loss in (2.0, 1.5, 1.2, 1.9, 1.0):
        ctrl.observe(loss)
    fresh = EnergyController(AutoSpec(), ControlConfig(patience=1))
    fresh.load_state_dict(ctrl.state_dict())
    assert (fresh.energy, fresh.streak, fresh.losses) == (ctrl.energy, ctrl.streak,
                                                          ctrl.losses)
    for loss in (0.9, 0.95, 3.0):
        ctrl.observe(loss)
        fresh.observe(loss)
        assert fresh.energy == ctrl.energy


def test_the_loss_followed_is_chosen_once() -> None:
    assert loss_key({"val-loss": 1.0, "test-loss": 2.0, "acc": 0.5}) == "val-loss"
    assert loss_key({"eval_loss": 1.0}) == "eval_loss" and loss_key({"acc": 1.0}) is None
    signals = {"central": {}, "federated": {"eval_loss": 0.7}, "train": {"train_loss": 0.5}}
    loss, chosen = pick_loss(signals, None)
    assert (loss, chosen) == (0.7, ("federated", "eval_loss"))
    # the same source afterwards, even when another one appears; a missing one gives None
    assert pick_loss({"central": {"val-loss": 0.1}, "federated": {"eval_loss": 0.6}},
                     chosen) == (0.6, chosen)
    assert pick_loss({"train": {"train_loss": 0.4}}, chosen) == (None, chosen)


# -- Compressed, steered ------------------------------------------------------------------
def _federation(rounds: int, evaluate: bool = True) -> Compressed:
    strategy = Compressed(FedAvg(fraction_evaluate=1.0))
    grid = LoopbackGrid(make_quickstart_app([compression_mod]), 4)
    losses = iter([1.0, 1.5, 0.9, 0.8, 0.7, 0.6])

    def central(server_round: int, arrays: object) -> MetricRecord:
        return MetricRecord({"val-loss": next(losses) if server_round else 2.0})

    strategy.start(grid, initial_arrays(), num_rounds=rounds,
                   train_config=ConfigRecord({"lr": 0.1}), evaluate_config=ConfigRecord(),
                   evaluate_fn=central if evaluate else None)
    strategy.collector.close()
    return strategy


def test_the_defaults_compress_both_ways_and_follow_the_central_loss() -> None:
    strategy = _federation(rounds=4)
    reports = strategy.collector.history
    controls = [r.control for r in reports]
    assert all(c is not None for c in controls)
    assert controls[0].loss is None and controls[0].uplink == str(AutoSpec().at(0.5))
    # round 2 follows round 1's central val-loss, and so on; the rise in round 2 loosened
    assert [c.loss for c in controls[1:]] == [1.0, 1.5, 0.9]
    assert all(c.signal == "central:val-loss" for c in controls[1:])
    assert controls[2].uplink == str(AutoSpec().at(0.75)) == controls[2].downlink
    comm = reports[-1].comm
    assert comm is not None and comm.uplink_ratio is not None and comm.uplink_ratio > 2
    # a stock app cannot build the round-0 model: it is sent once, then only deltas
    assert reports[0].comm is not None and reports[0].comm.full_model_messages == 4
    assert comm.full_model_messages == 0 and comm.delta_messages > 0


def test_without_a_central_evaluation_the_federated_loss_steers() -> None:
    strategy = _federation(rounds=3, evaluate=False)
    signals = {r.control.signal for r in strategy.collector.history[1:] if r.control}
    # the quickstart app reports no evaluate loss: the clients' train loss is followed
    assert signals == {"train:train_loss"}


def test_the_controllers_are_checkpointed_with_the_strategy() -> None:
    strategy = _federation(rounds=4)
    state = strategy.state_dict()
    assert {"control/uplink/dropped", "control/downlink/dropped", "control/observed"} \
        <= state.keys()
    fresh = Compressed(FedAvg())
    fresh.load_state_dict(state)
    assert fresh.control["uplink"].energy == strategy.control["uplink"].energy
    again = fresh.state_dict()
    assert all(torch.equal(again[k], state[k]) for k in state if k.startswith("control/"))


def test_a_plain_uplink_makes_auto_downlink_plain() -> None:
    strategy = Compressed(FedAvg(), uplink="none")
    assert not strategy.control and strategy.plain
    fixed = Compressed(FedAvg(), uplink="topk:0.01|q:4")
    assert set(fixed.control) == {"downlink"}
