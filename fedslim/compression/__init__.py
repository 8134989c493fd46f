"""Codecs that shrink a model update before it is sent: pure torch/numpy, no Flower.

A pipeline is a spec string such as ``topk:0.01|q:4`` (see ``docs/compression.md``)::

    payload = encode_update(update, "topk:0.01|q:4")
    decoded = decode_update(payload)          # DecodedUpdate(spec, tensors, source_dtypes)

Stages: top-k sparsification (:mod:`.sparsify`), quantization / casts (:mod:`.quantize`),
position coding (:mod:`.positions`), bit packing (:mod:`.bitpack`), zstd, small-tensor
passthrough; the versioned wire format is in :mod:`.wire`, error feedback in :mod:`.feedback`.
"""

from fedslim.compression.decoder import DecodedUpdate, decode_update
from fedslim.compression.feedback import ErrorFeedback
from fedslim.compression.grammar import parse_spec
from fedslim.compression.pipeline import encode_update
from fedslim.compression.spec import (
    CastConfig,
    PassthroughConfig,
    PipelineSpec,
    PositionCoding,
    Precision,
    QuantizeConfig,
    Rounding,
    ScaleStat,
    Scope,
    SelectMode,
    SignConfig,
    StageProperties,
    TopKConfig,
    ZstdConfig,
)
from fedslim.compression.wire import WIRE_STYPE

__all__ = [
    "WIRE_STYPE",
    "CastConfig",
    "DecodedUpdate",
    "ErrorFeedback",
    "PassthroughConfig",
    "PipelineSpec",
    "PositionCoding",
    "Precision",
    "QuantizeConfig",
    "Rounding",
    "ScaleStat",
    "Scope",
    "SelectMode",
    "SignConfig",
    "StageProperties",
    "TopKConfig",
    "ZstdConfig",
    "decode_update",
    "encode_update",
    "parse_spec",
]
