"""Typed errors for fedslim.

Every error fedslim raises on purpose derives from :class:`FedslimError`, so a caller can
catch "anything fedslim rejected" without swallowing programming errors. Messages name the
offending key / tensor / client and what was expected.
"""

from __future__ import annotations


class FedslimError(Exception):
    """Root of fedslim's error hierarchy."""


class ConfigError(FedslimError, ValueError):
    """A run-config key is unknown or its value is invalid."""


class RegistryError(FedslimError, KeyError):
    """A name is not registered (or registered twice) in a registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class DataError(FedslimError, ValueError):
    """A dataset file is missing, malformed or inconsistent."""


class SpecError(FedslimError, ValueError):
    """A compression pipeline spec string cannot be parsed or is invalid."""


class EncodeError(FedslimError, ValueError):
    """A tensor cannot be encoded (e.g. it holds NaN/Inf or has an unsupported dtype)."""


class DecodeError(FedslimError, ValueError):
    """A payload is malformed, truncated, or inconsistent; raised before any large allocation."""


class UpdateRejected(FedslimError):
    """A client's reply was rejected by the server (bad payload, names, shapes, values)."""


class CheckpointError(FedslimError):
    """A checkpoint is missing, incomplete, or does not match the run configuration."""
