"""The minimax regret behind ``entropy_floor`` and the per-record entropy report."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedslim.bench import entropy as entropy_bench
from fedslim.compression import encode_update
from fedslim.compression.bound import (
    entropy_floor,
    nml_regret_bits,
    payload_stats,
    record_entropy,
)


def _shtarkov_by_enumeration(alphabet: int, n: int) -> float:
    """sum over all histograms of multinomial(n; c) prod (c_i / n)^c_i, in log2."""
    total = 0.0
    for cuts in itertools.combinations_with_replacement(range(n + 1), alphabet - 1):
        counts = np.diff((0, *cuts, n))
        ways = math.factorial(n) / math.prod(math.factorial(int(c)) for c in counts)
        total += ways * math.prod((int(c) / n) ** int(c) for c in counts if c)
    return math.log2(total)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 12))
def test_regret_matches_the_shtarkov_sum_by_enumeration(alphabet: int, n: int) -> None:
    assert nml_regret_bits(alphabet, n) == pytest.approx(_shtarkov_by_enumeration(alphabet, n),
                                                         abs=1e-9)


def test_regret_known_values() -> None:
    assert nml_regret_bits(2, 2) == pytest.approx(math.log2(2.5), abs=1e-12)
    assert nml_regret_bits(7, 1) == pytest.approx(math.log2(7), abs=1e-12)  # C(m, 1) = m
    assert nml_regret_bits(1, 1000) == 0.0 and nml_regret_bits(16, 0) == 0.0
    # Rissanen's asymptotic form, (m-1)/2 log2(n / 2 pi) + log2(pi^(m/2) / Gamma(m/2)).
    m, n = 16, 1_000_000
    approx = ((m - 1) / 2 * math.log2(n / (2 * math.pi))
              + (m / 2 * math.log(math.pi) - math.lgamma(m / 2)) / math.log(2))
    assert nml_regret_bits(m, n) == pytest.approx(approx, abs=0.05)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 64), st.integers(1, 3000))
def test_regret_grows_with_the_alphabet_and_the_length(alphabet: int, n: int) -> None:
    r = nml_regret_bits(alphabet, n)
    assert nml_regret_bits(alphabet + 1, n) > r and nml_regret_bits(alphabet, n + 1) > r


@pytest.mark.parametrize("bad", [(0, 5), (4, -1)])
def test_regret_refuses_impossible_arguments(bad: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="alphabet >= 1 and n >= 0"):
        nml_regret_bits(*bad)


def test_largest_ruled_out_is_the_threshold() -> None:
    for bits in (1, 2, 4, 8):
        n = entropy_bench.largest_ruled_out(bits)
        assert entropy_floor(bits, n) > 1.05
        assert all(entropy_floor(bits, m) <= 1.05 for m in range(n + 1, n + 200))
    assert entropy_floor(4, 131) > 1.05  # the digits CNN's 0.1% record cannot be promised


def test_floor_subtracts_the_length_slack() -> None:
    n, bits = 131, 4
    slack = math.log2(2 * math.ceil(n * bits / 8))
    assert entropy_floor(bits, n) == pytest.approx(
        1 + (nml_regret_bits(16, n) - slack) / (n * bits))
    assert entropy_floor(1, 1) == 1.0  # the slack can swallow the whole regret
    assert entropy_floor(4, 0) == math.inf


@pytest.mark.parametrize("alphabet", [2, 16, 256])
def test_the_expansion_takes_over_seamlessly(alphabet: int, monkeypatch) -> None:
    from fedslim.compression import bound

    n = 1 << 20
    exact = nml_regret_bits(alphabet, n)
    monkeypatch.setattr(bound, "_EXACT_MAX", n - 1)
    assert nml_regret_bits(alphabet, n) == pytest.approx(exact, abs=1e-3)
    assert nml_regret_bits(alphabet, 10 * n) > exact


def test_records_add_up_to_the_payload_stats() -> None:
    rng = np.random.default_rng(0)
    update = {"w": torch.from_numpy(rng.standard_t(3, (200, 300)).astype(np.float32)),
              "b": torch.from_numpy(rng.standard_normal(50).astype(np.float32)),
              "one": torch.ones(3)}
    payload = encode_update(update, "topk:0.05|q:4|ans", generator=torch.Generator().manual_seed(0))
    records = {r.name: r for r in record_entropy(payload)}
    stats = payload_stats(payload)
    assert sum(r.values_bytes for r in records.values()) == stats.values_bytes
    assert sum(r.entropy_bytes for r in records.values()) == pytest.approx(
        stats.values_entropy_bytes)
    big = records["w"]
    assert big.entropy_coded and big.count == 3000 and 1 < big.distinct <= 16
    assert big.over_entropy > 1.0 and big.floor > 1.0 and big.nml_over_entropy > 1.0
    assert big.regret_bytes == pytest.approx(nml_regret_bits(16, 3000) / 8)
    # one code repeated: zero entropy (not -0.0), ratios infinite, nothing divides by zero
    for r in records.values():
        assert math.copysign(1.0, r.entropy_bytes) == 1.0
        if r.distinct == 1:
            assert r.entropy_bytes == 0.0 and r.over_entropy == math.inf


def test_bench_prints_records_summary_and_thresholds(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "entropy.json"
    entropy_bench.main(["--seeds", "0", "--numel", "200000", "--json", str(out)])
    text = capsys.readouterr().out
    assert "ans records /H" in text and "4-bit 152 codes" in text
    data = json.loads(out.read_text())
    assert data["thresholds"]["4"] == 152
    cases = {(row["case"], row["spec"]) for row in data["summary"]}
    assert cases == {(c, s) for c in ("digits-cnn", "10M-heavy") for s in entropy_bench.SPECS}
    coded = [r for r in data["records"] if r["entropy_coded"]]
    assert coded and all(r["values_bytes"] >= r["entropy_bytes"] for r in coded)
