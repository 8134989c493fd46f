"""Client side: fedslim's ClientApp and ``compression_mod`` for any Flower ClientApp."""

from fedslim.client.mod import compression_mod, make_compression_mod

__all__ = ["compression_mod", "make_compression_mod"]
