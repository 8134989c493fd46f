import tomllib
from pathlib import Path

import pytest

from fedslim.config import (
    known_keys,
    parse_cli_overrides,
    parse_run_config,
)
from fedslim.errors import ConfigError, FedslimError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_parse_from_empty_mapping():
    cfg = parse_run_config({})
    assert cfg.data.dataset == "digits"
    assert cfg.data.partitioning == "dirichlet"
    assert cfg.fed.num_server_rounds == 20


def test_pyproject_lists_every_key_with_the_dataclass_default():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert sorted(table) == sorted(known_keys())
    assert parse_run_config(table).to_flat() == table
    assert parse_run_config({}).to_flat() == table


def test_docs_reference_lists_every_key():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    missing = [k for k in known_keys() if f"`{k}`" not in doc]
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_unknown_key_names_it_and_suggests_the_close_ones():
    with pytest.raises(ConfigError) as err:
        parse_run_config({"num-server-round": 3})
    msg = str(err.value)
    assert "'num-server-round' (did you mean 'num-server-rounds'" in msg
    assert "\n" not in msg and len(msg) < 300  # one line, not the ~70 keys
    assert "fedslim config" in msg


@pytest.mark.parametrize("overrides,suggested", [
    ({"learnin-rate": 0.1}, "'learning-rate'"),
    ({"uplnk": "auto"}, "'uplink'"),
    ({"rounds": 2}, "'num-server-rounds'"),       # a fragment of the key
    ({"model": "digits_cn"}, "'digits_cnn'"),     # a registered name, not a key
])
def test_misspellings_get_a_did_you_mean(overrides, suggested):
    with pytest.raises(ConfigError) as err:
        parse_run_config(overrides)
    assert "did you mean" in str(err.value) and suggested in str(err.value)


def test_a_key_nothing_like_any_other_gets_no_guess():
    with pytest.raises(ConfigError) as err:
        parse_run_config({"zzz": 1})
    assert "did you mean" not in str(err.value) and "'zzz'" in str(err.value)


@pytest.mark.parametrize("key,value,fragment", [
    ("partitioning", "random", "unknown partitioner"),
    ("dirichlet-alpha", 0.0, "must be > 0"),
    ("dirichlet-alpha", -1, "must be > 0"),
    ("local-epochs", 0, "must be >= 1"),
    ("local-epochs", 1.5, "expected an integer"),
    ("learning-rate", "fast", "expected a number"),
    ("learning-rate", float("nan"), "finite"),
    ("resume", "maybe", "true or false"),
    ("fraction-train", 1.5, "<= 1.0"),
    ("optimizer", 3, "allowed values"),
    ("output-dir", 3, "expected a string"),
])
def test_bad_values_raise_config_error_naming_key_and_value(key, value, fragment):
    with pytest.raises(ConfigError) as err:
        parse_run_config({key: value})
    msg = str(err.value)
    assert key in msg and fragment in msg
    assert isinstance(err.value, FedslimError) and isinstance(err.value, ValueError)


def test_strings_from_cli_are_coerced():
    cfg = parse_run_config(overrides={"num-server-rounds": "3", "dirichlet-alpha": "0.1",
                                      "resume": "true", "partitioning": "iid"})
    assert cfg.fed.num_server_rounds == 3 and cfg.data.dirichlet_alpha == 0.1
    assert cfg.fed.resume is True and cfg.data.partitioning == "iid"


def test_overrides_win_over_run_config():
    cfg = parse_run_config({"seed": 1}, {"seed": 2})
    assert cfg.fed.seed == 2


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="leaves no data"):
        parse_run_config({"test-fraction": 0.5, "val-fraction": 0.3, "proxy-fraction": 0.2})
    with pytest.raises(ConfigError, match="data-dir"):
        parse_run_config({"dataset": "mnist"})
    with pytest.raises(ConfigError, match="min-available-nodes"):
        parse_run_config({"min-train-nodes": 5, "min-available-nodes": 2})


def test_cli_override_parsing():
    assert parse_cli_overrides(["a=1", "b = 'x'"]) == {"a": "1", "b": "x"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_cli_overrides(["novalue"])


def test_flat_round_trip():
    cfg = parse_run_config({"augment": "noise+shift", "optimizer": "adam"})
    assert parse_run_config(cfg.to_flat()) == cfg


def test_error_feedback_auto_is_off_only_below_10_percent_participation():
    from fedslim.config_enums import ErrorFeedbackMode

    assert parse_run_config({}).comp.error_feedback is ErrorFeedbackMode.AUTO
    for value, want in ((True, (True, True, True)), (False, (False, False, False)),
                        ("auto", (True, True, False))):
        mode = parse_run_config({"error-feedback": value}).comp.error_feedback
        assert (mode.enabled(1.0), mode.enabled(0.1), mode.enabled(0.01)) == want, value
