"""Bad inputs to the encoder are refused with a typed, named error; package hygiene."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

import fedslim.compression as compression
from fedslim.compression import WIRE_STYPE, decode_update, encode_update
from fedslim.errors import DecodeError, EncodeError, FedslimError, SpecError


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("text", ["none", "fp16", "q:8", "topk:0.1|q:4|pass:0"])
def test_non_finite_values_are_refused(bad: float, text: str) -> None:
    x = torch.ones(300)
    x[17] = bad
    with pytest.raises(EncodeError, match=r"tensor 'layer.w' contains 1 NaN/Inf"):
        encode_update({"ok": torch.ones(3), "layer.w": x}, text)


def test_float64_beyond_float32_range_is_refused() -> None:
    with pytest.raises(EncodeError, match="beyond the float32 range"):
        encode_update({"w": torch.tensor([1e300], dtype=torch.float64)}, "none")


def test_fp16_overflow_is_refused_but_bf16_is_fine() -> None:
    x = {"w": torch.tensor([1e6, 1.0])}
    with pytest.raises(EncodeError, match="overflow fp16"):
        encode_update(x, "fp16")
    assert decode_update(encode_update(x, "bf16")).tensors["w"][0] == 1e6 // 4096 * 4096


@pytest.mark.parametrize(("update", "fragment"), [
    ({"w": torch.ones(3, dtype=torch.int64)}, "unsupported dtype torch.int64"),
    ({"w": torch.ones(3, dtype=torch.complex64)}, "unsupported dtype"),
    ({1: torch.ones(3)}, "names must be str"),
    ({"w": [1.0, 2.0]}, "expected a torch.Tensor"),
])
def test_bad_inputs(update: dict, fragment: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(EncodeError, match=fragment):
        encode_update(update, "none")


def test_errors_share_the_root_and_bad_specs_raise_spec_error() -> None:
    with pytest.raises(SpecError):
        encode_update({}, "q:0")
    assert issubclass(EncodeError, FedslimError) and issubclass(DecodeError, FedslimError)


def test_wire_stype_and_payload_start() -> None:
    assert WIRE_STYPE == "fedslim.wire/v3"
    assert encode_update({}, "none")[:6] == b"FSLM\x03\x00"


def test_decode_to_another_device_argument_and_gradients_ignored() -> None:
    w = torch.randn(5, requires_grad=True)
    out = decode_update(encode_update({"w": w}, "none"), device=torch.device("cpu"))
    assert torch.equal(out.tensors["w"], w.detach()) and not out.tensors["w"].requires_grad


def test_non_contiguous_and_channels_last_inputs() -> None:
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    y = torch.randn(6, 7).t()
    out = decode_update(encode_update({"x": x, "y": y}, "none")).tensors
    assert torch.equal(out["x"], x) and torch.equal(out["y"], y)


def test_no_flwr_no_pickle() -> None:
    """The codecs must import on a box with only torch, and never (un)pickle."""
    code = "import sys, fedslim.compression; assert 'flwr' not in sys.modules, 'flwr imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    root = pathlib.Path(compression.__file__).parent
    for path in root.glob("*.py"):
        text = path.read_text()
        for banned in ("import pickle", "torch.load", "torch.save", "import flwr", "from flwr"):
            assert banned not in text, f"{path.name} uses {banned}"


def test_reconstruction_never_aliases_the_input() -> None:
    x = torch.randn(10)
    _, sent = encode_update({"x": x}, "none", return_reconstruction=True)
    x.add_(1.0)
    assert not torch.equal(sent["x"], x)


def test_without_zstandard_the_codecs_still_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a torch-only box: zstd specs fail clearly, everything else works."""
    import fedslim.compression.wire as wire
    import fedslim.compression.wire_read as wire_read

    payload = encode_update({"w": torch.zeros(4000)}, "fp16|zstd")
    monkeypatch.setattr(wire, "_zstd", lambda: None)
    monkeypatch.setattr(wire_read, "_zstd", lambda: None)
    with pytest.raises(EncodeError, match="zstandard"):
        encode_update({"w": torch.zeros(10)}, "q:8|zstd")
    with pytest.raises(DecodeError, match="zstandard"):
        decode_update(payload)
    assert decode_update(encode_update({"w": torch.ones(10)}, "q:8")).tensors["w"].sum() == 10


def test_bytes_like_payloads() -> None:
    payload = encode_update({"w": torch.arange(5.0)}, "none")
    for form in (bytearray(payload), memoryview(payload)):
        assert torch.equal(decode_update(form).tensors["w"], torch.arange(5.0))


def test_names_that_are_not_utf8_encodable() -> None:
    with pytest.raises(EncodeError, match="UTF-8"):
        encode_update({"bad\ud800": torch.ones(2)}, "none")
